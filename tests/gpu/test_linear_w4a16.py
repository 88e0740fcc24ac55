"""Dense W4A16 runner vs its twin on the GPU (marker gpu), every V4 projection shape."""
import pytest
import torch

from kernels.formats import mxfp4_to_nvfp4, quantize_mxfp4
from kernels.linear import linear_w4a16, linear_w4a16_ref
from tests.gpu import capture

pytestmark = pytest.mark.gpu

# (out, in) of each V4-Flash and V4-Pro projection that an all-NVFP4 checkpoint quantizes.
SHAPES = {
    "flash.wq_a": (1024, 4096), "flash.wq_b": (32768, 1024), "flash.wkv": (512, 4096), "flash.wo_b": (4096, 8192),
    "flash.wo_a_group": (1024, 4096), "flash.shared_w13": (2048, 4096), "flash.shared_w2": (4096, 2048),
    "flash.indexer_wq_b": (8192, 1024),
    "pro.wq_a": (1536, 7168), "pro.wq_b": (65536, 1536), "pro.wkv": (512, 7168), "pro.wo_b": (7168, 16384),
    "pro.shared_w13": (3072, 7168), "pro.shared_w2": (7168, 3072),
}


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("name", SHAPES)
def test_dense_runner_matches_twin(fmt, name):
    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = quantize_mxfp4(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5)
    w = mxfp4_to_nvfp4(w) if fmt == "nvfp4" else w
    # The GEMV at 1 and 2 tokens, mma.sync up to 8, the wgmma kernel up to 32, the MoE's tiling above
    # (kernels.linear.w4a16.dense_plan); bf16 x read as rows where the plan says, fp32 x through pair_order.
    for t in (1, 2, 7, 16, 29, 64, 513):
        x = torch.randn(t, k, device="cuda", generator=g).bfloat16()
        out, ref = linear_w4a16(x, w), linear_w4a16_ref(x, w)
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-2, (name, t)
        # fp32 x holding the same values rounds to the same f16 activations: the same bits out
        assert torch.equal(linear_w4a16(x.float(), w), out), (name, t)
        x = torch.randn(t, k, device="cuda", generator=g)
        out, ref = linear_w4a16(x, w), linear_w4a16_ref(x, w)
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-2, (name, t, "fp32")


@pytest.mark.parametrize("t", [8, 24])  # mma.sync; wgmma with K split (its counters reset for the next replay)
def test_dense_graph_replay_recomputes(t):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = mxfp4_to_nvfp4(quantize_mxfp4(torch.randn(2048, 4096, device="cuda", generator=g) / 64))
    x = torch.randn(t, 4096, device="cuda", generator=g).bfloat16()
    graph, out = capture(lambda: linear_w4a16(x, w))
    for _ in range(2):
        x.copy_(torch.randn(t, 4096, device="cuda", generator=g).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        ref = linear_w4a16_ref(x, w)
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_every_wgmma_variant_matches_twin(fmt):
    """Each token tile, K split and consumer count of the wgmma kernel (kernels.linear.w4a16.wgmma_variants),
    forced on Flash wo_b, at a token count that leaves part of the tile empty."""
    from kernels.linear.w4a16 import wgmma_variants
    g = torch.Generator(device="cuda").manual_seed(7)
    w = quantize_mxfp4(torch.randn(4096, 8192, device="cuda", generator=g) * 8192 ** -0.5)
    w = mxfp4_to_nvfp4(w) if fmt == "nvfp4" else w
    for plan in wgmma_variants():
        x = torch.randn(plan["tile_n"] - 3, 8192, device="cuda", generator=g).bfloat16()
        out, ref = linear_w4a16(x, w, kernel=plan), linear_w4a16_ref(x, w)
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-2, plan


# Block-diagonal wo_a (groups, rows per group, K per group): one launch, the groups as experts.
GROUPED = {"flash.wo_a": (8, 1024, 4096), "pro.wo_a": (16, 1024, 4096)}


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("name", GROUPED)
def test_grouped_wo_a_matches_twin(fmt, name):
    groups, rows, k = GROUPED[name]
    g = torch.Generator(device="cuda").manual_seed(groups)
    w = quantize_mxfp4(torch.randn(groups * rows, k, device="cuda", generator=g) * k ** -0.5)
    w = mxfp4_to_nvfp4(w) if fmt == "nvfp4" else w
    for t in (1, 2, 7, 16, 29, 64, 513):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(t, groups * k, device="cuda", generator=g).to(dtype)
            out, ref = linear_w4a16(x, w, groups), linear_w4a16_ref(x, w, groups)
            assert ((out - ref).norm() / ref.norm()).item() <= 1e-2, (name, t, dtype)


def test_grouped_graph_replay_recomputes():
    g = torch.Generator(device="cuda").manual_seed(1)
    groups, rows, k = GROUPED["flash.wo_a"]
    w = mxfp4_to_nvfp4(quantize_mxfp4(torch.randn(groups * rows, k, device="cuda", generator=g) / 64))
    x = torch.randn(4, groups * k, device="cuda", generator=g).bfloat16()
    graph, out = capture(lambda: linear_w4a16(x, w, groups))
    for _ in range(2):
        x.copy_(torch.randn(4, groups * k, device="cuda", generator=g).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        ref = linear_w4a16_ref(x, w, groups)
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-2
