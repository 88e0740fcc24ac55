"""MoE W4A16 benchmark (GPU): our runner vs torch BF16 grouped GEMM vs the memory-bandwidth floor.

    python -m bench.moe_w4a16 [--shapes flash,pro] [--tokens 1,8,32,128,512,2048] [--fmt nvfp4]

Everything is timed in one run on one GPU, each as CUDA-graph replays (median of --iters):
- ours:  kernels.moe.moe_w4a16 (routing dispatch + L1 + L2 + combine)
- bf16:  torch._grouped_mm on BF16 experts of the same shapes, with the token sort on the device
- floor: a streaming read of exactly the expert bytes the step must touch (the distinct experts'
         NVFP4 weights and scales), measured with a plain reduction kernel in the same run
"""
from __future__ import annotations

import argparse

import torch

from bench.timing import graph_time, require_gpu
from kernels.moe import compile_kernels, moe_w4a16

SHAPES = {"flash": (4096, 2048, 256, 6), "pro": (7168, 3072, 384, 6)}


def bf16_moe(x, w, ids, w13, w2, n_exp):
    """BF16 baseline: sort slots by expert on the device, two grouped GEMMs, SwiGLU, combine."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_exp, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // k]
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0) * w.reshape(-1)[order, None]).bfloat16()
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    out = torch.zeros(t * k, x.shape[1], dtype=torch.float32, device=x.device)
    out[order] = y.float()
    return out.view(t, k, -1).sum(1)


def run(shape: str, tokens: list[int], fmt: str, iters: int) -> None:
    hidden, inter, n_exp, k = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    from tests.gpu.test_moe_w4a16 import random_stacked
    stacked = random_stacked(hidden, inter, n_exp, fmt)
    compile_kernels(fmt, k, 10.0, num_experts=n_exp)
    w13 = torch.randn(n_exp, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(n_exp, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    per_expert = [t[0].numel() for t in (stacked.w13, stacked.s13, stacked.w2, stacked.s2)]
    bytes_per_expert = sum(per_expert)
    # The floor reads exactly the bytes of `distinct` experts, in as few (large) kernels as the stacks allow.
    regions = [t.view(-1) for t in (stacked.w13, stacked.w2, stacked.s13, stacked.s2)]
    print(f"\n{shape} ({hidden}x{inter}, {n_exp} experts, top-{k}, {fmt}): {bytes_per_expert / 1e6:.1f} MB per expert")
    print("| T | experts | ours ms | bf16 ms | floor ms | bf16 / ours | ours / floor |")
    print("|---|---|---|---|---|---|---|")
    for t in tokens:
        x = torch.randn(t, hidden, device="cuda", generator=g).bfloat16()
        ids = torch.rand(t, n_exp, device="cuda", generator=g).topk(k, dim=-1).indices
        w = torch.rand(t, k, device="cuda", generator=g) + 0.1
        distinct = int(ids.unique().numel())
        need, reads = distinct * bytes_per_expert, []
        for region in regions:
            take = min(need, region.numel()) // 4 * 4
            if take:
                reads.append(region[:take].view(torch.float32))
            need -= take
        ours = graph_time(lambda: moe_w4a16(x, w, ids, stacked, 10.0), iters)
        try:
            base = graph_time(lambda: bf16_moe(x, w, ids, w13, w2, n_exp), iters)
        except Exception as exc:  # report rather than hide
            print(f"bf16 baseline failed at T={t}: {exc}")
            base = float("nan")
        floor = graph_time(lambda: [r.sum() for r in reads], iters)
        print(f"| {t} | {distinct} | {ours:.3f} | {base:.3f} | {floor:.3f} | {base / ours:.2f}x | {ours / floor:.2f}x |",
              flush=True)
    del w13, w2, stacked
    torch.cuda.empty_cache()


def main() -> None:
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="flash,pro")
    p.add_argument("--tokens", default="1,8,32,128,512,2048")
    p.add_argument("--fmt", default="nvfp4", choices=("nvfp4", "mxfp4"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--l1-halves", choices=("split", "joined"), default="split",
                   help="L1's w1 and w3 rows in separate warps (the default, kernels.moe.L1_SPLIT_HALVES) or in one")
    a = p.parse_args()
    import kernels.moe
    kernels.moe.L1_SPLIT_HALVES = a.l1_halves == "split"
    print(f"L1: w1 and w3 rows in {'separate warps' if kernels.moe.L1_SPLIT_HALVES else 'one warp'}")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for shape in a.shapes.split(","):
        run(shape, [int(t) for t in a.tokens.split(",")], a.fmt, a.iters)


if __name__ == "__main__":
    main()
