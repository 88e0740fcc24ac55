"""Blocking and asyncio clients for the deepseek_v4 model, over gRPC or HTTP."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from . import _grpc, _http
from .protocol import MODEL_NAME
from .types import Chunk, Result, SamplingParams, join

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}


class Client:
    """`generate()` returns the whole result; `stream()` yields chunks as tokens arrive.
    Leaving a `stream()` loop early cancels the request on the server."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = MODEL_NAME, timeout: float = 300.0):
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = url or DEFAULT_URLS[protocol], protocol, model, timeout

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[Chunk]:
        params = params or SamplingParams()
        if self.protocol == "http":
            return _http.stream(self.url, self.model, prompt, params, True, self.timeout)
        return _grpc.stream(self.url, self.model, prompt, params, True, True, self.timeout)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 exclude_input: bool = True) -> Result:
        params = params or SamplingParams()
        if self.protocol == "http":
            c = _http.generate(self.url, self.model, prompt, params, exclude_input, self.timeout)
            return Result(c.text, c.token_ids, c.finish_reason, c.num_input_tokens, c.num_output_tokens)
        return join(_grpc.stream(self.url, self.model, prompt, params, False, exclude_input, self.timeout))


class AsyncClient:
    """The same over asyncio: `await generate(...)`, `async for chunk in stream(...)`."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = MODEL_NAME, timeout: float = 300.0):
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = url or DEFAULT_URLS[protocol], protocol, model, timeout

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> AsyncIterator[Chunk]:
        params = params or SamplingParams()
        inner = self._http_stream if self.protocol == "http" else self._grpc_stream
        async for chunk in inner(prompt, params, True, True):
            yield chunk

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       exclude_input: bool = True) -> Result:
        params = params or SamplingParams()
        inner = self._http_stream if self.protocol == "http" else self._grpc_stream
        return join([c async for c in inner(prompt, params, False, exclude_input)])

    async def _grpc_stream(self, prompt, params, stream_tokens, exclude_input):
        import tritonclient.grpc.aio as aio
        async with aio.InferenceServerClient(self.url) as client:
            async def requests():
                yield {"model_name": self.model, "enable_empty_final_response": True,
                       "inputs": _grpc.make_inputs(aio, prompt, params, stream_tokens, exclude_input)}
            last = None
            async for result, error in client.stream_infer(requests(), stream_timeout=self.timeout):
                chunk = _grpc.parse_result(result, error)
                if chunk is None:
                    continue
                if chunk.finished and not chunk.token_ids and not chunk.text and last is not None:
                    chunk = Chunk("", [], True, last.finish_reason, last.num_input_tokens, last.num_output_tokens)
                last = chunk
                yield chunk
                if chunk.finished:
                    return

    async def _http_stream(self, prompt, params, stream_tokens, exclude_input):
        import aiohttp  # a dependency of tritonclient[http]
        endpoint = "generate_stream" if stream_tokens else "generate"
        body = _http.request_body(prompt, params, stream_tokens, exclude_input)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(f"http://{self.url}/v2/models/{self.model}/{endpoint}", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                if not stream_tokens or resp.status != 200:
                    data = json.loads(await resp.read())
                    chunk = _http.parse_event(data)
                    yield Chunk(chunk.text, chunk.token_ids, True, chunk.finish_reason, chunk.num_input_tokens,
                                chunk.num_output_tokens)
                    return
                async for line in resp.content:
                    line = line.strip()
                    if line.startswith(b"data:"):
                        chunk = _http.parse_event(json.loads(line[5:]))
                        yield chunk
                        if chunk.finished:
                            return
