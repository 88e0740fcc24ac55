"""Chooses each step's work: a bounded prefill chunk for one sequence, or one decode step for every
running sequence (continuous batching: sequences join and leave the decode batch every step).

Short prompts (up to `decode_prompt_tokens`) skip prefill chunks: their tokens ride in the decode
steps, one per step, next to the running sequences. Decode steps replay CUDA graphs, while a
prefill chunk runs eagerly, launch-bound and GIL-bound (~40 ms for a 4-layer flash-shaped model
however short the prompt), stalling every running sequence.

The engine queues a decode step before it reads the previous step's tokens, so a sequence can have
a token in flight. One whose in-flight token is sure to be its last (max_tokens, max_model_len) is
left out of the next step; one that stops on a token or a stop string takes part in one step too
many, whose output is dropped."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence, Status
from .slots import SlotAllocator


class Scheduler:
    def __init__(self, num_slots: int, prefill_chunk: int, decode_prompt_tokens: int = 0,
                 max_model_len: int | None = None):
        self.slots = SlotAllocator(num_slots)
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.decode_prompt_tokens = decode_prompt_tokens
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
        """-> ("prefill", [seq], chunk_len) | ("decode", running + short prompts, 1) | ("idle", [], 0).
        A decode step's sequences that are still PREFILLING feed their next prompt token."""
        while self.waiting and self.slots.num_free:
            seq = self.waiting.popleft()
            seq.slot = self.slots.allocate()
            seq.status = Status.PREFILLING
            self.prefilling.append(seq)
        riders = [s for s in self.prefilling if self.rides_decode(s)]
        chunked = [s for s in self.prefilling if not self.rides_decode(s)]
        decode = [s for s in self.running if not self.ends_in_flight(s)] + riders
        want_prefill = bool(chunked) and not (decode and self._decode_turn)
        self._decode_turn = not self._decode_turn
        if want_prefill:
            seq = chunked[0]
            return "prefill", [seq], min(self.prefill_chunk, len(seq.prompt_ids) - seq.num_prefilled)
        if decode:
            return "decode", decode, 1
        return "idle", [], 0

    def ends_in_flight(self, seq: Sequence) -> bool:
        """Whether the sequence's in-flight token is its last by length, so it needs no more steps."""
        return seq.num_pending > 0 and seq.at_length_limit(self.max_model_len, ahead=seq.num_pending)

    def rides_decode(self, seq: Sequence) -> bool:
        return len(seq.prompt_ids) <= self.decode_prompt_tokens

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
