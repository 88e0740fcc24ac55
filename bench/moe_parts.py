"""Where the MoE step's time goes (GPU): dispatch, L1, L2, combine, and read floors, graph-timed."""
import torch

from bench.moe_w4a16 import SHAPES
from bench.timing import graph_time, require_gpu
from kernels.cute_compile import target_arch
from kernels.moe import _vecs, compile_kernels, dispatch, dispatch_fused, moe_kernels, moe_w4a16, pair_order
from tests.gpu.test_moe_w4a16 import random_stacked


def main():
    require_gpu()
    hidden, inter, n_exp, k = SHAPES["flash"]
    st = random_stacked(hidden, inter, n_exp, "nvfp4")
    compile_kernels("nvfp4", k, 10.0, num_experts=n_exp)
    arch = target_arch(torch.device("cuda"))
    big = torch.empty(6 * 14_200_000 // 4, dtype=torch.float32, device="cuda").uniform_()
    print("read 85 MB, one sum kernel: %.3f ms" % graph_time(lambda: big.sum(), 20))
    print("copy 85 MB: %.3f ms" % graph_time(lambda: big.clone(), 20))
    for t in (1, 8, 32, 128):
        x = torch.randn(t, hidden, device="cuda").bfloat16()
        ids = torch.rand(t, n_exp, device="cuda").topk(k, dim=-1).indices
        w = torch.rand(t, k, device="cuda")
        d = dispatch(ids, n_exp)
        rw = w.reshape(-1).contiguous()
        h = torch.empty(t * k, inter, dtype=torch.float16, device="cuda")
        y = torch.empty(t * k, hidden, dtype=torch.float32, device="cuda")
        common = (d.sorted_slots, d.active_experts, d.active_start, d.num_active)
        l1, l2 = moe_kernels(st, t, k, 10.0, arch)  # the runner's own choice of variant
        parts = {
            "dispatch torch": lambda: dispatch(ids, n_exp),
            "dispatch fused": lambda: dispatch_fused(ids, n_exp),
            "L1": lambda: l1(_vecs(pair_order(x)), _vecs(st.w13), st.s13, st.g13, rw, *common, h),
            "L2": lambda: l2(_vecs(h), _vecs(st.w2), st.s2, st.g2.view(-1, 1), rw, *common, y),
            "combine": lambda: y.view(t, k, -1).sum(1),
            "whole": lambda: moe_w4a16(x, w, ids, st, 10.0),
        }
        print(f"T={t}: " + ", ".join(f"{name} {graph_time(fn, 20):.3f} ms" for name, fn in parts.items()), flush=True)


if __name__ == "__main__":
    main()
