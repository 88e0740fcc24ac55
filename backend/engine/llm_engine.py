"""The engine: a request queue and a loop thread whose step() is schedule -> run -> postprocess.

Decode steps overlap with the host: step() queues decode step N+1 on the device (feeding it the
tokens step N sampled there) before it reads step N's tokens and handles their outputs, so
detokenizing, stop checks and callbacks run while the device computes.

Other threads call `add_request` (validated at once, errors raised to the caller) and `abort`;
outputs go to each request's callback, on the engine thread, so callbacks must not block.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .sampler import SampledTokens
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status

log = logging.getLogger("deepseek_v4")


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full: the request is refused at once."""


@dataclass
class RequestOutput:
    request_id: object
    text: str                   # new text since the previous output
    token_ids: list[int]        # new token ids since the previous output
    finished: bool
    finish_reason: str | None   # stop | length | abort | error
    num_input_tokens: int
    num_output_tokens: int
    error: str | None = None


@dataclass
class EngineStats:
    generated_tokens: int = 0
    requests_running: int = 0
    requests_waiting: int = 0
    slots_in_use: int = 0
    time_per_output_token: float = 0.0  # seconds, mean over the last decode steps


@dataclass
class BusyPeriod:
    """Where the engine thread's time went since it last had nothing to do: logged when it goes
    idle, so a benchmark sees the split (GPU steps vs host work) of each load it applied."""
    start: float = 0.0
    idle_before: float | None = None  # the engine thread's idle time before this period (None: the first)
    first_wait: float = 0.0  # from the arrival (add_request) of the first request it ran to its start
    decode_steps: int = 0
    decode_rows: int = 0
    decode_seconds: float = 0.0   # queueing steps and waiting for their tokens
    prefill_chunks: int = 0
    prefill_seconds: float = 0.0
    output_seconds: float = 0.0   # detokenizing, stop checks, callbacks

    def summary(self) -> str:
        wall = time.perf_counter() - self.start
        other = wall - self.decode_seconds - self.prefill_seconds - self.output_seconds
        steps = max(self.decode_steps, 1)
        idle = "-" if self.idle_before is None else f"{1e3 * self.idle_before:.2f} ms"
        return (f"[deepseek_v4] busy {wall:.3f} s: {self.decode_steps} decode steps (mean batch "
                f"{self.decode_rows / steps:.1f}, {1e3 * self.decode_seconds / steps:.2f} ms each), "
                f"{self.prefill_chunks} prefill chunks ({self.prefill_seconds:.2f} s), output handling "
                f"{1e3 * self.output_seconds / steps:.2f} ms per decode step, other {other:.3f} s; "
                f"idle before it {idle}, its first request waited {1e3 * self.first_wait:.2f} ms")


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None):
        self.config = config
        self.runner = runner or ModelRunner(config)
        self.tokenizer = self.runner.tokenizer
        self.eos_id = self.runner.args.eos_token_id
        self.bos_id = self.runner.args.bos_token_id
        prompt_tokens = config.decode_prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = 32 if self.runner.graphs is not None else 0
        self.scheduler = Scheduler(config.max_num_seqs, config.prefill_chunk, prompt_tokens, config.max_model_len)
        self.stats = EngineStats()
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending = 0  # accepted, not yet seen by the loop
        self._sequences: dict[object, tuple[Sequence, IncrementalDetokenizer, Callable]] = {}
        self._thread: threading.Thread | None = None
        self._busy: BusyPeriod | None = None
        self._idle_since: float | None = None  # when the last busy period ended
        self._in_flight: tuple[list[Sequence], SampledTokens] | None = None  # a decode step not yet read

    # --- public API (any thread) ------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return [self.bos_id] + self.tokenizer.encode(prompt).ids

    def add_request(self, prompt: str | list[int], params: SamplingParams, on_output: Callable[[RequestOutput], None],
                    request_id=None) -> object:
        """Queue a request. Raises ValueError (bad input, naming the field) or QueueFullError."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids or (isinstance(prompt, str) and not prompt):
            raise ValueError("prompt is empty")
        vocab = self.runner.args.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"input_ids must be in 0..{vocab - 1}")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.config.max_model_len} "
                             "(prompt and at least one output token must fit)")
        params.validate(self.config.max_model_len)
        seq = Sequence(ids, params, request_id)
        seq.arrival_time = time.perf_counter()
        with self._lock:
            if self._pending + len(self.scheduler.waiting) >= self.config.max_queue:
                raise QueueFullError(f"server busy: {self.config.max_queue} requests already waiting")
            self._pending += 1
        self._inbox.put(("add", seq, on_output))
        self._wake.set()
        return seq.request_id

    def abort(self, request_id) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="deepseek-v4-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish every request (reason 'abort') and stop the loop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loop (engine thread) -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if self.scheduler.num_unfinished == 0:
                self._read_in_flight()  # its sequences all finished (aborted): drops their tokens
                if self._busy is not None:
                    log.info(self._busy.summary())
                    self._busy, self._idle_since = None, time.perf_counter()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.step()
        self._drain_inbox()
        for seq, _, _ in list(self._sequences.values()):
            self._finish(seq, "abort", error="server shutting down")

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item, callback = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                self._sequences[item.request_id] = (item, IncrementalDetokenizer(self.tokenizer, item.params.stop), callback)
                self.scheduler.add(item)
            elif item in self._sequences:
                self._finish(self._sequences[item][0], "abort")
        self._update_stats()

    def step(self) -> None:
        kind, seqs, n = self.scheduler.schedule()
        start = time.perf_counter()
        if self._busy is None:  # at concurrency 1, the idle time before is the round trip outside the engine
            self._busy = BusyPeriod(start, None if self._idle_since is None else start - self._idle_since,
                                    start - min((s.arrival_time for s in seqs), default=start))
        busy = self._busy
        if kind == "decode":
            launched = self._launch_decode(seqs)
            self._read_in_flight()
            self._in_flight = launched
            seconds, mean = time.perf_counter() - start, self.stats.time_per_output_token
            self.stats.time_per_output_token = 0.9 * mean + 0.1 * seconds if mean else seconds
        else:
            self._read_in_flight()  # a prefill chunk runs after every queued step, on settled sequences
            if kind == "prefill":
                self._prefill(seqs[0], n)
                busy.prefill_chunks += 1
                busy.prefill_seconds += time.perf_counter() - start
        self._update_stats()

    def _prefill(self, seq: Sequence, n: int) -> None:
        try:
            logits = self.runner.prefill(seq, n)
            self.scheduler.prefilled(seq, n)
            if seq.num_prefilled < len(seq.prompt_ids):
                return
            tokens = self.runner.sample(logits, [seq], [self._banned(seq)]).result()
            self._append([seq], tokens)
        except Exception as exc:  # the engine keeps serving the others
            self._fail("prefill", [seq], exc)

    def _launch_decode(self, seqs: list[Sequence]) -> tuple[list[Sequence], SampledTokens] | None:
        """Queues one decode step and the sampling of its tokens; -> (sampled sequences, tokens)."""
        start = time.perf_counter()
        previous = self._in_flight[1] if self._in_flight is not None else None
        try:
            logits = self.runner.decode(seqs, previous)
            for seq in seqs:
                if seq.status == Status.PREFILLING:  # fed a prompt token
                    self.scheduler.prefilled(seq, 1)
            # Sample the sequences that now need a token (the ones still in their prompts don't,
            # nor does their count of draws advance).
            rows = [i for i, seq in enumerate(seqs) if seq.status == Status.RUNNING]
            ready = [seqs[i] for i in rows]
            tokens = self.runner.sample(logits, ready, [self._banned(s) for s in ready],
                                        rows if len(rows) < len(seqs) else None) if ready else None
        except Exception as exc:
            self._fail("decode", seqs, exc)
            return None
        for row, seq in enumerate(ready):
            seq.num_pending += 1
            seq.pending_row = row
        self._busy.decode_steps += 1
        self._busy.decode_rows += len(seqs)
        self._busy.decode_seconds += time.perf_counter() - start
        return (ready, tokens) if ready else None

    def _read_in_flight(self) -> None:
        """Waits for the queued decode step's tokens (not for any step queued after it) and hands
        them out. A sequence that finished meanwhile (a stop, an abort) drops its token."""
        if self._in_flight is None:
            return
        seqs, sampled = self._in_flight
        self._in_flight = None
        start = time.perf_counter()
        try:
            tokens = sampled.result()
            for seq in seqs:
                seq.num_pending -= 1
            if self._busy is not None:
                self._busy.decode_seconds += time.perf_counter() - start
            live = [(seq, token) for seq, token in zip(seqs, tokens) if not seq.is_finished]
            self._append([seq for seq, _ in live], [token for _, token in live])
        except Exception as exc:  # the engine keeps serving the others
            self._fail("decode", [seq for seq in seqs if not seq.is_finished], exc)

    def _fail(self, kind: str, seqs: list[Sequence], exc: Exception) -> None:
        log.error("[deepseek_v4] %s step failed: %s: %s", kind, type(exc).__name__, exc)
        for seq in seqs:
            self._finish(seq, "error", error=f"internal error: {type(exc).__name__}: {exc}")

    def _banned(self, seq: Sequence) -> list[int]:
        """Stop tokens masked out until min_tokens outputs exist."""
        if len(seq.output_ids) >= seq.params.min_tokens:
            return []
        return ([] if seq.params.ignore_eos else [self.eos_id]) + list(seq.params.stop_token_ids)

    def _append(self, seqs: list[Sequence], tokens: list[int]) -> None:
        start = time.perf_counter()
        self._append_outputs(seqs, tokens)
        if self._busy is not None:
            self._busy.output_seconds += time.perf_counter() - start

    def _append_outputs(self, seqs: list[Sequence], tokens: list[int]) -> None:
        self.stats.generated_tokens += len(tokens)
        for seq, token in zip(seqs, tokens):
            seq.output_ids.append(token)
            _, detok, callback = self._sequences[seq.request_id]
            p = seq.params
            stop_token = (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids
            text_ids = seq.output_ids[:-1] if stop_token else seq.output_ids
            delta, stop_string = detok.update(text_ids)
            reason = None
            if stop_token or stop_string:
                reason = "stop"
            elif seq.at_length_limit(self.config.max_model_len):
                reason = "length"
            if reason is None:
                self._emit(seq, callback, delta, [token], False, None)
            else:
                self._finish(seq, reason, delta + detok.flush(), [token])

    def _finish(self, seq: Sequence, reason: str, text: str = "", token_ids=(), error: str | None = None) -> None:
        entry = self._sequences.pop(seq.request_id, None)
        self.scheduler.finish(seq, reason)
        self._update_stats()  # before the final output: a caller that sees it no longer sees the request counted
        if entry is not None:
            self._emit(seq, entry[2], text, list(token_ids), True, reason, error)

    def _emit(self, seq, callback, text, token_ids, finished, reason, error=None) -> None:
        out = RequestOutput(seq.request_id, text, token_ids, finished, reason, len(seq.prompt_ids),
                            len(seq.output_ids), error)
        try:
            callback(out)
        except Exception as exc:
            log.error("[deepseek_v4] output callback of request %s failed: %s", seq.request_id, exc)

    def _update_stats(self) -> None:
        s = self.scheduler
        self.stats.requests_running = len(s.running) + len(s.prefilling)
        self.stats.requests_waiting = len(s.waiting) + self._pending
        self.stats.slots_in_use = s.slots.num_used

    # --- convenience for scripts and tests ------------------------------------------------------
    def generate(self, prompt: str | list[int], params: SamplingParams, timeout: float = 300.0) -> dict:
        """Blocking: the whole result of one request (the loop must be running)."""
        done = threading.Event()
        result = {"text": "", "token_ids": [], "finish_reason": None, "error": None}

        def collect(out: RequestOutput):
            result["text"] += out.text
            result["token_ids"] += out.token_ids
            if out.finished:
                result.update(finish_reason=out.finish_reason, error=out.error)
                done.set()

        self.add_request(prompt, params, collect)
        if not done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return result
