"""Incremental detokenization: streamed deltas concatenate to exactly the final text.

Each update decodes a short window, not the whole output: the tokens not yet in the text, after
the previous update's tokens as context (so a tokenizer that treats the first token of a decode
specially treats the context's, and the new text is the window's text past the context's). A step
then costs the same at any output length. A trailing incomplete UTF-8 sequence (decoded as U+FFFD)
stays in the window until it completes, and the tail that could still become a stop string is
held back until it cannot."""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.context = 0  # first token of the decode window
        self.done = 0     # tokens whose text is in self.text
        self.text = ""    # the text of output_ids[:done]
        self.pending = ""  # the text of the window's incomplete tail, for flush
        self.sent = 0     # characters already emitted

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """-> (new text safe to emit, whether a stop string appeared)."""
        window = self.tokenizer.decode(output_ids[self.context:])
        new = window[len(self.tokenizer.decode(output_ids[self.context:self.done])):]
        if window.endswith("\ufffd"):  # possibly a character cut short: wait for its next bytes
            self.pending = new
            return "", False
        self.text += new
        self.pending = ""
        self.context, self.done = self.done, len(output_ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.text = self.text[:at]
                return self.flush(), True
        stable = len(self.text.rstrip("\ufffd")) - self.holdback
        if stable <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent:stable], stable
        return delta, False

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the sequence)."""
        self.text += self.pending
        self.pending = ""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
