"""Sweep the MoE kernels' tiling on a GPU: L1 and L2 times at T = 1, 8, 32, 128 (V4-Flash shape,
NVFP4), CUDA-graph timed, one table per kernel. Knobs (kernels.moe._compiled): token tiles of 8
per pass over the weights, 128-wide K blocks loaded per round, warps splitting rows and K per CTA,
a register bound (CTAs per SM), and for L1 the w1 and w3 rows in separate warps.

    python -m bench.moe_tiles [--quick] [--n-tiles 1,2] [--k-unrolls 1,2] [--warps-m 2,4]
                              [--warps-k 1,2,4] [--min-ctas 0,5,6] [--split-halves 0,1]
    python -m bench.moe_tiles --gemv [--rows-l1 1,2,4] [--rows-l2 2,4,8] [--k-unrolls 1,2,4] [--n-tiles 1,2]
                                     [--pipelined 0,1] [--prefetch-rounds 0,1,2]

--gemv sweeps the SIMT GEMV's knobs instead (rows per warp, 16-byte vectors per row and lane loaded
per round, tokens per pass, a round loaded ahead, L2's rounds hinted into the L2 cache first) at
T = 1, 4, 8, 16, cold: each time cycles through enough random routings that the experts' bytes
exceed the L2 cache.
"""
import itertools

import torch

from bench.moe_w4a16 import SHAPES
from bench.timing import cold_graph_time, graph_time, require_gpu
from kernels.cute_compile import target_arch
from kernels.moe import _compiled, _vecs, compile_kernels, dispatch_fused, pair_order, register_bound
from tests.gpu.test_moe_w4a16 import random_stacked

TOKENS = (1, 8, 32, 128)
N_TILES, K_UNROLLS, WARPS_M, WARPS_K = (1, 2), (1, 2), (2, 4), (1, 2, 4)  # the mma kernel's; gemv has one


def main(n_tiles=N_TILES, k_unrolls=K_UNROLLS, warps_m=WARPS_M, warps_k=WARPS_K, min_ctas=(None,),
         split_halves=(False,)):
    require_gpu()
    hidden, inter, n_exp, k = SHAPES["flash"]
    st = random_stacked(hidden, inter, n_exp, "nvfp4")
    compile_kernels("nvfp4", k, 10.0, num_experts=n_exp)
    arch = target_arch(torch.device("cuda"))
    cases = {}
    for t in TOKENS:
        x = torch.randn(t, hidden, device="cuda").bfloat16()
        ids = torch.rand(t, n_exp, device="cuda").topk(k, dim=-1).indices
        d = dispatch_fused(ids, n_exp)
        cases[t] = (pair_order(x), torch.rand(t * k, device="cuda"), d,
                    torch.randn(t * k, inter, device="cuda").half(), torch.empty(t * k, hidden, device="cuda"),
                    torch.empty(t * k, inter, dtype=torch.float16, device="cuda"))
    for gated in (True, False):
        print(f"\n| {'L1' if gated else 'L2'}: token tiles | K blocks per round | warps (rows x K) | min CTAs per SM "
              "| halves in separate warps | "
              + " | ".join(f"T={t} ms" for t in TOKENS) + " |")
        print("|---" * (5 + len(TOKENS)) + "|")
        variants = [("gemv", None, None, None, None, None, False)]
        variants += [("mma", *v) for v in itertools.product(n_tiles, k_unrolls, warps_m, warps_k, min_ctas,
                                                             split_halves if gated else (False,))
                     if not (v[-1] and v[3] > 1)]  # split halves exclude K splitting
        for kind, tiles, unroll, wm, wk, ctas, split in variants:
            bound = register_bound(gated, tiles, wk, split) if kind == "mma" and ctas is None else ctas
            fn = (_compiled(gated, 16, arch, "gemv", top_k=k, swiglu_limit=10.0) if kind == "gemv" else
                  _compiled(gated, 16, arch, "mma", tiles, unroll, wk, top_k=k, swiglu_limit=10.0, warps_m=wm,
                            min_ctas=bound, split_halves=split))
            times = []
            for t in TOKENS:
                xp, rw, d, h, y, h_out = cases[t]
                common = (d.sorted_slots, d.active_experts, d.active_start, d.num_active)
                if gated:
                    run = lambda: fn(_vecs(xp), _vecs(st.w13), st.s13, st.g13, rw, *common, h_out)
                else:
                    run = lambda: fn(_vecs(h), _vecs(st.w2), st.s2, st.g2.view(-1, 1), rw, *common, y)
                times.append(graph_time(run, 10))
            knobs = (f"| {kind} {tiles or ''} | {unroll or ''} | {f'{wm} x {wk}' if wm else ''} | "
                     f"{'default' if ctas is None else ctas} | {'yes' if split else ''} | ")
            print(knobs + " | ".join(f"{v:.3f}" for v in times) + " |", flush=True)


GEMV_TOKENS = (1, 4, 8, 16)


def gemv_sweep(rows_l1=(1, 2, 4), rows_l2=(2, 4, 8), k_unrolls=(1, 2, 4), token_tiles=(1,), pipelined=(False,),
               prefetch_rounds=(1,)):
    require_gpu()
    hidden, inter, n_exp, k = SHAPES["flash"]
    st = random_stacked(hidden, inter, n_exp, "nvfp4")
    arch = target_arch(torch.device("cuda"))
    expert_bytes = st.w13[0].numel() + st.s13[0].numel() + st.w2[0].numel() + st.s2[0].numel()
    cases = {}
    for t in GEMV_TOKENS:
        routings = max(2, min(16, -(-(256 << 20) // (t * k * expert_bytes))))  # past the L2 cache
        cases[t] = []
        for _ in range(routings):
            ids = torch.rand(t, n_exp, device="cuda").topk(k, dim=-1).indices
            cases[t].append((pair_order(torch.randn(t, hidden, device="cuda").bfloat16()),
                             torch.rand(t * k, device="cuda"), dispatch_fused(ids, n_exp),
                             torch.randn(t * k, inter, device="cuda").half(),
                             torch.empty(t * k, hidden, device="cuda"),
                             torch.empty(t * k, inter, dtype=torch.float16, device="cuda")))
    for gated in (True, False):
        print(f"\n| {'L1' if gated else 'L2'} GEMV: rows per warp | vectors per round | tokens per pass | "
              "a round ahead | rounds into L2 first | " + " | ".join(f"T={t} ms" for t in GEMV_TOKENS) + " |")
        print("|---" * (5 + len(GEMV_TOKENS)) + "|")
        for rows, unroll, tile, ahead, early in itertools.product(rows_l1 if gated else rows_l2, k_unrolls,
                                                                  token_tiles, pipelined,
                                                                  prefetch_rounds if not gated else (0,)):
            fn = _compiled(gated, 16, arch, "gemv", n_tiles=tile, k_unroll=unroll, top_k=k, swiglu_limit=10.0,
                           rows=rows, pipelined=ahead, prefetch_rounds=early)
            times = []
            for t in GEMV_TOKENS:
                calls = []
                for xp, rw, d, h, y, h_out in cases[t]:
                    common = (d.sorted_slots, d.active_experts, d.active_start, d.num_active)
                    if gated:
                        calls.append(lambda xp=xp, rw=rw, c=common, o=h_out:
                                     fn(_vecs(xp), _vecs(st.w13), st.s13, st.g13, rw, *c, o))
                    else:
                        calls.append(lambda h=h, rw=rw, c=common, y=y:
                                     fn(_vecs(h), _vecs(st.w2), st.s2, st.g2.view(-1, 1), rw, *c, y))
                times.append(cold_graph_time(calls))
            print(f"| {rows} | {unroll} | {tile} | {'yes' if ahead else ''} | {early} | "
                  + " | ".join(f"{v:.4f}" for v in times)
                  + " |", flush=True)


if __name__ == "__main__":
    import argparse
    import sys

    def ints(text):
        return tuple(int(v) for v in text.split(","))

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the variants around the current defaults")
    p.add_argument("--n-tiles", type=ints, default=N_TILES)
    p.add_argument("--k-unrolls", type=ints, default=K_UNROLLS)
    p.add_argument("--warps-m", type=ints, default=WARPS_M)
    p.add_argument("--warps-k", type=ints, default=WARPS_K)
    p.add_argument("--min-ctas", type=ints, default=(None,),
                   help="register bound: CTAs per SM (0: none; default: kernels.moe's choice)")
    p.add_argument("--split-halves", type=ints, default=(0,), help="L1: 0 and/or 1 (w1 and w3 rows in separate warps)")
    p.add_argument("--gemv", action="store_true", help="sweep the SIMT GEMV instead")
    p.add_argument("--rows-l1", type=ints, default=(1, 2, 4), help="--gemv: L1 rows (w1/w3 pairs) per warp")
    p.add_argument("--rows-l2", type=ints, default=(2, 4, 8), help="--gemv: L2 rows per warp")
    p.add_argument("--prefetch-rounds", type=ints, default=(1,),
                   help="--gemv, L2: rounds per warp hinted into L2 before it waits for the kernel before")
    p.add_argument("--pipelined", type=ints, default=(0,),
                   help="--gemv: 0 and/or 1 (the next round's loads issued before a round's products)")
    a = p.parse_args()
    if a.gemv:  # the GEMV's own defaults where --k-unrolls / --n-tiles were not given
        given = {arg.split("=")[0] for arg in sys.argv[1:]}
        gemv_sweep(a.rows_l1, a.rows_l2, a.k_unrolls if "--k-unrolls" in given else (1, 2, 4),
                   a.n_tiles if "--n-tiles" in given else (1,), tuple(bool(v) for v in a.pipelined),
                   a.prefetch_rounds)
    elif a.quick:
        main(n_tiles=(1,), k_unrolls=(1, 2), warps_m=(4,), warps_k=(1, 4))
    else:
        main(a.n_tiles, a.k_unrolls, a.warps_m, a.warps_k, a.min_ctas, tuple(bool(v) for v in a.split_halves))
