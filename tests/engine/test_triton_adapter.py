"""model.py's decoupled contract with a fake triton_python_backend_utils: every request gets exactly
one FINAL flag, on success, error, cancellation and shutdown alike, and execute() never blocks."""
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

MODEL_PY = Path(__file__).resolve().parents[2] / "model_repository" / "deepseek_v4" / "1" / "model.py"
FINAL = 1


def _fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL

    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs = {t.name: t.value for t in output_tensors or []}
            self.error = error

    class Tensor:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def as_numpy(self):
            return self.value

    class Metric:
        def __init__(self, labels):
            self.value = 0

        def increment(self, v):
            self.value += v

        def set(self, v):
            self.value = v

    class MetricFamily:
        GAUGE, COUNTER = "gauge", "counter"

        def __init__(self, name, description, kind):
            pass

        def Metric(self, labels):
            return Metric(labels)

    pb.TritonError, pb.InferenceResponse, pb.Tensor, pb.MetricFamily = TritonError, InferenceResponse, Tensor, MetricFamily
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    return pb


class Sender:
    def __init__(self):
        self.sent, self.cancelled = [], False

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return self.cancelled


class Request:
    def __init__(self, pb, **inputs):
        self.inputs = {k: pb.Tensor(k, v) for k, v in inputs.items()}
        self.sender = Sender()

    def get_response_sender(self):
        return self.sender


def _text(s):
    return np.array([s.encode()], dtype=np.object_)


@pytest.fixture(params=[1, 2], ids=["one-sender", "two-senders"])
def model(request, tmp_path, monkeypatch):
    pb = _fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("dsv4_model_under_test", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    m = module.TritonPythonModel()
    params = {"max_num_seqs": {"string_value": "2"}, "max_model_len": {"string_value": "256"},
              "sender_threads": {"string_value": str(request.param)}}
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path))
    m.initialize({"model_config": json.dumps({"parameters": params})})
    m.pb, m.module = pb, module
    return m


def _wait_final(req, timeout=60):
    deadline = time.monotonic() + timeout
    while not any(f & FINAL for _, f in req.sender.sent):
        assert time.monotonic() < deadline, "no FINAL response"
        time.sleep(0.02)


def _finals(req):
    return sum(1 for _, f in req.sender.sent if f & FINAL)


def test_one_final_per_request_in_every_case(model):
    pb = model.pb
    ok = Request(pb, text_input=_text("hi"), sampling_parameters=_text('{"max_tokens": 4}'))
    streamed = Request(pb, text_input=_text("hi"), stream=np.array([True]), sampling_parameters=_text('{"max_tokens": 4}'))
    bad = Request(pb, text_input=_text("hi"), sampling_parameters=_text("{oops"))
    cancelled = Request(pb, text_input=_text("hi"), stream=np.array([True]), sampling_parameters=_text('{"max_tokens": 200}'))
    start = time.monotonic()
    assert model.execute([ok, streamed, bad, cancelled]) is None
    assert time.monotonic() - start < 1.0, "execute must not block"
    for req in (ok, streamed, bad):
        _wait_final(req)
    while not cancelled.sender.sent:
        time.sleep(0.01)
    cancelled.sender.cancelled = True
    _wait_final(cancelled)
    assert len(ok.sender.sent) == 1 and 1 <= len(streamed.sender.sent) <= 4  # a lagging sender joins outputs
    assert sum(len(r.outputs["output_ids"]) for r, _ in streamed.sender.sent) == 4
    assert ok.sender.sent[0][0].outputs["text_output"][0].decode().startswith("hi")
    assert "sampling_parameters" in bad.sender.sent[0][0].error.message
    assert len(cancelled.sender.sent) < 200
    in_flight = Request(pb, text_input=_text("bye"), sampling_parameters=_text('{"max_tokens": 200}'))
    model.execute([in_flight])
    model.finalize()  # shutdown answers what is still running
    for req in (ok, streamed, bad, cancelled, in_flight):
        assert _finals(req) == 1
    assert model.engine.stats.slots_in_use == 0


def test_outputs_queued_behind_the_sender_go_out_joined_per_request(model):
    """Outputs that queued up while the sender was busy: one response per request, text and ids
    joined in order, the last output's flags; an error is sent on its own, after what came before."""
    from backend.engine.llm_engine import RequestOutput

    def out(rid, text, ids, finished=False, error=None):
        return RequestOutput(rid, text, ids, finished, "length" if finished else None, 3, 0, error)
    a, b, c = object(), object(), object()
    items = [(a, out(1, " x", [5])), (b, out(2, " y", [6])), (a, out(1, " z", [7])),
             (c, out(3, " u", [8])), (a, out(1, "", [9], finished=True)), (c, out(3, "", [], True, "boom"))]
    joined = model.module._joined(items)
    assert [(s, o.text, o.token_ids, o.finished, o.error) for s, o in joined] == [
        (a, " x z", [5, 7, 9], True, None), (b, " y", [6], False, None), (c, " u", [8], False, None),
        (c, "", [], True, "boom")]


def test_cancellation_is_checked_on_the_first_and_last_output_and_at_most_every_interval(model):
    """Each check is a round trip to the server process: not one per streamed token."""
    checks = []

    class CountingSender(Sender):
        def is_cancelled(self):
            checks.append(time.monotonic())
            return False

    state = model.module._Request(CountingSender(), None, "")
    start = time.monotonic()
    for _ in range(50):
        assert not model._cancelled(state, types.SimpleNamespace(finished=False))
    assert not model._cancelled(state, types.SimpleNamespace(finished=True))
    assert time.monotonic() - start < model.module.CANCEL_CHECK_SECONDS, "the loop itself took too long"
    assert len(checks) == 2
    model.finalize()
