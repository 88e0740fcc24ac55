"""gRPC transport: decoupled models answer on a bidirectional stream; the last response of a
request carries the `triton_final_response` parameter (empty final responses enabled)."""
from __future__ import annotations

import queue

import numpy as np

from .protocol import INPUTS
from .types import Chunk, ServerError


def make_inputs(module, prompt, params, stream: bool, exclude_input: bool) -> list:
    """InferInput objects of tritonclient.grpc (or .grpc.aio) `module`."""
    def tensor(name, array):
        t = module.InferInput(name, list(array.shape), INPUTS[name])
        t.set_data_from_numpy(array)
        return t
    first = (tensor("text_input", np.array([prompt.encode("utf-8")], dtype=np.object_)) if isinstance(prompt, str)
             else tensor("input_ids", np.array(prompt, dtype=np.int32)))
    return [first, tensor("stream", np.array([stream])),
            tensor("sampling_parameters", np.array([params.to_json().encode()], dtype=np.object_)),
            tensor("exclude_input_in_output", np.array([exclude_input]))]


def parse_result(result, error) -> Chunk | None:
    """-> a Chunk, or None for an empty final response (then Chunk.finished comes from the flag)."""
    if error is not None:
        raise ServerError(error.message() if hasattr(error, "message") else str(error))
    response = result.get_response()
    final = response.parameters["triton_final_response"].bool_param if "triton_final_response" in response.parameters else False
    if not response.outputs:
        return Chunk("", [], True) if final else None
    text = result.as_numpy("text_output")
    reason = result.as_numpy("finish_reason")
    reason = reason.reshape(-1)[0].decode() if reason is not None and reason.size else ""
    return Chunk(b"".join(text.reshape(-1)).decode("utf-8") if text is not None else "",
                 result.as_numpy("output_ids").reshape(-1).tolist(), final, reason or None,
                 int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
                 int(result.as_numpy("num_output_tokens").reshape(-1)[0]))


def stream(url: str, model: str, prompt, params, stream_tokens: bool, exclude_input: bool, timeout: float):
    import tritonclient.grpc as grpcclient
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    done = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=timeout)
        client.async_stream_infer(model, make_inputs(grpcclient, prompt, params, stream_tokens, exclude_input),
                                  enable_empty_final_response=True)
        last = None
        while True:
            try:
                chunk = parse_result(*responses.get(timeout=timeout))
            except queue.Empty:
                raise ServerError(f"no response within {timeout} s") from None
            if chunk is None:
                continue
            if chunk.finished and not chunk.token_ids and not chunk.text and last is not None:
                chunk = Chunk("", [], True, last.finish_reason, last.num_input_tokens, last.num_output_tokens)
            last = chunk
            if chunk.token_ids or chunk.text or chunk.finished:
                yield chunk
            if chunk.finished:
                done = True
                return
    finally:
        client.stop_stream(cancel_requests=not done)  # a consumer that stops early cancels the request
        client.close()
