"""Sampling benchmark (GPU, one run): the engine's batched sampler (backend.engine.sampler.sample)
vs the per-row torch loop it replaced (one stateful generator per sequence, so every sampled row
ran its own ~12 kernels), per batch size, V-sized logits, all rows sampled. Each call is timed on
the host from its start until its tokens are on the device (synchronized), as the engine pays it
after every decode step: launches included. Greedy (one argmax) is the reference row.

    python -m bench.sampling [--batch 1,8,32,128] [--vocab 129280]
"""
import argparse
import time

import torch

from backend.engine import SamplingParams
from backend.engine.sampler import sample
from bench.timing import require_gpu


def per_row_sample(logits, params, generators):
    """The sampler before the batched one: a loop over sampled rows, each on its own generator."""
    tokens = logits.argmax(-1).clone()
    for b, p in enumerate(params):
        row = logits[b] / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = row.softmax(-1)
        tokens[b] = (probs / torch.empty_like(probs).exponential_(generator=generators[b])).argmax()
    return tokens


def host_ms(fn, iters: int = 20) -> float:
    """Median wall ms of fn() until its work on the device is done."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8,32,128")
    p.add_argument("--vocab", type=int, default=129280)
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = {"temperature 0.8": SamplingParams(temperature=0.8),
             "top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
             "top_k 50, top_p 0.95": SamplingParams(temperature=0.8, top_k=50, top_p=0.95)}
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, vocab {a.vocab}, all rows sampled")
    print("| batch | params | greedy ms | per-row loop ms | batched ms | loop / batched |")
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in a.batch.split(",")):
        logits = torch.randn(batch, a.vocab, device="cuda", generator=g) * 3
        greedy = host_ms(lambda: sample(logits, [SamplingParams(temperature=0.0)] * batch, [0] * batch,
                                        [0] * batch, [[]] * batch))
        for name, params in cases.items():
            gens = [torch.Generator(device="cuda").manual_seed(b) for b in range(batch)]
            loop = host_ms(lambda: per_row_sample(logits, [params] * batch, gens))
            batched = host_ms(lambda: sample(logits, [params] * batch, list(range(batch)), [5] * batch,
                                             [[]] * batch))
            print(f"| {batch} | {name} | {greedy:.3f} | {loop:.3f} | {batched:.3f} | {loop / batched:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
