"""Greedy generation through the reference model, no server (a quick check of a checkpoint).

    python -m backend.generate [--checkpoint DIR] [--prompt TEXT] [--max-tokens N] [--device cpu|cuda]

Without --checkpoint it uses the tiny synthetic checkpoint, generating it on first use.
"""
from __future__ import annotations

import argparse
import time

import torch

from .checkpoint import load_checkpoint
from .model import DeepseekV4
from .synthetic import default_checkpoint
from .tokenizer import load_tokenizer


def greedy(model: DeepseekV4, prompt_ids: list[int], max_tokens: int, eos_id: int) -> list[int]:
    state = model.new_state(1, len(prompt_ids) + max_tokens)
    logits, _ = model.forward(torch.tensor([prompt_ids]), 0, [0], state)
    out = []
    for step in range(max_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        if token == eos_id:
            break
        logits, _ = model.forward(torch.tensor([[token]]), len(prompt_ids) + step, [0], state)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: tiny synthetic)")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    path = a.checkpoint or default_checkpoint()
    ck = load_checkpoint(path)
    print(f"checkpoint {path}: {dict(ck.formats)} linears by format")
    tok = load_tokenizer(ck.tokenizer_file)
    model = DeepseekV4(ck.args, ck.weights, device=a.device)
    ids = [ck.args.bos_token_id] + tok.encode(a.prompt).ids
    start = time.perf_counter()
    out = greedy(model, ids, a.max_tokens, ck.args.eos_token_id)
    dt = time.perf_counter() - start
    print(f"prompt: {a.prompt!r}\ngenerated ids: {out}\ntext: {tok.decode(out)!r}")
    print(f"{len(out)} tokens in {dt:.2f} s on {a.device}")


if __name__ == "__main__":
    main()
