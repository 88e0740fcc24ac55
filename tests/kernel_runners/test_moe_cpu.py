"""MoE pieces that run on the CPU: routing, dispatch, expert stacking, the twin, sm_90a compiles."""
import pytest
import torch

from kernels.formats import mxfp4_to_nvfp4, quantize_mxfp4
from kernels.moe import dispatch, moe_w4a16_ref, route_hash, route_topk, stack_experts, unstack
from tests.kernel_runners import compile_for


def test_dispatch_groups_slots_by_expert():
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(7)])  # [7, 3]
    d = dispatch(experts, num_experts=10)
    flat = experts.reshape(-1)
    n = int(d.num_active)
    assert d.active_experts.shape == (min(10, 21),) and d.active_start.shape == (11,)
    assert d.active_experts[:n].tolist() == sorted(set(flat.tolist()))
    assert (d.active_experts[n:] == -1).all() and (d.active_start[n:] == 21).all()
    for j in range(n):
        run = d.sorted_slots[d.active_start[j]:d.active_start[j + 1]].long()
        assert (flat[run] == d.active_experts[j]).all()
        assert run.tolist() == sorted(run.tolist())  # stable: token order within an expert
    assert sorted(d.sorted_slots.tolist()) == list(range(21))


def test_dispatch_every_token_same_experts():
    experts = torch.tensor([[3, 1]] * 5)
    d = dispatch(experts, num_experts=8)
    assert int(d.num_active) == 2 and d.active_experts[:2].tolist() == [1, 3]
    assert d.active_start[:3].tolist() == [0, 5, 10]


def test_routing_matches_the_reference_model_formula():
    g = torch.Generator().manual_seed(1)
    logits, bias = torch.randn(5, 16, generator=g), torch.randn(16, generator=g) * 0.1
    w, e = route_topk(logits, bias, 4, 1.5)
    scores = torch.nn.functional.softplus(logits).sqrt()
    assert torch.equal(e, (scores + bias).topk(4, dim=-1).indices)
    assert torch.allclose(w.sum(-1), torch.full((5,), 1.5))
    tid2eid = torch.randint(0, 16, (50, 4), generator=g)
    w, e = route_hash(logits, tid2eid, torch.tensor([3, 9, 0, 49, 7]), 1.5)
    assert torch.equal(e, tid2eid[[3, 9, 0, 49, 7]])


def _random_experts(n, inter, hidden, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        trio = [quantize_mxfp4(torch.randn(shape, generator=g) * shape[1] ** -0.5)
                for shape in ((inter, hidden), (hidden, inter), (inter, hidden))]
        if fmt == "nvfp4":
            trio = [mxfp4_to_nvfp4(w) for w in trio]
        out.append(tuple(trio))
    return out


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_stacking_is_bit_preserving(fmt):
    experts = _random_experts(3, 64, 128, fmt)
    stacked = stack_experts(experts)
    assert stacked.fmt == fmt and stacked.w13.shape == (3, 128, 64)
    for e, trio in enumerate(experts):
        for a, b in zip(unstack(stacked, e), trio):
            assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
            assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_twin_matches_a_per_token_loop(fmt):
    hidden, inter, n_exp, k, t = 128, 64, 6, 2, 5
    experts = _random_experts(n_exp, inter, hidden, fmt, seed=3)
    stacked = stack_experts(experts)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(t, hidden, generator=g)
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    out = moe_w4a16_ref(x, w, ids, stacked, swiglu_limit=1.0)  # a low limit so the clamps matter
    for i in range(t):
        ref = torch.zeros(hidden)
        xi = x[i].half().float()  # the runners' activations are f16
        for j in range(k):
            w1, w2, w3 = (q.dequantize() for q in experts[int(ids[i, j])])
            gate, up = (xi @ w1.T).clamp(max=1.0), (xi @ w3.T).clamp(-1.0, 1.0)
            ref += (w[i, j] * torch.nn.functional.silu(gate) * up).half().float() @ w2.T  # h kept in fp16
        assert torch.allclose(out[i], ref, rtol=1e-5, atol=1e-5)


def test_every_kernel_variant_compiles_for_sm90a():
    """Both formats: the SIMT GEMV and every tensor-core variant `gemm_config` can pick, L1 and L2."""
    from kernels.moe import gemv_variants, mma_variants
    out = compile_for("sm_90a", "from kernels.moe import compile_kernels, _compile_variant\n"
                                "for fmt in ('nvfp4', 'mxfp4'):\n"
                                "    compile_kernels(fmt, 6, 10.0)\n"
                                "print(f'compiled {_compile_variant.cache_info().currsize} variants')\n", timeout=900)
    # L1 and L2: the GEMV variants and each tensor-core variant
    per_format = sum(len(gemv_variants(g)) + len(mma_variants(g)) for g in (True, False))
    assert f"compiled {2 * per_format} variants" in out


def test_dispatch_kernel_compiles_for_sm90a():
    out = compile_for("sm_90a", "from kernels.moe import _compiled_dispatch\n"
                                "_compiled_dispatch(256, 'sm_90a'); _compiled_dispatch(384, 'sm_90a')\n"
                                "print('compiled dispatch')\n", timeout=600)
    assert "compiled dispatch" in out


def test_dense_w4a16_twin_is_the_dequantized_matmul():
    from kernels.linear import linear_w4a16_ref
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(9))
    for q in (mxfp4_to_nvfp4(quantize_mxfp4(w)), quantize_mxfp4(w)):
        assert torch.allclose(linear_w4a16_ref(x, q), x.half().float() @ q.dequantize().T)  # f16 activations


def test_mxfp4_scales_beyond_the_runners_exact_range_fail_at_stacking():
    experts = _random_experts(2, 64, 128, "mxfp4")
    experts[1][1].scale.view(torch.uint8)[3, 1] = 129  # 2^2: weights up to 24
    with pytest.raises(ValueError, match="layers.1.ffn.experts.1.w2.scale: MXFP4 block scale 2\\^2"):
        stack_experts(experts, "layers.1.ffn.experts")


def test_kernel_variant_follows_the_expected_tokens_per_expert():
    from kernels.moe import expected_active_experts, gemm_config
    assert expected_active_experts(1, 6, 256) == pytest.approx(6)
    assert expected_active_experts(4096, 6, 256) == pytest.approx(256)
    assert gemm_config(1.0, 6, 2048, 4096) == {"kind": "gemv", "rows": 4, "k_unroll": 1}
    # a small dense weight at one token: K split between the warps of a CTA, one round each
    assert gemm_config(1, 1, 1024, 4096) == {"kind": "gemv", "rows": 4, "k_unroll": 1, "warps_k": 4}
    assert gemm_config(1, 1, 4096, 8192) == {"kind": "gemv", "rows": 4, "k_unroll": 1, "warps_k": 4}
    assert gemm_config(1.0, 6, 2048, 4096, gated=True) == {"kind": "gemv", "rows": 2, "k_unroll": 1, "pipelined": True}
    big = gemm_config(3.1, 244, 2048, 4096)
    assert big == {"kind": "mma", "n_tiles": 1, "k_unroll": 2, "warps_k": 1, "min_ctas": 6}  # L2: bounded
    assert gemm_config(3.1, 244, 2048, 4096, gated=True) == dict(big, split_halves=True, min_ctas=3)  # L1
    assert "split_halves" not in gemm_config(8, 1, 1024, 128, gated=True)  # not with K splitting
    assert gemm_config(40, 256, 4096, 2048)["n_tiles"] == 4
    assert "split_halves" not in gemm_config(40, 256, 4096, 2048, gated=True)  # the bound would spill
    assert gemm_config(8, 1, 1024, 128) == {"kind": "mma", "n_tiles": 1, "k_unroll": 1, "warps_k": 4}  # few row tiles
    from kernels.moe import mma_variants
    for args in ((3.1, 244, 2048, 4096), (40, 256, 4096, 2048), (8, 1, 1024, 128), (20, 1, 7168, 256)):
        for gated in (True, False):
            knobs = dict(gemm_config(*args, gated=gated))
            assert knobs.pop("kind") == "mma" and knobs in mma_variants(gated)  # compile_kernels compiles it


def test_activations_laid_out_beforehand_must_be_pair_order_of_x():
    """moe_w4a16 takes the caller's pair_order(x) (made on another stream) only in its shape and
    dtype: anything else fails before any launch, naming x_ordered."""
    from kernels.moe import moe_w4a16, pair_order
    stacked = stack_experts(_random_experts(4, 128, 128, "nvfp4"))
    x = torch.randn(3, 128)
    assert pair_order(x).dtype == torch.float16 and pair_order(x).shape == x.shape
    ids, w = torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    for wrong in (x, pair_order(x)[:2]):
        with pytest.raises(ValueError, match="x_ordered"):
            moe_w4a16(x, w, ids, stacked, 10.0, x_ordered=wrong)
