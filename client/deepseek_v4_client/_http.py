"""HTTP transport: Triton's generate extension (`/generate`, `/generate_stream` as server-sent events)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from .types import Chunk, ServerError


def request_body(prompt, params, stream: bool, exclude_input: bool) -> bytes:
    body = {"stream": stream, "sampling_parameters": params.to_json(), "exclude_input_in_output": exclude_input}
    body["text_input" if isinstance(prompt, str) else "input_ids"] = prompt
    return json.dumps(body).encode()


def parse_event(data: dict) -> Chunk:
    if "error" in data:
        raise ServerError(data["error"])
    ids = data.get("output_ids", [])
    reason = data.get("finish_reason") or None
    return Chunk(data.get("text_output", ""), ids if isinstance(ids, list) else [ids], reason is not None, reason,
                 int(data.get("num_input_tokens", 0)), int(data.get("num_output_tokens", 0)))


def post(url: str, body: bytes, timeout: float):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode(errors="replace")
        try:
            raise ServerError(json.loads(raw)["error"]) from None
        except (ValueError, KeyError):
            raise ServerError(f"HTTP {exc.code}: {raw}") from None


def stream(base: str, model: str, prompt, params, exclude_input: bool, timeout: float):
    with post(f"http://{base}/v2/models/{model}/generate_stream", request_body(prompt, params, True, exclude_input),
              timeout) as resp:
        for line in resp:
            line = line.strip()
            if line.startswith(b"data:"):
                chunk = parse_event(json.loads(line[5:]))
                yield chunk
                if chunk.finished:
                    return


def generate(base: str, model: str, prompt, params, exclude_input: bool, timeout: float) -> Chunk:
    with post(f"http://{base}/v2/models/{model}/generate", request_body(prompt, params, False, exclude_input),
              timeout) as resp:
        return parse_event(json.loads(resp.read()))
