"""The CuTe DSL MoE runner vs its twin on the GPU (marker gpu): real V4 widths, random data."""
import pytest
import torch

from kernels.moe import StackedExperts, compile_kernels, moe_w4a16, moe_w4a16_ref
from tests.gpu import capture

pytestmark = pytest.mark.gpu

# hidden, inter, experts, top-k; "tiny" is the CPU test model's (one 128-wide K block: fewer K blocks
# than the K-splitting warps of the tensor-core kernel)
SHAPES = {"flash": (4096, 2048, 256, 6), "pro": (7168, 3072, 384, 6), "tiny": (128, 128, 16, 4)}
BOUND = 1e-2  # ||out - ref|| / ||ref||


def random_stacked(hidden, inter, n_exp, fmt, seed=0) -> StackedExperts:
    """Random, non-uniform packed weights and scales straight on the GPU (no quantization pass)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    group = 16 if fmt == "nvfp4" else 32

    def scales(rows, cols):
        if fmt == "nvfp4":  # E4M3 scales between ~2^-3 and ~2^1 (bytes 0x28..0x40), varied mantissas
            return torch.randint(0x28, 0x40, (n_exp, rows, cols // group), dtype=torch.uint8, device="cuda", generator=g)
        return torch.randint(120, 128, (n_exp, rows, cols // group), dtype=torch.uint8, device="cuda", generator=g)

    def packed(rows, cols):
        return torch.randint(0, 256, (n_exp, rows, cols // 2), dtype=torch.uint8, device="cuda", generator=g)

    g13 = (torch.rand(n_exp, 2, device="cuda", generator=g) + 0.5) * 0.02
    g2 = (torch.rand(n_exp, device="cuda", generator=g) + 0.5) * 0.02
    if fmt == "mxfp4":  # no global scale in MXFP4 (drawn anyway: the same random stream for both)
        g13, g2 = torch.ones_like(g13), torch.ones_like(g2)
    return StackedExperts(fmt, packed(2 * inter, hidden), scales(2 * inter, hidden), g13,
                          packed(hidden, inter), scales(hidden, inter), g2)


def routing(t, n_exp, k, seed=1, same=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if same:
        ids = torch.arange(k, device="cuda").expand(t, k).contiguous()
    else:
        ids = torch.rand(t, n_exp, device="cuda", generator=g).topk(k, dim=-1).indices
    w = torch.rand(t, k, device="cuda", generator=g) + 0.1
    return w / w.sum(-1, keepdim=True) * 1.5, ids


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=["nvfp4", "mxfp4"])
def fmt(request):
    compile_kernels(request.param, 6, 10.0, num_experts=256)
    compile_kernels(request.param, 6, 10.0, num_experts=384)
    compile_kernels(request.param, 4, 10.0, num_experts=16)
    return request.param


@pytest.mark.parametrize("shape", ["flash", "pro", "tiny"])
@pytest.mark.parametrize("t", [1, 3, 17, 256, 2049])
def test_runner_matches_twin(fmt, shape, t):
    hidden, inter, n_exp, k = SHAPES[shape]
    stacked = random_stacked(hidden, inter, n_exp, fmt)
    x = torch.randn(t, hidden, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).bfloat16()
    w, ids = routing(t, n_exp, k)
    out = moe_w4a16(x, w, ids, stacked, 10.0)
    ref = moe_w4a16_ref(x, w, ids, stacked, 10.0)
    assert torch.isfinite(out).all() and ref.norm() > 0
    assert rel_err(out, ref) <= BOUND


def test_every_token_on_the_same_experts(fmt):
    hidden, inter, n_exp, k = SHAPES["flash"]
    stacked = random_stacked(hidden, inter, n_exp, fmt, seed=5)
    x = torch.randn(33, hidden, device="cuda").bfloat16()
    w, ids = routing(33, n_exp, k, same=True)
    assert rel_err(moe_w4a16(x, w, ids, stacked, 10.0), moe_w4a16_ref(x, w, ids, stacked, 10.0)) <= BOUND


def test_graph_replay_recomputes_on_new_inputs_and_routings(fmt):
    hidden, inter, n_exp, k = SHAPES["flash"]
    stacked = random_stacked(hidden, inter, n_exp, fmt, seed=7)
    t = 8
    x = torch.randn(t, hidden, device="cuda").bfloat16()
    w, ids = routing(t, n_exp, k, seed=3)
    graph, out = capture(lambda: moe_w4a16(x, w, ids, stacked, 10.0))
    for seed in (11, 12):
        x.copy_(torch.randn(t, hidden, device="cuda").bfloat16())
        new_w, new_ids = routing(t, n_exp, k, seed=seed)
        w.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, moe_w4a16_ref(x, w, ids, stacked, 10.0)) <= BOUND


@pytest.mark.parametrize("t,n_exp", [(1, 256), (7, 256), (300, 256), (2049, 256), (5, 384), (300, 384), (3, 16)])
def test_fused_dispatch_matches_the_torch_twin(t, n_exp):
    """The counts, the scan over the experts (a warp's worth and more, active ones few and all) and
    the slots' places."""
    from kernels.moe import dispatch, dispatch_fused
    _, ids = routing(t, n_exp, 6 if n_exp > 16 else 4, seed=t)
    a, b = dispatch(ids, n_exp), dispatch_fused(ids, n_exp)
    assert int(a.num_active) == int(b.num_active)
    assert torch.equal(a.active_experts, b.active_experts) and torch.equal(a.active_start, b.active_start)
    for j in range(int(a.num_active)):
        lo, hi = int(a.active_start[j]), int(a.active_start[j + 1])
        assert sorted(a.sorted_slots[lo:hi].tolist()) == sorted(b.sorted_slots[lo:hi].tolist())


LOADED_RUN = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, format='%(message)s')
from kernels.moe import moe_w4a16
from tests.gpu.test_moe_w4a16 import random_stacked, routing
stacked = random_stacked(128, 128, 16, "nvfp4")
x = torch.randn(40, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
w, ids = routing(40, 16, 4)
torch.save(moe_w4a16(x, w, ids, stacked, 10.0).cpu(), sys.argv[1])
"""


def test_kernels_loaded_from_the_disk_cache_compute_what_compiled_ones_do(tmp_path):
    """A restart loads the kernels a first process compiled (kernels/cute_compile.py) and they give
    bit for bit the same MoE output (T = 40: GEMV-free tensor-core and dispatch kernels)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "CUTE_DSL_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for i in range(2):
        out = tmp_path / f"y{i}.pt"
        run = subprocess.run([sys.executable, "-c", LOADED_RUN, str(out)], capture_output=True, text=True,
                             env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append((run.stderr, torch.load(out)))
    assert "compiled grouped_mma" in runs[0][0] and "loaded grouped_mma" in runs[1][0]
    assert "compiled" not in runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("fmt_name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("t", [3, 40, 256])
def test_l1_with_halves_in_separate_warps_gives_the_same_h(fmt_name, t):
    """The split_halves L1 variant (w1 and w3 rows in two warps, the w3 sums handed over in shared
    memory; the default, with its register bound) runs each half's MMAs in the same order as the
    joined one: h bit for bit the same."""
    from kernels.cute_compile import target_arch
    from kernels.moe import L1_MIN_CTAS, _compiled, _vecs, dispatch_fused, pair_order
    hidden, inter, n_exp, k = SHAPES["flash"]
    st = random_stacked(hidden, inter, n_exp, fmt_name, seed=t)
    group = 16 if fmt_name == "nvfp4" else 32
    x = torch.randn(t, hidden, device="cuda", generator=torch.Generator(device="cuda").manual_seed(t))
    w, ids = routing(t, n_exp, k, seed=t)
    d = dispatch_fused(ids, n_exp)
    hs = []
    for split in (False, True):
        kernel = _compiled(True, group, target_arch(x.device), "mma", 1, 2, 1, top_k=k, swiglu_limit=10.0,
                           split_halves=split, min_ctas=L1_MIN_CTAS if split else 0)
        h = torch.full((t * k, inter), float("nan"), dtype=torch.float16, device="cuda")
        kernel(_vecs(pair_order(x)), _vecs(st.w13), st.s13, st.g13, w.reshape(-1).float().contiguous(),
               d.sorted_slots, d.active_experts, d.active_start, d.num_active, h)
        hs.append(h)
    assert not hs[0].isnan().any() and torch.equal(hs[0], hs[1])


GEMV_TILINGS = [dict(rows=1, k_unroll=1), dict(rows=2, k_unroll=4), dict(rows=4, k_unroll=1), dict(rows=8, k_unroll=2),
                dict(rows=4, k_unroll=2, n_tiles=2), dict(rows=2, k_unroll=1, warps_k=4),
                dict(rows=4, k_unroll=1, warps_k=4, n_tiles=4),  # K split and token tiles together
                # the next round's loads ahead of a round's products: an even and an odd number of
                # rounds per warp (Flash L1 / L2 at 2 vectors per round), and with K split
                dict(rows=2, k_unroll=1, pipelined=True), dict(rows=4, k_unroll=2, n_tiles=2, pipelined=True),
                dict(rows=4, k_unroll=1, warps_k=2, pipelined=True)]


@pytest.mark.parametrize("fmt_name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("tiling", GEMV_TILINGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_every_gemv_tiling_computes_the_default_ones_result(fmt_name, tiling):
    """Rows per warp, vectors per round, tokens per pass and loading a round ahead change no lane's
    order of summation:
    L1's h and L2's y bit for bit the default's. K split between warps adds their sums in a fixed
    order: within fp32 rounding. T = 8 (experts with one and with two tokens) on the tiny shape's
    single K block too, where a round runs past the row's end."""
    from kernels.cute_compile import target_arch
    from kernels.moe import _compiled, _vecs, dispatch_fused, pair_order
    group = 16 if fmt_name == "nvfp4" else 32
    for shape in ("flash", "tiny"):
        hidden, inter, n_exp, k = SHAPES[shape]
        st = random_stacked(hidden, inter, n_exp, fmt_name, seed=3)
        t = 8
        x = torch.randn(t, hidden, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
        w, ids = routing(t, n_exp, k, seed=5)
        d = dispatch_fused(ids, n_exp)
        common = (w.reshape(-1).float().contiguous(), d.sorted_slots, d.active_experts, d.active_start, d.num_active)
        h_in = torch.randn(t * k, inter, device="cuda", generator=torch.Generator(device="cuda").manual_seed(6)).half()
        outs = []
        for knobs in (dict(), tiling):
            l1 = _compiled(True, group, target_arch(x.device), "gemv", top_k=k, swiglu_limit=10.0,
                           **{key: v for key, v in knobs.items() if key != "rows" or v <= 4})
            l2 = _compiled(False, group, target_arch(x.device), "gemv", **knobs)
            h = torch.full((t * k, inter), float("nan"), dtype=torch.float16, device="cuda")
            y = torch.full((t * k, hidden), float("nan"), device="cuda")
            l1(_vecs(pair_order(x)), _vecs(st.w13), st.s13, st.g13, *common, h)
            l2(_vecs(h_in), _vecs(st.w2), st.s2, st.g2.view(-1, 1), *common, y)
            outs.append((h, y))
        (h0, y0), (h1, y1) = outs
        assert not h0.isnan().any() and not y0.isnan().any()
        if tiling.get("warps_k", 1) == 1:
            assert torch.equal(h0, h1) and torch.equal(y0, y1)
        else:
            assert rel_err(h1.float(), h0.float()) < 1e-3 and rel_err(y1, y0) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_layout_kernel_is_its_twin_bit_for_bit(dtype):
    """pair_order's kernel (kernels.moe.layout_sm90) against pair_order_ref: values across f16's
    range, its subnormals and beyond it (inf), and in a CUDA graph on new inputs."""
    from kernels.moe import pair_order, pair_order_ref
    g = torch.Generator(device="cuda").manual_seed(3)
    for t, d in ((1, 128), (3, 4096), (513, 7168)):
        x = torch.randn(t, d, device="cuda", generator=g) * torch.exp2(torch.randint(-30, 18, (t, d), device="cuda",
                                                                                   generator=g).float())
        x = x.to(dtype)
        assert torch.equal(pair_order(x), pair_order_ref(x)), (t, d)
    x = torch.randn(8, 4096, device="cuda", generator=g).to(dtype)
    graph, out = capture(lambda: pair_order(x))
    for _ in range(2):
        x.copy_(torch.randn(8, 4096, device="cuda", generator=g).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, pair_order_ref(x))
