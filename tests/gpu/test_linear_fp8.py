"""FP8 block-128 runner (CuTe DSL, wgmma) vs its twin on the GPU (marker gpu), every V4 projection."""
import pytest
import torch

from kernels.formats import quantize_activation_fp8, quantize_fp8_block
from kernels.linear import fp8_plan, linear_fp8, linear_fp8_ref, quantize_rows_fp8
from tests.gpu import capture

pytestmark = pytest.mark.gpu

# (rows, in, groups) of each FP8 projection in DeepSeek's and NVIDIA's V4 releases; wo_a is
# block-diagonal: `groups` blocks of rows x in, each reading its own slice of the input.
SHAPES = {
    "flash.wq_a": (1024, 4096, 1), "flash.wq_b": (32768, 1024, 1), "flash.wkv": (512, 4096, 1),
    "flash.wo_a": (8 * 1024, 4096, 8), "flash.wo_b": (4096, 8192, 1), "flash.shared_w1": (2048, 4096, 1),
    "flash.shared_w2": (4096, 2048, 1), "flash.indexer_wq_b": (8192, 1024, 1),
    "pro.wq_a": (1536, 7168, 1), "pro.wq_b": (65536, 1536, 1), "pro.wkv": (512, 7168, 1),
    "pro.wo_a": (16 * 1024, 4096, 16), "pro.wo_b": (7168, 16384, 1), "pro.shared_w1": (3072, 7168, 1),
    "pro.shared_w2": (7168, 3072, 1), "pro.indexer_wq_b": (8192, 1536, 1),
    # same-input linears the runner model runs as one GEMM on stacked rows (backend.gpu_model)
    "flash.wq_a+wkv": (1536, 4096, 1), "flash.shared_w1+w3": (4096, 4096, 1),
    "pro.wq_a+wkv": (2048, 7168, 1), "pro.shared_w1+w3": (6144, 7168, 1),
}


def random_weight(rows, k, generator, scale_dtype=torch.float8_e8m0fnu):
    """Rows of different magnitudes, so block scales differ across the weight."""
    w = torch.randn(rows, k, device="cuda", generator=generator) * k ** -0.5
    w *= torch.rand(rows, 1, device="cuda", generator=generator) * 4 + 0.25
    return quantize_fp8_block(w, scale_dtype)


def random_tokens(t, k, generator):
    """Tokens whose 128-blocks have different magnitudes, so activation scales differ."""
    x = torch.randn(t, k, device="cuda", generator=generator)
    x *= (torch.rand(t, k // 128, device="cuda", generator=generator) * 8).repeat_interleave(128, 1)
    return x.bfloat16()


def rel(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def test_activation_quantizer_is_bit_identical_to_twin():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = random_tokens(37, 4096, g)
    x[3, 128:256] = 0  # a zero block takes the amax floor
    x[5, :128] *= 1e4  # a block far above the rest
    q, s = quantize_rows_fp8(x)
    q_ref, s_ref = quantize_activation_fp8(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("name", SHAPES)
def test_fp8_runner_matches_twin(name):
    rows, k, groups = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(rows + k)
    w = random_weight(rows, k, g)
    for t in (1, 7, 29, 64, 513):
        x = random_tokens(t, groups * k, g)
        out, ref = linear_fp8(x, w, groups), linear_fp8_ref(x, w, groups)
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert rel(out, ref) <= 2e-2, (name, t, fp8_plan(t, rows // groups, k, groups), rel(out, ref))


@pytest.mark.parametrize("plan", [(8, 8, 1, 1), (8, 8, 16, 2), (32, 8, 4, 4), (16, 3, 1, 3), (64, 4, 2, 2), (128, 4, 1, 2)])
def test_fp8_every_tiling_and_fp32_scales(plan):
    g = torch.Generator(device="cuda").manual_seed(7)
    w = random_weight(1536, 2048, g, torch.float32)  # -Base checkpoints: fp32 block scales
    for t in (1, 9, 130):
        x = random_tokens(t, 2048, g)
        assert rel(linear_fp8(x, w, plan=plan), linear_fp8_ref(x, w)) <= 2e-2, (plan, t)


def test_fp8_prequantized_input_and_split_k_is_deterministic():
    g = torch.Generator(device="cuda").manual_seed(3)
    w = random_weight(1024, 4096, g)
    x = random_tokens(5, 4096, g)
    first = linear_fp8(quantize_rows_fp8(x), w, plan=(8, 8, 16, 2))
    for _ in range(3):
        assert torch.equal(linear_fp8(x, w, plan=(8, 8, 16, 2)), first)
    assert rel(first, linear_fp8_ref(x, w)) <= 2e-2


def test_fp8_graph_replay_recomputes():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = random_weight(1024, 4096, g)
    x = random_tokens(8, 4096, g)
    graph, out = capture(lambda: linear_fp8(x, w))
    for _ in range(2):
        x.copy_(random_tokens(8, 4096, g))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, linear_fp8_ref(x, w)) <= 2e-2
