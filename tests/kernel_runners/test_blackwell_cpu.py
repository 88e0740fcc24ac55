"""Blackwell (sm_100a) path on the CPU: every kernel compiles for sm_100a, the W4A4 twin is accurate
enough, and the pieces it stands on (NVFP4 activations, the 128x4 scale layout, the padded expert
tiles, the backend choice) are right. No Blackwell GPU is available: the kernels never ran."""
import torch

from kernels.dispatch import backend_for
from kernels.formats import (dequantize_nvfp4, quantize_activation_nvfp4, quantize_nvfp4, swizzle_scales_128x4,
                             unswizzle_scales_128x4)
from kernels.moe import moe_w4a16_ref, route_topk, stack_experts
from kernels.moe.w4a4 import calibrate_input_scales, moe_w4a4_ref, padded_tiles
from tests.kernel_runners import compile_for


def test_every_sm100a_variant_compiles():
    code = ("from kernels.w4a4 import compile_kernels\n"
            "from kernels import moe\n"
            "n = compile_kernels('sm_100a')\n"
            "moe.compile_kernels('mxfp4', 6, 10.0, num_experts=256)  # MXFP4 experts stay W4A16 on Blackwell\n"
            "n += moe._compile_variant.cache_info().currsize + moe._compiled_dispatch.cache_info().currsize\n"
            "from kernels.mhc import _compiled_finish, _compiled_partials  # the mHC pre-mix (plain SIMT)\n"
            "_compiled_partials('sm_100a'), _compiled_finish(4096, 20, 1e-6, 1e-6, True, 'sm_100a')\n"
            "from kernels import attention  # decode attention (plain SIMT)\n"
            "attention._compiled_partials(16, 512, 512 ** -0.5, True, 'sm_100a')\n"
            "attention._compiled_combine(512, 64, True, 'sm_100a')\n"
            "print(f'compiled {n + 4} sm_100a variants')\n")
    assert "compiled 42 sm_100a variants" in compile_for("sm_100a", code)  # the MoE's: gemv_variants, mma_variants


def test_w4a4_twin_accuracy_on_a_reduced_flash_shaped_layer():
    """V4-Flash proportions at 1/8 width (D 512, I 256, 32 experts, top-6), well-scaled random
    weights, input scales calibrated on other tokens: cosine vs the BF16-activation result >= 0.98
    (a published NVFP4 MoE on real V4 weights reports 0.988)."""
    g = torch.Generator().manual_seed(0)
    e, d, i, k = 32, 512, 256, 6
    experts = [tuple(quantize_nvfp4(torch.randn(s, generator=g) * s[1] ** -0.5) for s in ((i, d), (d, i), (i, d)))
               for _ in range(e)]
    stacked = stack_experts(experts)
    bias = torch.zeros(e)
    calib_x = torch.randn(512, d, generator=g)
    stacked = calibrate_input_scales(calib_x, *route_topk(torch.randn(512, e, generator=g), bias, k, 1.5), stacked, 10.0)
    x = torch.randn(64, d, generator=g)
    w, ids = route_topk(torch.randn(64, e, generator=g), bias, k, 1.5)
    ref, out = moe_w4a16_ref(x, w, ids, stacked, 10.0), moe_w4a4_ref(x, w, ids, stacked, 10.0)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert cosine >= 0.98, cosine


def test_nvfp4_activation_quantization_hand_computed():
    x = torch.zeros(2, 16)
    x[0, :3] = torch.tensor([3.0, 1.0, 0.2])  # amax 3, gs 0.5: scale e4m3(3 / 3) = 1; 0.2 / 0.5 = 0.4 -> 0.5
    x[1, 0], x[1, 1] = 10000.0, 100.0           # beyond calibration: scale saturates at 448, values at 6
    q = quantize_activation_nvfp4(x, 0.5)
    assert q.weight_scale.float().tolist() == [[1.0], [448.0]]
    back = dequantize_nvfp4(q)
    assert back[0, :3].tolist() == [3.0, 1.0, 0.25]
    assert back[1, :2].tolist() == [6 * 224.0, 0.5 * 224.0]  # 100 / 224 = 0.446 -> 0.5


def test_scale_layout_128x4_is_a_permutation():
    s = torch.randint(0, 255, (200, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    flat = swizzle_scales_128x4(s)
    assert flat.numel() == 256 * 12 and torch.equal(unswizzle_scales_128x4(flat, 200, 11), s)
    assert flat[(33 % 32) * 16 + (33 // 32) * 4 + 2] == s[33, 2]      # row 33, column 2 of tile (0, 0)
    assert flat[512 + 5 * 16 + 3] == s[5, 7]                          # tile (0, 1): columns 4..7
    assert flat[3 * 512 + 2 * 16 + 1 * 4 + 0] == s[128 + 32 + 2, 0]   # tile (1, 0)
    assert int(flat.sum()) == int(s.long().sum())                     # padding is zeros


def test_padded_tiles_give_every_slot_one_row_in_its_experts_tile():
    g = torch.Generator().manual_seed(2)
    t, k, e, tile = 37, 6, 16, 8
    experts = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    p = padded_tiles(weights, experts, e, tile)
    rows = p.row_slot.numel()
    assert rows == -(-(t * k + e * (tile - 1)) // tile) * tile and p.tile_group.numel() == rows // tile
    valid = p.row_slot < t * k
    assert sorted(p.row_slot[valid].tolist()) == list(range(t * k))
    owner = p.tile_group.repeat_interleave(tile)
    assert torch.equal(owner[valid].long(), experts.reshape(-1)[p.row_slot[valid]])
    assert torch.equal(p.row_source[valid].long(), p.row_slot[valid] // k)
    assert (p.row_source[~valid] == -1).all() and (p.row_weight[~valid] == 0).all()
    assert torch.equal(p.row_weight[valid], weights.reshape(-1)[p.row_slot[valid]])


def test_backend_by_compute_capability():
    assert backend_for((10, 0)) == "sm100" and backend_for((9, 0)) == "sm90"
    assert backend_for((8, 0)) == "twin" and backend_for(None) == "twin"


def test_dense_w4a4_twin_accuracy():
    from kernels.linear import linear_w4a4_ref
    g = torch.Generator().manual_seed(3)
    w = quantize_nvfp4(torch.randn(256, 1024, generator=g) / 32)
    x = torch.randn(16, 1024, generator=g)
    w.input_scale.fill_(float(torch.randn(256, 1024, generator=g).abs().amax() / (6 * 448)))  # calibrated on other data
    ref, out = x @ w.dequantize().T, linear_w4a4_ref(x, w)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item() >= 0.98
