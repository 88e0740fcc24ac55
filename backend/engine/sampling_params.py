"""Per-request sampling parameters, parsed from JSON with errors that name the field."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

MAX_TOKENS_LIMIT = 1 << 20  # anything above is certainly a mistake


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # 0: off
    top_p: float = 1.0
    seed: int | None = None         # same seed -> same tokens, whatever else is in the batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, max_model_len: int | None = None) -> "SamplingParams":
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ValueError(f"sampling parameter '{name}' {why}")
        need(_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT, "max_tokens",
             f"must be an integer in 1..{MAX_TOKENS_LIMIT}, got {self.max_tokens!r}")
        if max_model_len is not None:
            need(self.max_tokens < max_model_len, "max_tokens",
                 f"({self.max_tokens}) must be below max_model_len ({max_model_len})")
        need(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be an integer in 0..max_tokens, got {self.min_tokens!r}")
        need(_is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature",
             f"must be a number in 0..100, got {self.temperature!r}")
        need(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}")
        need(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        need(self.seed is None or _is_int(self.seed) and 0 <= self.seed < 2**63, "seed",
             f"must be an integer in 0..2^63-1, got {self.seed!r}")
        need(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
             "must be a list of non-empty strings")
        need(isinstance(self.stop_token_ids, list) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", "must be a list of non-negative integers")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "must be true or false")
        return self

    @classmethod
    def from_dict(cls, raw: dict, max_model_len: int | None = None) -> "SamplingParams":
        if not isinstance(raw, dict):
            raise ValueError("sampling_parameters must be a JSON object")
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ValueError(f"unknown sampling parameter '{key}' (known: {', '.join(sorted(known))})")
        values = dict(raw)
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        return cls(**values).validate(max_model_len)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
