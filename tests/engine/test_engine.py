"""Engine pieces without a server: scheduling, parameters, detokenization, request parsing, batching."""
import re
import threading

import numpy as np
import pytest

from backend.engine import EngineConfig, LLMEngine, SamplingParams
from backend.engine.detokenizer import IncrementalDetokenizer
from backend.engine.scheduler import Scheduler
from backend.engine.sequence import Sequence, Status
from backend.engine.slots import SlotAllocator
from backend.serving import engine_config_from_parameters, parse_request, sender_threads_from_parameters
from backend.tokenizer import build_tokenizer


def test_slots_and_scheduler_continuous_batching():
    slots = SlotAllocator(2)
    a, b = slots.allocate(), slots.allocate()
    assert slots.allocate() is None and slots.num_used == 2
    slots.free(a)
    with pytest.raises(ValueError):
        slots.free(a)
    sched = Scheduler(num_slots=2, prefill_chunk=4)
    seqs = [Sequence(list(range(6)), SamplingParams()) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    kind, batch, n = sched.schedule()
    assert (kind, batch, n) == ("prefill", [seqs[0]], 4) and seqs[2].status == Status.WAITING
    sched.prefilled(seqs[0], 4)
    kind, batch, n = sched.schedule()
    assert (kind, n) == ("prefill", 2)
    sched.prefilled(seqs[0], 2)
    assert seqs[0].status == Status.RUNNING
    kinds = {sched.schedule()[0] for _ in range(2)}
    assert kinds == {"prefill", "decode"}  # a prefilling sequence does not stall decoding
    sched.finish(seqs[0], "stop")
    assert seqs[0].slot is None and sched.schedule()[0] == "prefill" and seqs[2].slot is not None


def test_short_prompts_ride_in_decode_steps_and_long_ones_take_prefill_chunks():
    sched = Scheduler(num_slots=4, prefill_chunk=4, decode_prompt_tokens=3)
    running, short, long = (Sequence(list(range(n)), SamplingParams()) for n in (2, 3, 9))
    sched.add(running)
    sched.schedule()  # running's 2-token prompt rides the first decode step's ...
    sched.prefilled(running, 1)
    assert sched.schedule() == ("decode", [running], 1)  # ... and the second
    sched.prefilled(running, 1)
    assert running.status == Status.RUNNING
    sched.add(short)
    sched.add(long)
    kinds = []
    for _ in range(4):
        kind, batch, n = sched.schedule()
        kinds.append(kind)
        if kind == "decode":
            assert batch == [running, short] or (batch == [running] and short.status == Status.RUNNING)
            if short.status == Status.PREFILLING:
                sched.prefilled(short, 1)
        else:
            assert batch == [long] and n == 4
            sched.prefilled(long, n)
    assert kinds == ["prefill", "decode", "prefill", "decode"]  # the long prompt alternates with decoding
    assert short.num_prefilled == 2 and long.num_prefilled == 8


def test_sampling_params_validation_names_the_field():
    assert SamplingParams.from_dict({"max_tokens": 3, "stop": "x"}).stop == ["x"]
    for raw, field in [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                       ({"temperature": "hot"}, "temperature"), ({"top_k": -1}, "top_k"),
                       ({"top_p": 1.5}, "top_p"), ({"min_tokens": 99}, "min_tokens"),
                       ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"nope": 1}, "nope")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams.from_dict(raw)
    with pytest.raises(ValueError, match="max_model_len"):
        SamplingParams.from_dict({"max_tokens": 100}, max_model_len=50)


def test_synthetic_tokenizer_gives_every_model_id_text():
    """A random model emits ids across its whole vocabulary: the synthetic tokenizer has exactly
    that many, each decoding to printable text (the corpus merges cover a few hundred; a
    flash-shaped model streamed '' before), and text still round-trips."""
    tok = build_tokenizer(20_000)
    assert tok.get_vocab_size() == 20_000
    for i in (2, 300, 700, 5_000, 19_999):
        assert tok.decode([i]).strip(), i
    assert re.fullmatch(r" w\d+ w\d+", tok.decode([19_998, 19_999]))  # filler words above the merges
    text = "héllo wörld 🙂 The quick brown fox."
    assert tok.decode(tok.encode(text).ids) == text


def test_streamed_deltas_concatenate_to_the_text_multibyte_included():
    tok = build_tokenizer(300)
    text = "héllo wörld 🙂 こんにちは 🚀!"
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.update(ids[:i + 1])[0] for i in range(len(ids))] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    detok = IncrementalDetokenizer(tok, ["wör"])
    out = ""
    for i in range(len(ids)):
        delta, stopped = detok.update(ids[:i + 1])
        out += delta
        if stopped:
            break
    assert stopped and out == "héllo "


def test_streamed_deltas_are_the_decode_of_any_ids_and_each_step_decodes_a_short_window():
    """Random ids (lone UTF-8 lead and continuation bytes, special tokens included): the streamed
    text is exactly the tokenizer's decode of all of them, and no update decodes more than a few
    tokens, however long the output (a whole-output decode per step is quadratic)."""
    tok = build_tokenizer(300)
    decoded_lengths = []

    class Counting:
        def decode(self, ids):
            decoded_lengths.append(len(ids))
            return tok.decode(ids)

    rng = np.random.default_rng(0)
    for trial in range(20):
        ids = [int(i) for i in rng.integers(0, tok.get_vocab_size(), 300)]
        if trial == 0:
            ids = tok.encode("naïve café 🙂 " * 60).ids  # a long, valid text
        detok = IncrementalDetokenizer(Counting(), [])
        out = "".join(detok.update(ids[:i + 1])[0] for i in range(len(ids))) + detok.flush()
        assert out == tok.decode(ids), trial
    assert max(decoded_lengths) <= 32, max(decoded_lengths)  # 11 here; the old whole-output decode: 1080


def _arrays(**kw):
    out = {}
    for k, v in kw.items():
        out[k] = np.array([v], dtype=np.object_) if isinstance(v, bytes) else np.array(v if isinstance(v, list) else [v])
    return out


@pytest.mark.parametrize("inputs, field", [
    ({}, "text_input"),
    ({"text_input": b""}, "text_input"),
    ({"text_input": b"\xc3\x28"}, "UTF-8"),
    ({"text_input": b"a", "input_ids": [1]}, "not both"),
    ({"input_ids": np.array([1], dtype=np.int64)}, "INT32"),
    ({"text_input": b"a", "sampling_parameters": b"{"}, "sampling_parameters"),
    ({"text_input": b"a", "sampling_parameters": b"[1]"}, "JSON object"),
    ({"text_input": b"a", "sampling_parameters": b'{"x": 1}'}, "'x'"),
    ({"text_input": b"a", "stream": np.array([1, 2])}, "stream"),
])
def test_parse_request_errors(inputs, field):
    arrays = {k: (v if isinstance(v, np.ndarray) else _arrays(**{k: v})[k]) for k, v in inputs.items()}
    with pytest.raises(ValueError, match=field):
        parse_request(arrays)


def test_parse_request_ok():
    r = parse_request({**_arrays(text_input=b"hi", sampling_parameters=b'{"max_tokens": 3}'), "stream": np.array([True])})
    assert r.prompt == "hi" and r.params.max_tokens == 3 and r.stream and not r.exclude_input_in_output


def test_engine_config_from_parameters():
    cfg = engine_config_from_parameters({"max_num_seqs": {"string_value": "4"}, "simulate_qat": {"string_value": "true"},
                                         "checkpoint": {"string_value": ""}})
    assert cfg.max_num_seqs == 4 and cfg.simulate_qat and cfg.checkpoint is None
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config_from_parameters({"max_num_seqs": {"string_value": "many"}})
    with pytest.raises(ValueError, match="'colour'"):
        engine_config_from_parameters({"colour": {"string_value": "blue"}})


def test_sender_threads_is_the_adapters_setting():
    threads = {"sender_threads": {"string_value": "2"}}
    assert engine_config_from_parameters(threads).max_num_seqs == EngineConfig().max_num_seqs  # not the engine's
    assert sender_threads_from_parameters(threads) == 2 and sender_threads_from_parameters({}) == 1
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="'sender_threads'"):
            sender_threads_from_parameters({"sender_threads": {"string_value": bad}})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from backend.synthetic import default_checkpoint
    path = default_checkpoint(tmp_path_factory.mktemp("cache"))
    e = LLMEngine(EngineConfig(checkpoint=str(path), max_num_seqs=4, max_model_len=128, max_queue=8, prefill_chunk=5))
    e.start()
    yield e
    e.shutdown()


def _generate_concurrently(engine, cases) -> list[dict]:
    """Every (prompt, params) case at once, one thread each -> the results in case order."""
    results = [None] * len(cases)

    def run(i):
        results[i] = engine.generate(*cases[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_engine_batched_equals_alone_and_frees_slots(engine):
    cases = [("a b c " * (i + 1), SamplingParams(max_tokens=6 + i, temperature=0.0 if i % 2 else 0.9, seed=i))
             for i in range(6)]  # more requests than slots: they queue, join and leave
    results = _generate_concurrently(engine, cases)
    for i, case in enumerate(cases):
        assert results[i]["token_ids"] == engine.generate(*case)["token_ids"], i
        assert results[i]["finish_reason"] == "length"
    assert engine.stats.slots_in_use == 0 and engine.stats.requests_running == 0


def test_prompts_fed_through_decode_steps_give_the_tokens_of_prefill_chunks(engine):
    """The same requests, concurrently, with short prompts riding in the decode steps: the same
    tokens as with prefill chunks, sampled ones included (a rider's generator must not advance)."""
    cases = [("a b c " * (i + 1), SamplingParams(max_tokens=5, temperature=0.0 if i % 2 else 0.9, seed=i))
             for i in range(4)]
    lengths = [len(engine.encode(prompt)) for prompt, _ in cases]
    assert min(lengths) <= 8 < max(lengths)  # riders and prefill chunks both
    riding = LLMEngine(EngineConfig(checkpoint=engine.config.checkpoint, max_num_seqs=4, max_model_len=128,
                                    prefill_chunk=5, decode_prompt_tokens=8), runner=engine.runner)
    assert riding.scheduler.decode_prompt_tokens == 8 and engine.scheduler.decode_prompt_tokens == 0
    riding.start()
    try:
        results = _generate_concurrently(riding, cases)
    finally:
        riding.shutdown()
    for i, case in enumerate(cases):
        assert results[i]["token_ids"] == engine.generate(*case)["token_ids"], i


def test_engine_rejects_bad_prompts(engine):
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(2, 200)), SamplingParams(), lambda out: None)
    with pytest.raises(ValueError, match="input_ids"):
        engine.add_request([1, 10**6], SamplingParams(), lambda out: None)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("", SamplingParams(), lambda out: None)


def test_engine_abort(engine):
    outputs, done = [], threading.Event()

    def collect(out):
        outputs.append(out)
        if out.finished:
            done.set()
    rid = engine.add_request("abort me", SamplingParams(max_tokens=100), collect)
    while not outputs:
        threading.Event().wait(0.01)
    engine.abort(rid)
    assert done.wait(30) and outputs[-1].finish_reason == "abort" and len(outputs) < 100


def test_engine_tokens_are_the_models_greedy_tokens_and_a_stop_drops_the_step_in_flight(engine):
    """The engine's greedy tokens are the model's own, decoded here without the engine (one token
    per forward); stopping on a token ends the output there although the next step was already
    queued when that token was read."""
    import torch

    model = engine.runner.model
    prompt = "a b c a b"
    ids = engine.encode(prompt)
    state = model.new_state(1, 128, with_mtp=False)
    logits, _ = model.forward(torch.tensor([ids]), 0, [0], state)
    expected = []
    for _ in range(8):
        expected.append(int(logits[0].argmax()))
        logits, _ = model.forward(torch.tensor([[expected[-1]]]), len(ids) + len(expected) - 1, [0], state)
    assert engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))["token_ids"] == expected
    at = next(i for i in range(2, 8) if expected[i] not in expected[:i])  # a token seen first mid-output
    out = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[expected[at]]))
    assert out["token_ids"] == expected[:at + 1] and out["finish_reason"] == "stop"


def test_a_decode_step_is_queued_before_the_previous_ones_tokens_are_read(engine, monkeypatch):
    """The overlap itself: step N+1 is queued before step N's tokens are read, and a sequence
    whose in-flight token is its last by length gets no step more."""
    from backend.engine.sampler import SampledTokens
    events = []
    launch, read = engine.runner.decode, SampledTokens.result
    monkeypatch.setattr(engine.runner, "decode", lambda *a: events.append("decode") or launch(*a))
    monkeypatch.setattr(SampledTokens, "result", lambda self: events.append("read") or read(self))
    fresh = LLMEngine(engine.config, runner=engine.runner)
    fresh.start()
    try:
        out = fresh.generate("a b c", SamplingParams(max_tokens=5, temperature=0.0))
    finally:
        fresh.shutdown()
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    # the prefill chunk samples the first token; 4 decode steps give the rest, each queued first
    assert events == ["read", "decode", "decode", "read", "decode", "read", "decode", "read", "read"], events


def test_scheduler_leaves_out_a_sequence_whose_in_flight_token_is_its_last():
    sched = Scheduler(num_slots=2, prefill_chunk=4, max_model_len=8)
    by_tokens, by_length = Sequence([1, 2], SamplingParams(max_tokens=3)), Sequence([1, 2, 3, 4, 5], SamplingParams())
    for seq in (by_tokens, by_length):
        sched.add(seq)
        sched.schedule()
        sched.prefilled(seq, len(seq.prompt_ids))
    by_tokens.output_ids = by_length.output_ids = [7, 7]  # the pending token: 3 of 3 outputs; 8 of 8 tokens
    for seq in (by_tokens, by_length):
        seq.num_pending = 1
    assert sched.ends_in_flight(by_tokens) and sched.ends_in_flight(by_length)
    assert sched.schedule() == ("idle", [], 0)
    by_tokens.num_pending = by_length.num_pending = 0
    assert sched.schedule() == ("decode", [by_tokens, by_length], 1)


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_serves_on(engine, monkeypatch):
    """The third decode step raises while the second is in flight: the request ends with an error
    naming the failure after the tokens read before it (the in-flight step's token is dropped), and
    the next request gets its full output."""
    launch, calls = engine.runner.decode, []

    def failing_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return launch(*args)
    monkeypatch.setattr(engine.runner, "decode", failing_third)
    fresh = LLMEngine(engine.config, runner=engine.runner)
    fresh.start()
    try:
        failed = fresh.generate("a b c", SamplingParams(max_tokens=8, temperature=0.0))
        served = fresh.generate("a b c", SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        fresh.shutdown()
    assert failed["finish_reason"] == "error" and "device fell over" in failed["error"]
    assert len(failed["token_ids"]) == 2  # the prefill's token and the first decode step's
    assert served["token_ids"][:2] == failed["token_ids"] and len(served["token_ids"]) == 8


def test_each_busy_period_logs_the_idle_time_before_it_and_its_first_requests_wait(engine, caplog):
    """A served run at concurrency 1 is one busy period per request: the idle time before each is
    the round trip outside the engine (the response's way out, the next request's way in)."""
    fresh = LLMEngine(engine.config, runner=engine.runner)
    fresh.start()
    try:
        with caplog.at_level("INFO", logger="deepseek_v4"):
            for pause in (0.0, 0.05):
                threading.Event().wait(pause)  # the second request arrives >= 50 ms after the first ended
                fresh.generate("a b c", SamplingParams(max_tokens=3, temperature=0.0))
            threading.Event().wait(0.2)  # the loop goes idle and logs the second period
    finally:
        fresh.shutdown()
    lines = [r.getMessage() for r in caplog.records if "] busy " in r.getMessage()]
    assert len(lines) == 2, lines
    first, second = (re.search(r"idle before it (\S+)( ms)?, its first request waited ([\d.]+) ms", line) for line in lines)
    assert first.group(1) == "-"  # nothing before the first
    assert float(second.group(1)) >= 50.0 and 0.0 <= float(second.group(3)) < 50.0
    assert re.search(r"busy \d+\.\d{3} s", lines[0])  # to the millisecond
