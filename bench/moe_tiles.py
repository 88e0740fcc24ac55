"""Sweep the MoE kernels' tiling (warps per CTA, rows per warp, token tile) on a GPU: L1 and L2
times at T = 1, 8, 32, 128 (V4-Flash shape, NVFP4), CUDA-graph timed, one table per kernel."""
import itertools

import torch

from bench.moe_w4a16 import SHAPES
from bench.timing import graph_time, require_gpu
from kernels.cute_compile import target_arch
from kernels.moe import _compiled, _vecs, compile_kernels, dispatch_fused, pair_order
from tests.gpu.test_moe_w4a16 import random_stacked

TOKENS = (1, 8, 32, 128)
# The grid swept (first run, H100: token tile 2 beat 4 everywhere; see bench/NOTES.md).
WARPS, ROWS_L1, ROWS_L2, TILES = (2, 4, 8), (1, 2, 4), (2, 4, 8), (1, 2, 4)


def main(warps=WARPS, rows_l1=ROWS_L1, rows_l2=ROWS_L2, tiles=TILES):
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
        print(f"\n{'L1' if gated else 'L2'} | warps | rows | token tile | " + " | ".join(f"T={t} ms" for t in TOKENS))
        for n_warps, rows, tile in itertools.product(warps, rows_l1 if gated else rows_l2, tiles):
            fn = _compiled(gated, k, 16, 10.0, arch, (n_warps, rows, tile))
            times = []
            for t in TOKENS:
                xp, rw, d, h, y, h_out = cases[t]
                common = (d.sorted_slots, d.active_experts, d.active_start, d.num_active)
                if gated:
                    run = lambda: fn(_vecs(xp), _vecs(st.w13), st.s13, st.g13, rw, *common, h_out)
                else:
                    run = lambda: fn(_vecs(h), _vecs(st.w2), st.s2, st.g2.view(-1, 1), rw, *common, y)
                times.append(graph_time(run, 10))
            print(f"| {n_warps} | {rows} | {tile} | " + " | ".join(f"{v:.3f}" for v in times), flush=True)


if __name__ == "__main__":
    import sys
    if "--quick" in sys.argv:  # around the current defaults
        main(warps=(4, 8), rows_l1=(2, 4), rows_l2=(4, 8), tiles=(1,))
    else:
        main()
