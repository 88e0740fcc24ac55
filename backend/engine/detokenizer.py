"""Incremental detokenization: streamed deltas concatenate to exactly the final text.

A trailing incomplete UTF-8 sequence (decoded as U+FFFD) is held back until it completes, and the
tail that could still become a stop string is held back until it cannot."""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.sent = 0  # characters already emitted
        self.text = ""

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """-> (new text safe to emit, whether a stop string appeared)."""
        self.text = self.tokenizer.decode(output_ids)
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
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
