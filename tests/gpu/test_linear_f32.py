"""The fp32-math small linear (kernels.linear.linear_f32) on the GPU (marker gpu): every V4 shape it
serves in a decode step, BF16 and fp32 weights, against float64 and its twin; graph replay; the
torch.ops call that compiled pieces make."""
import pytest
import torch

from kernels.linear import linear_f32, linear_f32_ref
from tests.gpu import capture

pytestmark = pytest.mark.gpu

# (out, in): the gate, the compressors' wkv||wgate (CSA: overlapping windows, 2 x 2 x head dim;
# HCA: 2 x head dim; the indexer's: 2 x 2 x 128) and the indexer's weights_proj; the tiny CPU model's gate
SHAPES = {"flash.gate": (256, 4096), "flash.csa_compressor": (2048, 4096), "flash.hca_compressor": (1024, 4096),
          "flash.index_compressor": (512, 4096), "flash.weights_proj": (64, 4096), "pro.gate": (384, 7168),
          "pro.csa_compressor": (2048, 7168), "pro.weights_proj": (64, 7168), "tiny.gate": (16, 128)}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", SHAPES)
def test_small_linear_matches_float64_and_its_twin(name, dtype):
    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=g) * torch.rand(k, device="cuda", generator=g)).to(dtype)
    for t in (1, 3, 8, 13, 16, 17):  # 17: past the kernel's token counts, F.linear
        x = torch.randn(t, k, device="cuda", generator=g) * 3
        out = linear_f32(x, w)
        ref64 = x.double() @ w.double().t()
        assert out.dtype == torch.float32 and out.shape == (t, n)
        assert rel_err(out, ref64) < 1e-6, (t, rel_err(out, ref64))
        assert rel_err(out, linear_f32_ref(x, w).double()) < 1e-6
        assert torch.equal(out, linear_f32(x, w))  # deterministic


def test_small_linear_graph_replay_recomputes_on_new_inputs():
    w = torch.randn(2048, 4096, device="cuda").bfloat16()
    x = torch.randn(8, 4096, device="cuda")
    graph, out = capture(lambda: linear_f32(x, w))
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        w.copy_(torch.randn_like(w))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, x.double() @ w.double().t()) < 1e-6


def test_compiled_code_calls_the_kernel_through_torch_ops():
    """Compiled code runs the same kernel (an exact doubling after it keeps the comparison exact;
    Inductor's softplus or sqrt would round otherwise than eager's)."""
    w = torch.randn(256, 4096, device="cuda")

    def doubled(x):
        return torch.ops.dsv4.linear_f32(x, w) * 2

    for t in (1, 8):
        x = torch.randn(t, 4096, device="cuda")
        assert torch.equal(torch.compile(doubled, dynamic=True)(x), doubled(x))
