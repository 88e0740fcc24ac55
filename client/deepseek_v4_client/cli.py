"""deepseek-v4-client: talk to the deepseek_v4 model from the shell.

    deepseek-v4-client generate "prompt" [--stream] [--max-tokens N] [--protocol grpc|http] [--url HOST:PORT]
                       [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR ...]
    deepseek-v4-client perf-data FILE [--max-tokens N] [--prompt P ...]
"""
from __future__ import annotations

import argparse
import sys

from .client import Client
from .perf_data import write_input_data
from .types import SamplingParams, ServerError


def _params(a) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          seed=a.seed, stop=a.stop or [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="deepseek-v4-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    g.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8001 gRPC, :8000 HTTP)")
    g.add_argument("--model", default="deepseek_v4")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", nargs="*")
    d = sub.add_parser("perf-data", help="write a perf_analyzer --input-data file")
    d.add_argument("file")
    d.add_argument("--max-tokens", type=int, default=16)
    d.add_argument("--prompt", action="append")
    d.add_argument("--no-stream", action="store_true")
    a = p.parse_args(argv)
    if a.command == "perf-data":
        write_input_data(a.file, a.prompt, SamplingParams(max_tokens=a.max_tokens), not a.no_stream)
        return 0
    client = Client(a.url, a.protocol, a.model)
    try:
        if a.stream:
            last = None
            for chunk in client.stream(a.prompt, _params(a)):
                print(chunk.text, end="", flush=True)
                last = chunk
            print(f"\n[finish_reason={last.finish_reason if last else None}]")
        else:
            r = client.generate(a.prompt, _params(a))
            print(r.text)
            print(f"[finish_reason={r.finish_reason}, {r.num_input_tokens} input / {r.num_output_tokens} output tokens]")
    except ServerError as exc:
        print(f"server error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
