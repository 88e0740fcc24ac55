"""Typed request and response values."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})


@dataclass
class Chunk:
    """One streamed piece: new text and token ids since the previous chunk."""
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int


class ServerError(RuntimeError):
    """The server answered with an error; the message is the server's."""


def join(chunks) -> Result:
    text, ids, last = "", [], None
    for c in chunks:
        text += c.text
        ids += c.token_ids
        last = c
    if last is None:
        raise ServerError("no response")
    return Result(text, ids, last.finish_reason, last.num_input_tokens, last.num_output_tokens)
