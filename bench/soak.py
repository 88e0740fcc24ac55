"""Soak benchmark (not a test): many requests at fixed concurrency against a real tritonserver.

    python bench/soak.py [--requests 500] [--concurrency 32] [--max-tokens 16] [--max-num-seqs 32]

Prints a table: requests ok / failed, output tokens/s, request latency percentiles, and the slots
still in use afterwards (must be 0)."""
from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backend.launcher import DEFAULT_REPOSITORY, TritonServer
from deepseek_v4_client import Client, SamplingParams, ServerError


def _repository(max_num_seqs: int) -> Path:
    repo = Path(tempfile.mkdtemp(prefix="soak-repo-"))
    shutil.copytree(DEFAULT_REPOSITORY, repo, dirs_exist_ok=True)
    cfg = repo / "deepseek_v4" / "config.pbtxt"
    cfg.write_text(re.sub(r'(key: "max_num_seqs", value: { string_value: )"\d+"', rf'\1"{max_num_seqs}"', cfg.read_text()))
    return repo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    a = p.parse_args()
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while servers stream tokens".split()
    with TritonServer(_repository(a.max_num_seqs)) as server:
        def one(i: int):
            prompt = " ".join(rng.choice(words) for _ in range(3 + i % 40))
            params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0 if i % 2 else 0.8, seed=i)
            client = Client(server.grpc_url if i % 2 else server.http_url, "grpc" if i % 2 else "http")
            start = time.perf_counter()
            try:
                if i % 3 == 0:
                    n = sum(len(c.token_ids) for c in client.stream(prompt, params))
                else:
                    n = len(client.generate(prompt, params).token_ids)
                return True, n, time.perf_counter() - start
            except ServerError as exc:
                return False, str(exc), time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as pool:
            results = list(pool.map(one, range(a.requests)))
        wall = time.perf_counter() - start
        time.sleep(1.0)
        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        slots = re.search(r"^dsv4_slots_in_use{[^}]*} (\S+)$", metrics, re.M).group(1)
        log_has_traceback = "Traceback" in server.log_file.read_text()
    ok = [r for r in results if r[0]]
    failed = [r for r in results if not r[0]]
    tokens = sum(r[1] for r in ok)
    lat = sorted(r[2] for r in ok)
    print(f"| requests | concurrency | ok | failed | output tok/s | req/s | p50 s | p99 s | slots after | traceback |")
    print(f"|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.requests} | {a.concurrency} | {len(ok)} | {len(failed)} | {tokens / wall:.1f} | {len(ok) / wall:.2f} | "
          f"{statistics.median(lat):.2f} | {lat[int(0.99 * (len(lat) - 1))]:.2f} | {slots} | {log_has_traceback} |")
    for r in failed[:5]:
        print("failure:", r[1])


if __name__ == "__main__":
    main()
