"""The Triton contract without Triton: request tensors -> engine call, engine outputs -> tensors.

Pure functions over numpy arrays, so they are tested without a server. Tensor names and dtypes
follow the vLLM backend for Triton (client/deepseek_v4_client/protocol.py mirrors them)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .engine import EngineConfig, RequestOutput, SamplingParams

INPUTS = ("text_input", "input_ids", "stream", "sampling_parameters", "exclude_input_in_output")


@dataclass
class ParsedRequest:
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool


def _scalar(arr: np.ndarray, name: str):
    if arr.size != 1:
        raise ValueError(f"input '{name}' must hold exactly one element, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def _bool(inputs: dict, name: str) -> bool:
    if name not in inputs:
        return False
    value = _scalar(inputs[name], name)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"input '{name}' must be BOOL")
    return bool(value)


def _text(inputs: dict, name: str) -> str:
    value = _scalar(inputs[name], name)
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"input '{name}' is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, str):
        return value
    raise ValueError(f"input '{name}' must be a STRING")


def parse_request(inputs: dict, max_model_len: int | None = None) -> ParsedRequest:
    """inputs: name -> numpy array (absent inputs omitted). Raises ValueError naming the field."""
    has_text, has_ids = "text_input" in inputs, "input_ids" in inputs
    if has_text == has_ids:
        raise ValueError("exactly one of the inputs 'text_input' and 'input_ids' is required"
                         if not has_text else "give 'text_input' or 'input_ids', not both")
    if has_text:
        prompt = _text(inputs, "text_input")
        if not prompt:
            raise ValueError("input 'text_input' is empty")
    else:
        ids = inputs["input_ids"]
        if ids.dtype != np.int32:
            raise ValueError(f"input 'input_ids' must be INT32, got {ids.dtype}")
        prompt = ids.reshape(-1).tolist()
        if not prompt:
            raise ValueError("input 'input_ids' is empty")
    raw = {}
    if "sampling_parameters" in inputs:
        text = _text(inputs, "sampling_parameters")
        if text.strip():
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"input 'sampling_parameters' is not valid JSON: {exc.msg} at position {exc.pos}") from None
    params = SamplingParams.from_dict(raw, max_model_len)
    return ParsedRequest(prompt, params, _bool(inputs, "stream"), _bool(inputs, "exclude_input_in_output"))


def output_arrays(out: RequestOutput, text: str, token_ids: list[int]) -> dict[str, np.ndarray]:
    """The response tensors for one engine output (text and ids already chosen by the caller)."""
    return {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.array(token_ids, dtype=np.int32),
        "finish_reason": np.array([(out.finish_reason or "").encode()], dtype=np.object_),
        "num_input_tokens": np.array([out.num_input_tokens], dtype=np.uint32),
        "num_output_tokens": np.array([out.num_output_tokens], dtype=np.uint32),
    }


_BOOL_PARAMS = ("simulate_qat", "kernels", "cuda_graphs", "compile_attention")
_ADAPTER_PARAMS = ("sender_threads",)
_INT_PARAMS = ("max_num_seqs", "max_model_len", "max_queue", "prefill_chunk", "decode_prompt_tokens")


def _parameter_values(parameters: dict) -> dict[str, str]:
    return {k: (v.get("string_value", "") if isinstance(v, dict) else str(v)).strip() for k, v in parameters.items()}


def engine_config_from_parameters(parameters: dict) -> EngineConfig:
    """config.pbtxt `parameters` ({key: {"string_value": ...}}) -> EngineConfig (the adapter's own
    settings, _ADAPTER_PARAMS, are read by model.py)."""
    kwargs = {}
    for key, value in _parameter_values(parameters).items():
        if value == "" or key.startswith("_") or key in _ADAPTER_PARAMS:
            continue
        if key in _INT_PARAMS:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"model parameter '{key}' must be an integer, got {value!r}") from None
        elif key in _BOOL_PARAMS:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"model parameter '{key}' must be true or false, got {value!r}")
            kwargs[key] = value.lower() == "true"
        elif key in ("checkpoint", "device"):
            kwargs[key] = value
        else:
            raise ValueError(f"unknown model parameter '{key}' in config.pbtxt")
    return EngineConfig(**kwargs)


def sender_threads_from_parameters(parameters: dict) -> int:
    """config.pbtxt `sender_threads`: how many threads send responses (a request stays on one, so
    its responses keep their order); empty or absent: 1."""
    value = _parameter_values(parameters).get("sender_threads", "")
    if value == "":
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"model parameter 'sender_threads' must be a positive integer, got {value!r}")
    return int(value)
