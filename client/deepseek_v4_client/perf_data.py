"""perf_analyzer input-data files for the deepseek_v4 model (`--input-data FILE`)."""
from __future__ import annotations

import json

from .types import SamplingParams

DEFAULT_PROMPTS = ["Hello, how are you?", "Write a short poem about the sea.", "Explain mixture of experts.",
                   "List three prime numbers.", "What is the capital of France?"]


def input_data(prompts: list[str], params: SamplingParams, stream: bool = True) -> dict:
    return {"data": [{"text_input": [p], "stream": [stream], "sampling_parameters": [params.to_json()],
                      "exclude_input_in_output": [True]} for p in prompts]}


def write_input_data(path, prompts=None, params: SamplingParams | None = None, stream: bool = True) -> None:
    with open(path, "w") as f:
        json.dump(input_data(prompts or DEFAULT_PROMPTS, params or SamplingParams(max_tokens=16), stream), f, indent=1)
