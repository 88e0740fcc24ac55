"""Triton python backend for DeepSeek-V4: a thin adapter over backend.engine.

execute() never blocks: it validates each request, hands it to the engine thread and returns.
Engine outputs go through a queue to a sender thread, which owns all socket I/O (`sender_threads`
of them: each request stays on one, so its responses keep their order). Every request gets
exactly one response flagged FINAL: on success, error, cancellation and shutdown alike. When the
sender falls behind the engine, a streamed request's queued outputs go out as one response (their
text and ids joined): each response costs the python backend a fixed time, which would otherwise
cap the tokens/s of many streams. For the same reason cancellation is checked at most every
CANCEL_CHECK_SECONDS per request, not on every response.
"""
import dataclasses
import itertools
import json
import logging
import queue
import threading
import time

import triton_python_backend_utils as pb_utils

from backend.engine import LLMEngine, SamplingParams
from backend.engine.llm_engine import QueueFullError
from backend.serving import (INPUTS, engine_config_from_parameters, output_arrays, parse_request,
                             sender_threads_from_parameters)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# A cancellation check is a round trip to the server process, as costly as a send (checked on
# every response it took 13-32% of the sender's responses/s: bench.response_ceiling), so a
# request is checked on its first and last output and at most this often in between.
CANCEL_CHECK_SECONDS = 0.05
log = logging.getLogger("deepseek_v4")


class _Request:
    """What the sender thread needs to answer one request."""

    def __init__(self, sender, parsed, prompt_text, outputs=None):
        self.sender, self.parsed, self.prompt_text = sender, parsed, prompt_text
        self.outputs = outputs  # the queue of the sender thread that answers this request
        self.text, self.token_ids, self.cancelled = "", [], False
        self.next_cancel_check = 0.0  # time.monotonic() from which the next output checks


def _joined(items):
    """(request, output) pairs in queue order -> one (request, output) per request, its outputs'
    text and ids joined in order, the last one's flags and counts. An error is never joined."""
    joined = {}
    for state, out in items:
        key = id(state)
        if key in joined and joined[key][1].error is None and out.error is None:
            prev = joined[key][1]
            out = dataclasses.replace(out, text=prev.text + out.text, token_ids=prev.token_ids + out.token_ids)
        elif key in joined:  # an error next to other outputs: keep them apart, in order
            key = (key, len(joined))
        joined[key] = (state, out)
    return list(joined.values())


class TritonPythonModel:
    def initialize(self, args):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        model_config = json.loads(args["model_config"])
        parameters = model_config.get("parameters", {})
        config = engine_config_from_parameters(parameters)
        senders = sender_threads_from_parameters(parameters)
        self.engine = LLMEngine(config)
        self.engine.start()
        warm = self.engine.generate("warm up", SamplingParams(max_tokens=2))
        log.info("[deepseek_v4] warm-up generated %d tokens", len(warm["token_ids"]))
        self._setup_metrics()
        self._outputs = [queue.Queue() for _ in range(senders)]
        self._next_sender = itertools.count()
        self._stop = threading.Event()
        self._senders = [threading.Thread(target=self._response_loop, args=(outputs,), name=f"deepseek-v4-sender-{i}",
                                          daemon=True) for i, outputs in enumerate(self._outputs)]
        for thread in self._senders:
            thread.start()
        self._metrics_thread = threading.Thread(target=self._metrics_loop, name="deepseek-v4-metrics", daemon=True)
        self._metrics_thread.start()

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None

    def finalize(self):
        self.engine.shutdown()      # finishes every request; their finals reach the sender queues
        for outputs, thread in zip(self._outputs, self._senders):
            outputs.put(None)
            thread.join(30)
        self._stop.set()
        self._metrics_thread.join(5)

    # --- requests ---------------------------------------------------------------------------
    def _submit(self, request):
        sender = request.get_response_sender()
        try:
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            parsed = parse_request(inputs, self.engine.config.max_model_len)
            prompt_text = parsed.prompt if isinstance(parsed.prompt, str) else ""
            outputs = self._outputs[next(self._next_sender) % len(self._outputs)]
            state = _Request(sender, parsed, prompt_text, outputs)
            self.engine.add_request(parsed.prompt, parsed.params, lambda out: state.outputs.put((state, out)))
        except (ValueError, QueueFullError) as exc:
            code = pb_utils.TritonError.UNAVAILABLE if isinstance(exc, QueueFullError) else pb_utils.TritonError.INVALID_ARG
            self._send_error(sender, str(exc), code)
        except Exception as exc:  # never raise out of execute
            log.error("[deepseek_v4] request rejected: %s: %s", type(exc).__name__, exc)
            self._send_error(sender, f"internal error: {exc}", pb_utils.TritonError.INTERNAL)

    @staticmethod
    def _send_error(sender, message, code):
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)

    def _response_loop(self, outputs: queue.Queue):
        while True:
            items = [outputs.get()]
            while not outputs.empty():
                items.append(outputs.get())
            done = None in items
            for state, out in _joined(items[:items.index(None)] if done else items):
                try:
                    self._respond(state, out)
                except Exception as exc:  # a broken connection must not stop the other requests
                    log.error("[deepseek_v4] sending a response for request %s failed: %s", out.request_id, exc)
            if done:
                return

    def _respond(self, state, out):
        if state.cancelled:
            if out.finished:
                state.sender.send(flags=FINAL)
            return
        if self._cancelled(state, out):
            state.cancelled = True
            self.engine.abort(out.request_id)
            if out.finished:
                state.sender.send(flags=FINAL)
            return
        if out.error is not None:
            self._send_error(state.sender, out.error, pb_utils.TritonError.INTERNAL)
            return
        flags = FINAL if out.finished else 0
        if state.parsed.stream:
            response = self._response(out, out.text, out.token_ids)
            state.sender.send(response, flags=flags)
            return
        state.text += out.text
        state.token_ids += out.token_ids
        if out.finished:
            text = state.text if state.parsed.exclude_input_in_output else state.prompt_text + state.text
            state.sender.send(self._response(out, text, state.token_ids), flags=FINAL)

    @staticmethod
    def _cancelled(state, out) -> bool:
        now = time.monotonic()
        if not out.finished and now < state.next_cancel_check:
            return False
        state.next_cancel_check = now + CANCEL_CHECK_SECONDS
        return state.sender.is_cancelled()

    @staticmethod
    def _response(out, text, token_ids):
        arrays = output_arrays(out, text, token_ids)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])

    # --- metrics ------------------------------------------------------------------------------
    def _setup_metrics(self):
        # The families must outlive their metrics: keep both.
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        specs = {"tokens": ("dsv4_generated_tokens_total", "Generated tokens", counter),
                 "running": ("dsv4_requests_running", "Requests prefilling or decoding", gauge),
                 "waiting": ("dsv4_requests_waiting", "Requests waiting for a slot", gauge),
                 "slots": ("dsv4_slots_in_use", "State slots in use", gauge),
                 "tpot": ("dsv4_time_per_output_token_seconds", "Decode step time (moving mean)", gauge)}
        self._families = {k: pb_utils.MetricFamily(name=n, description=d, kind=kind) for k, (n, d, kind) in specs.items()}
        self._metrics = {k: f.Metric(labels={"model": "deepseek_v4"}) for k, f in self._families.items()}
        self._reported_tokens = 0

    def _metrics_loop(self):
        while not self._stop.wait(0.25):
            s, m = self.engine.stats, self._metrics
            try:
                m["tokens"].increment(s.generated_tokens - self._reported_tokens)
                self._reported_tokens = s.generated_tokens
                m["running"].set(s.requests_running)
                m["waiting"].set(s.requests_waiting)
                m["slots"].set(s.slots_in_use)
                m["tpot"].set(s.time_per_output_token)
            except Exception as exc:  # metrics must never take the model down
                log.warning("[deepseek_v4] metrics update failed: %s", exc)
                return
