"""One request's state in the engine."""
from __future__ import annotations

import itertools
from enum import Enum, auto

from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()     # queued, no slot yet
    PREFILLING = auto()  # has a slot, prompt partly processed
    RUNNING = auto()     # decoding
    FINISHED = auto()


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_id=None):
        self.request_id = request_id if request_id is not None else next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.slot: int | None = None
        self.num_prefilled = 0       # prompt tokens already in the state
        # Sampled tokens not yet read back (0, or 1 while a decode step is in flight; 2 for a moment
        # after the next step is queued); the latest is row `pending_row` of that step's tokens.
        self.num_pending = 0
        self.pending_row = -1
        self.finish_reason: str | None = None
        self.seed = None             # the sampler's seed: params.seed, or drawn by the model runner
        self.arrival_time = 0.0

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens known on the host (pending ones not counted)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def at_length_limit(self, max_model_len: int | None, ahead: int = 0) -> bool:
        """Whether the sequence has its max_tokens outputs or max_model_len tokens, counting `ahead`
        tokens more (its pending ones)."""
        return (len(self.output_ids) + ahead >= self.params.max_tokens or
                (max_model_len is not None and self.num_tokens + ahead >= max_model_len))

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def __repr__(self):
        return f"Sequence({self.request_id}, {self.status.name}, slot={self.slot}, tokens={self.num_tokens})"
