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
        self.context = 0   # first token of the decode window
        self.done = 0      # tokens whose text has been taken in
        self.unsent = ""   # taken-in text not yet emitted (a stop string can only start here)
        self.pending = ""  # the text of the window's incomplete tail, for flush

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """-> (new text safe to emit, whether a stop string appeared)."""
        window = self.tokenizer.decode(output_ids[self.context:])
        new = window[len(self.tokenizer.decode(output_ids[self.context:self.done])):]
        if window.endswith("\ufffd"):  # possibly a character cut short: wait for its next bytes
            self.pending = new
            return "", False
        self.unsent += new
        self.pending = ""
        self.context, self.done = self.done, len(output_ids)
        for s in self.stop:  # held back: the last len(s) - 1 characters were never emitted
            at = self.unsent.find(s)
            if at != -1:
                self.unsent = self.unsent[:at]
                return self.flush(), True
        stable = len(self.unsent.rstrip("\ufffd")) - self.holdback
        if stable <= 0:
            return "", False
        delta, self.unsent = self.unsent[:stable], self.unsent[stable:]
        return delta, False

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the sequence)."""
        delta, self.unsent, self.pending = self.unsent + self.pending, "", ""
        return delta
