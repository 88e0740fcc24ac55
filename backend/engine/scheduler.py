"""Chooses each step's work: a bounded prefill chunk for one sequence, or one decode step for every
running sequence (continuous batching: sequences join and leave the decode batch every step)."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence, Status
from .slots import SlotAllocator


class Scheduler:
    def __init__(self, num_slots: int, prefill_chunk: int):
        self.slots = SlotAllocator(num_slots)
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._decode_turn = False  # alternate prefill and decode while both have work

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    def schedule(self) -> tuple[str, list[Sequence], int]:
        """-> ("prefill", [seq], chunk_len) | ("decode", running, 1) | ("idle", [], 0)."""
        while self.waiting and self.slots.num_free:
            seq = self.waiting.popleft()
            seq.slot = self.slots.allocate()
            seq.status = Status.PREFILLING
            self.prefilling.append(seq)
        want_prefill = bool(self.prefilling) and not (self.running and self._decode_turn)
        self._decode_turn = not self._decode_turn
        if want_prefill:
            seq = self.prefilling[0]
            return "prefill", [seq], min(self.prefill_chunk, len(seq.prompt_ids) - seq.num_prefilled)
        if self.running:
            return "decode", list(self.running), 1
        return "idle", [], 0

    def prefilled(self, seq: Sequence, n: int) -> None:
        seq.num_prefilled += n
        if seq.num_prefilled == len(seq.prompt_ids):
            self.prefilling.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is (finished, cancelled or failed) and frees its slot."""
        if seq.status == Status.FINISHED:
            return
        for queue in (self.waiting, self.prefilling):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None
        seq.status = Status.FINISHED
        seq.finish_reason = reason
