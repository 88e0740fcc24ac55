"""Served decode on a GPU through the real tritonserver (GPU, one run): a flash-shaped checkpoint
(real V4-Flash widths, `--layers` layers) generated on the GPU; the engine in-process, and the
same engine behind tritonserver (nvidia-pytriton) measured with perf_analyzer over gRPC
streaming. Prints output tokens/s and per-token latency per concurrency, the server's overhead
against the in-process engine, and the start-up times: the first server start compiles every
kernel into an empty compile cache, the engine and the second start load them.

    python -m bench.serve_gpu [--layers 4] [--concurrency 1,8,32] [--max-tokens 32] [--pieces compiled|eager]
                              [--sender-threads 1,2]
"""
import argparse
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from backend.engine import EngineConfig, LLMEngine, SamplingParams
from backend.launcher import DEFAULT_REPOSITORY, TritonServer, perf_analyzer
from backend.synthetic import generate
from deepseek_v4_client import write_input_data
from deepseek_v4_client import SamplingParams as ClientParams
from bench.timing import require_gpu

PROMPTS = ["Hello, how are you?", "Write a short poem about the sea.", "Explain mixture of experts.",
           "List three prime numbers.", "What is the capital of France?"]


class BusyLines(logging.Handler):
    """Collects the engine's per-busy-period time split (LLMEngine logs one each time it goes idle)."""
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if "busy" in record.getMessage():
            self.lines.append(record.getMessage())


def requests_per_run(concurrency: int) -> int:
    """Requests per measurement, the same in-process and through the server: at least 32, so that
    concurrency 1's cost per request in the server (~1.6 ms more than in-process, of ~46 ms, on an
    H200) is averaged over more than a handful (with 8, concurrency 1's server / engine ratio read
    0.86-0.97 from session to session)."""
    return max(2 * concurrency, 32)


def engine_run(path, concurrency, max_tokens, max_num_seqs, compile_attention):
    busy = BusyLines()
    logging.getLogger("deepseek_v4").addHandler(busy)
    logging.getLogger("deepseek_v4").setLevel(logging.INFO)
    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(checkpoint=str(path), device="cuda", max_num_seqs=max_num_seqs, max_model_len=256,
                                    compile_attention=compile_attention))
    engine.start()
    ready = time.perf_counter() - start
    rates = {}
    try:
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0)
        for c in concurrency:
            n = requests_per_run(c)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                outs = list(pool.map(lambda i: engine.generate(PROMPTS[i % len(PROMPTS)], params), range(n)))
            rates[c] = sum(len(o["token_ids"]) for o in outs) / (time.perf_counter() - t0)
            time.sleep(0.2)  # the engine goes idle and logs this load's time split
            print(f"engine, concurrency {c}:", busy.lines[-1] if busy.lines else "(no time split logged)", flush=True)
    finally:
        engine.shutdown()
        logging.getLogger("deepseek_v4").removeHandler(busy)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return ready, rates


def stream_text(url: str, prompt: str) -> str:
    """HTTP generate_stream with the standard library (server-sent events), so the check needs no
    client packages on the GPU host."""
    body = json.dumps({"text_input": prompt, "stream": True,
                       "sampling_parameters": json.dumps({"max_tokens": 16})}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/deepseek_v4/generate_stream", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        events = [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]
    return "".join(e.get("text_output", "") for e in events)


def repository(path, max_num_seqs, compile_attention) -> Path:
    repo = Path(tempfile.mkdtemp(prefix="gpu-repo-"))
    shutil.copytree(DEFAULT_REPOSITORY, repo, dirs_exist_ok=True)
    for key, value in (("checkpoint", path), ("max_num_seqs", max_num_seqs), ("max_model_len", 256),
                       ("compile_attention", str(compile_attention).lower())):
        set_parameter(repo, key, value)
    return repo


def set_parameter(repo: Path, key: str, value) -> None:
    """Sets one of config.pbtxt's parameters in the repository copy."""
    cfg = repo / "deepseek_v4" / "config.pbtxt"
    text, found = re.subn(rf'(key: "{key}", value: {{ string_value: )"[^"]*"', rf'\g<1>"{value}"', cfg.read_text())
    if found != 1:
        raise ValueError(f"config.pbtxt has no parameter {key!r}")
    cfg.write_text(text)


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pieces", choices=("compiled", "eager"), default="compiled",
                   help="the torch pieces between the runners through torch.compile (compile_attention, the default) or eager")
    p.add_argument("--sender-threads", default="1",
                   help="model.py's sender_threads, comma-separated: a warm server start and a table each")
    a = p.parse_args()
    a.compile_attention = a.pieces == "compiled"
    conc = [int(c) for c in a.concurrency.split(",")]
    max_seqs = max(conc)
    work = Path(tempfile.mkdtemp(prefix="serve-gpu-"))
    try:
        run(a, conc, max_seqs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the checkpoint is ~20 GB


def run(a, conc, max_seqs, work: Path):
    # Empty compile caches of this run's own (the runners' kernels, and Inductor's code for the
    # compiled pieces): the first server start compiles everything, the engine and the second
    # start load it (kernels/cute_compile.py).
    cache = work / "compile-cache"
    caches = {"CUTE_DSL_CACHE_DIR": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}
    os.environ.update(caches)
    path = generate(work / "ckpt", flavor="nvidia-nvfp4", size="flash-shaped", layers=a.layers, device="cuda")
    print(f"GPU: {torch.cuda.get_device_name()}; flash-shaped nvidia-nvfp4, {a.layers} layers, "
          f"torch pieces {'compiled' if a.compile_attention else 'eager'}", flush=True)
    repo = repository(path, max_seqs, a.compile_attention)
    data = work / "input.json"
    write_input_data(data, PROMPTS, ClientParams(max_tokens=a.max_tokens, min_tokens=a.max_tokens, temperature=0.0))
    cmd, env = perf_analyzer()
    engine_rates = {}
    starts = [("first (empty compile cache)", None)] + [(f"warm compile cache, {n} sender thread(s)", n)
                                                          for n in (int(n) for n in a.sender_threads.split(","))]
    for attempt, threads in starts:
        if threads is not None:
            set_parameter(repo, "sender_threads", threads)
        t0 = time.perf_counter()
        server = TritonServer(repo, startup_timeout=600, extra_env=caches).start()
        print(f"tritonserver {attempt} start: ready in {time.perf_counter() - t0:.1f} s "
              f"({len(list(cache.glob('*.o')))} kernels in the cache)", flush=True)
        if threads is None:  # the first start only times the compilation
            server.stop()
            engine_ready, engine_rates = engine_run(path, conc, a.max_tokens, max_seqs, a.compile_attention)
            print(f"engine in-process: ready in {engine_ready:.1f} s (warm compile cache)", flush=True)
            continue
        try:
            print("streamed:", repr(stream_text(server.http_url, "The quick brown fox"))[:120], flush=True)
            print("| concurrency | engine tok/s | server tok/s | server / engine | per-token latency ms | errors |")
            print("|---|---|---|---|---|---|")
            for c in conc:
                run = subprocess.run(cmd + ["-m", "deepseek_v4", "-u", server.grpc_url, "-i", "grpc", "--streaming",
                                            "--input-data", str(data), "--concurrency-range", str(c),
                                            "--measurement-mode", "count_windows", "--measurement-request-count",
                                            str(requests_per_run(c)), "--stability-percentage", "50", "--max-trials", "4"],
                                     env=env, capture_output=True, text=True, timeout=600)
                thr = re.search(r"Throughput: ([\d.]+) infer/sec", run.stdout)
                lat = re.search(r"Avg latency: (\d+) usec", run.stdout)
                errors = "none" if run.returncode == 0 and "error" not in run.stdout.lower() else run.stdout[-300:]
                if thr and lat:
                    # perf_analyzer 2.51 counts requests (each streams exactly max_tokens tokens, as
                    # min_tokens = max_tokens) and times a request to its final response.
                    tok = float(thr.group(1)) * a.max_tokens
                    print(f"| {c} | {engine_rates[c]:.1f} | {tok:.1f} | {tok / engine_rates[c]:.2f} | "
                          f"{int(lat.group(1)) / 1e3 / a.max_tokens:.2f} | {errors} |", flush=True)
                else:
                    print(f"| {c} | {engine_rates[c]:.1f} | ? | ? | ? | {run.stdout[-400:]} {run.stderr[-400:]} |")
        finally:
            server.stop()
            log_text = server.log_file.read_text()
            print("server log has a traceback:", "Traceback" in log_text)
            print("server engine time splits (one per busy period, warm-up and the streamed check first):")
            for line in log_text.splitlines():
                if "] busy " in line:
                    print("  ", line[line.index("busy"):])


if __name__ == "__main__":
    main()
