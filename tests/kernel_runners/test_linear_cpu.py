"""Dense runners on the CPU: the FP8 twin (hand-computed and grouped), the planner, sm_90a compiles."""
import pytest
import torch

from kernels.formats import E4M3_MAX, quantize_activation_fp8, quantize_fp8_block
from kernels.linear import NARROW_TILE_TOKENS, NARROW_TILES, STAGES, fp8_plan, linear_fp8, linear_fp8_ref
from tests.kernel_runners import compile_for


def test_activation_quantization_hand_computed():
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 1], x[0, 2] = 3.5, 0.01, -1.0   # block 0: amax 3.5 -> scale 2^ceil(log2(3.5/448)) = 2^-7
    x[0, 128] = 448.0 * 3                          # block 1: amax 1344 -> scale 2^ceil(log2(3)) = 4
    x[0, 129] = 5.0
    q, s = quantize_activation_fp8(x)
    assert s.tolist() == [[2.0 ** -7, 4.0]]
    assert q[0, :3].float().tolist() == [448.0, 1.25, -128.0]  # 0.01 * 128 = 1.28 -> nearest E4M3 is 1.25
    assert q[0, 128:130].float().tolist() == [320.0, 1.25]  # 336 is a tie of 320 and 352: to even
    assert E4M3_MAX == 448.0
    zero_block_scale = quantize_activation_fp8(torch.zeros(1, 128))[1]
    assert zero_block_scale.item() == 2.0 ** -22  # amax floored at 1e-4: 2^ceil(log2(1e-4 / 448))


def test_grouped_twin_is_a_per_group_matmul():
    g = torch.Generator().manual_seed(0)
    groups, rows, k, t = 4, 128, 256, 3
    w = quantize_fp8_block(torch.randn(groups * rows, k, generator=g))
    x = torch.randn(t, groups * k, generator=g)
    out = linear_fp8_ref(x, w, groups)
    for gi in range(groups):
        ref = linear_fp8_ref(x[:, gi * k:(gi + 1) * k],
                             type(w)(w.weight[gi * rows:(gi + 1) * rows], w.scale[gi * rows // 128:(gi + 1) * rows // 128]))
        assert torch.allclose(out[:, gi * rows:(gi + 1) * rows], ref, rtol=1e-5, atol=1e-5)


def test_an_already_quantized_input_gives_what_the_linear_quantizing_it_gives():
    """dispatch.linear takes an FP8 block-128 weight's input already quantized (what the compiled
    pieces hand over): the same result as quantizing inside, grouped too; other formats refuse it."""
    from kernels import dispatch
    from kernels.formats import quantize_nvfp4
    g = torch.Generator().manual_seed(1)
    for groups in (1, 2):
        w = quantize_fp8_block(torch.randn(groups * 128, 256, generator=g))
        x = torch.randn(5, groups * 256, generator=g) * torch.rand(5, 1, generator=g) * 10
        assert torch.equal(dispatch.linear(quantize_activation_fp8(x), w, groups=groups),
                           dispatch.linear(x, w, groups=groups))
    with pytest.raises(TypeError, match="FP8 block-128 weight only"):
        dispatch.linear(quantize_activation_fp8(x), quantize_nvfp4(torch.randn(128, 512, generator=g)))


def test_fp8_runner_rejects_bad_inputs_naming_them():
    w = quantize_fp8_block(torch.randn(128, 256))
    with pytest.raises(TypeError, match="FP8 block-128"):
        linear_fp8(torch.randn(2, 256).bfloat16(), torch.randn(128, 256))
    with pytest.raises(ValueError, match=r"x \[2, 384\]"):
        linear_fp8(torch.randn(2, 384).bfloat16(), w)


def _v4_fp8_shapes():
    from tests.gpu.test_linear_fp8 import SHAPES
    return SHAPES.values()


def test_planner_choices_are_valid():
    for rows, k, groups in _v4_fp8_shapes():
        for t in range(1, 300):
            tile_n, stages, splits, consumers = fp8_plan(t, rows // groups, k, groups)
            assert stages == STAGES[tile_n] and stages % consumers == 0
            # one token tile for all tokens, except narrower ones for small weights at <= 32 tokens
            assert tile_n >= min(t, 128) or (t <= NARROW_TILE_TOKENS and rows // 64 <= NARROW_TILES[-1][0])
            assert k // 128 // splits >= consumers  # every consumer warpgroup has K blocks in every split


def test_every_fp8_variant_compiles_for_sm90a():
    """Every (token tile, stages, splits, consumers) the planner picks for a V4 projection at up to 256
    tokens, with E8M0 and fp32 weight scales and bf16 / fp32 outputs, the activation quantizer for
    bf16 and fp32 inputs, the mHC kernels and the decode attention kernels."""
    code = ("from kernels.linear import _compiled_fp8_gemm, _compiled_quant, fp8_plan\n"
            "from tests.gpu.test_linear_fp8 import SHAPES\n"
            "plans = {fp8_plan(t, r // g, k, g) for r, k, g in SHAPES.values() for t in range(1, 257)}\n"
            "import torch\n"
            "from kernels.mhc import _compiled_finish, _compiled_partials\n"
            "_compiled_partials('sm_90a')\n"
            "for dim in (4096, 7168):\n"
            "    for quantize in (True, False):\n"
            "        _compiled_finish(dim, 20, 1e-6, 1e-6, quantize, 'sm_90a')\n"
            "from kernels.attention import _compiled_combine, _compiled_partials as mqa_partials\n"
            "for heads, dim, entries in ((16, 512, True), (16, 512, False), (4, 128, True)):\n"
            "    mqa_partials(heads, dim, dim ** -0.5, entries, 'sm_90a')\n"
            "for dim, quantize in ((512, True), (512, False), (128, True)):\n"
            "    _compiled_combine(dim, 64, quantize, 'sm_90a')\n"
            "for dtype in (torch.bfloat16, torch.float32):\n"
            "    _compiled_quant('sm_90a', dtype)\n"
            "for plan in sorted(plans):\n"
            "    for e8m0 in (True, False):\n"
            "        _compiled_fp8_gemm(*plan, e8m0, 'sm_90a')\n"
            "    _compiled_fp8_gemm(*plan, True, 'sm_90a', torch.float32)  # fp32 out (the runner model)\n"
            "print(f'compiled {3 * len(plans)} variants')\n")
    out = compile_for("sm_90a", code)
    assert "variants" in out
    print(out)


def _grouped_kernel_semantics(x_rows, packed, scales, gscale, d, fmt):
    """What the MoE's ungated grouped kernel computes (its GPU tests check it against the twin): for
    each active expert e, every slot in its run: out[slot] = f16(x[slot]) @ W_e^T * gscale[e], W_e
    decoded from its own bytes and block scales."""
    from kernels.formats import Mxfp4Weight, Nvfp4Weight
    out = torch.full((x_rows.shape[0], packed.shape[1]), float("nan"))
    for i in range(int(d.num_active)):
        e, lo, hi = int(d.active_experts[i]), int(d.active_start[i]), int(d.active_start[i + 1])
        if fmt == "nvfp4":
            w = Nvfp4Weight(packed[e], scales[e].view(torch.float8_e4m3fn), torch.ones(()), torch.ones(())).dequantize()
        else:
            w = Mxfp4Weight(packed[e], scales[e].view(torch.float8_e8m0fnu)).dequantize()
        for slot in d.sorted_slots[lo:hi].tolist():
            out[slot] = x_rows[slot].half().float() @ w.T * gscale[e, 0]
    return out


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("groups, t", [(1, 1), (1, 5), (4, 1), (4, 3)])
def test_dense_w4a16_operands_give_the_twin_through_the_grouped_kernel(fmt, groups, t):
    """linear_w4a16 runs a dense (or block-diagonal wo_a) layer as one launch of the MoE kernel with
    the groups as experts: its operands (views of the checkpoint's bytes, the dispatch, the global
    scales), run through the kernel's semantics, give the twin's output rows in place."""
    from kernels.formats import quantize_mxfp4, quantize_nvfp4
    from kernels.linear import linear_w4a16_ref, w4a16_launch_args
    g = torch.Generator().manual_seed(groups * 10 + t)
    rows, k = 64, 256
    dense = torch.randn(groups * rows, k, generator=g) * torch.rand(groups * rows, 1, generator=g)
    w = quantize_nvfp4(dense) if fmt == "nvfp4" else quantize_mxfp4(dense)  # NVFP4: a global scale that is not 1
    x = torch.randn(t, groups * k, generator=g)
    x_rows, packed, scales, gscale, route_w, d = w4a16_launch_args(x, w, groups)
    assert packed.data_ptr() == w.weight.data_ptr() and route_w.shape == (t * groups,)
    out = _grouped_kernel_semantics(x_rows, packed, scales, gscale, d, fmt).view(t, groups * rows)
    assert torch.allclose(out, linear_w4a16_ref(x, w, groups), rtol=1e-5, atol=1e-5)


def test_dense_w4a16_rejects_shapes_it_cannot_split_into_groups():
    from kernels.formats import quantize_mxfp4
    from kernels.linear import w4a16_launch_args
    w = quantize_mxfp4(torch.randn(128, 256, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"x \[2, 300\] and weight \[128, 256\] do not make 1 groups"):
        w4a16_launch_args(torch.randn(2, 300), w)
    with pytest.raises(ValueError, match="rows per group % 64 == 0"):
        w4a16_launch_args(torch.randn(2, 4 * 256), w, groups=4)  # 32 rows per group


# Every V4-Flash / V4-Pro dense projection (groups, rows per group, K) and two tiny ones.
DENSE_SHAPES = [(1, 1024, 4096), (1, 32768, 1024), (1, 512, 4096), (1, 4096, 8192), (1, 2048, 4096), (1, 4096, 2048),
                (1, 8192, 1024), (8, 1024, 4096), (1, 1536, 7168), (1, 65536, 1536), (1, 512, 7168),
                (1, 7168, 16384), (1, 3072, 7168), (1, 7168, 3072), (16, 1024, 4096), (1, 64, 128), (4, 64, 256)]


def test_dense_plan_splits_k_until_the_launch_fills_the_gpu():
    from kernels.linear import dense_plan
    from kernels.moe import gemm_config
    # one token: the GEMV, two rows per warp on weights of up to 3072 rows, K split up to ~4096 warps
    assert dense_plan(1, 1, 1024, 4096) == dict(kind="gemv", rows=2, k_unroll=1, warps_k=4, n_tiles=1)  # Flash wq_a
    assert dense_plan(1, 1, 4096, 8192) == dict(kind="gemv", rows=4, k_unroll=1, warps_k=4, n_tiles=1)  # Flash wo_b
    assert dense_plan(1, 1, 32768, 1024)["warps_k"] == 1  # 8192 warps of rows already
    # two tokens: the GEMV up to 4096 rows (both tokens per pass over the weight), tensor cores above
    assert dense_plan(2, 1, 4096, 2048) == dict(kind="gemv", rows=4, k_unroll=1, warps_k=2, n_tiles=2)
    assert dense_plan(2, 1, 7168, 3072)["kind"] == "mma"
    # 3-8 tokens: mma.sync, one token tile per pass
    assert dense_plan(8, 1, 1024, 4096) == dict(kind="mma", n_tiles=1, k_unroll=2, warps_k=16, warps_m=1)
    assert dense_plan(3, 8, 1024, 4096) == dict(kind="mma", n_tiles=1, k_unroll=2, warps_k=8)  # Flash wo_a; 4 row warps
    assert dense_plan(8, 1, 8192, 1024) == dict(kind="mma", n_tiles=1, k_unroll=2, warps_k=4, warps_m=1)  # 8 K blocks
    # 9-32 tokens: wgmma; K split while there are few CTAs (or 8+ stages per split), one consumer on many tiles
    assert dense_plan(16, 1, 7168, 16384) == dict(kind="wgmma", tile_n=16, stages=8, splits=1, consumers=2)  # Pro wo_b
    assert dense_plan(32, 1, 1024, 4096) == dict(kind="wgmma", tile_n=32, stages=8, splits=4, consumers=2)  # Flash wq_a
    assert dense_plan(29, 1, 512, 7168)["splits"] == 8                                                # Pro wkv
    assert dense_plan(32, 1, 4096, 8192)["splits"] == 2                                               # Flash wo_b
    assert dense_plan(9, 1, 65536, 1536) == dict(kind="wgmma", tile_n=16, stages=4, splits=1, consumers=1)  # Pro wq_b
    assert dense_plan(16, 1, 64, 128)["kind"] == "mma"  # K % 512 != 0: whole stages and scale rows need it
    # prefill: the MoE kernels' own tiling
    assert dense_plan(33, 1, 4096, 8192) == gemm_config(33, 1, 4096, 8192)


def test_dense_plan_gives_each_warp_a_round_and_stays_in_the_compiled_variants():
    from kernels.linear import dense_plan, dense_variants
    variants = dense_variants()
    assert len({tuple(sorted(v.items())) for v in variants}) == len(variants)
    for groups, rows, k in DENSE_SHAPES:
        for t in (*range(1, 34), 64, 513):
            plan = dense_plan(t, groups, rows, k)
            assert plan in variants, (groups, rows, k, t, plan)  # compile_w4a16_kernels compiles it
            if t <= 32 and plan["kind"] == "mma":
                assert plan["warps_k"] * plan["k_unroll"] <= max(1, k // 128), (groups, rows, k, t)
                assert plan.get("warps_m", 4) * plan["warps_k"] <= (16 if plan["n_tiles"] == 4 else 32)
            elif plan["kind"] == "gemv":
                assert plan["warps_k"] <= max(1, k // 1024) and plan["n_tiles"] == t
            elif plan["kind"] == "wgmma":  # every consumer warpgroup of every split has a stage
                assert k // 256 // plan["splits"] >= plan["consumers"] and plan["tile_n"] >= t, (groups, rows, k, t)


def test_wgmma_w4a16_k_order_meets_each_weight_with_its_activation():
    """The wgmma kernel's K order (kernels.linear.w4a16_wgmma_sm90): at K step s, lane q's A words
    hold E2M1 pair q (elements q, q + 4) of 8-vector s // 2 of chunks 2(s % 2) (MMA columns 2q, 2q+1)
    and 2(s % 2) + 1 (columns 2q+8, 2q+9); B is pair_order's f16 at columns 16s.. of the block as it
    lies. Each weight must meet its own activation: checked on distinct random values."""
    from kernels.moe import pair_order_ref
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    b_operand, x16 = pair_order_ref(x).float(), x.half().float()
    for block in range(4):
        for s in range(8):
            for q in range(4):
                for half in range(2):
                    chunk = 2 * (s % 2) + half
                    for e in range(2):  # the f16x2's low and high halves: elements q and q + 4
                        k = 128 * block + 32 * chunk + 8 * (s // 2) + q + 4 * e
                        column = 128 * block + 16 * s + 2 * q + 8 * half + e
                        assert torch.equal(b_operand[:, column], x16[:, k]), (block, s, q, half, e)


def test_every_dense_w4a16_variant_compiles_for_sm90a():
    """Both formats; pair_order's activations for every variant, bf16 rows too where a variant reads them."""
    from kernels.linear.w4a16 import activation_kinds, dense_variants
    out = compile_for("sm_90a", "from kernels.linear.w4a16 import _compiled_wgmma, compile_w4a16_kernels\n"
                                "from kernels.moe import _compile_variant\n"
                                "n = sum(compile_w4a16_kernels(fmt) for fmt in ('nvfp4', 'mxfp4'))\n"
                                "done = _compile_variant.cache_info().currsize + _compiled_wgmma.cache_info().currsize\n"
                                "print(f'compiled {done} of {n}')\n", timeout=1200)
    n = 2 * sum(len(activation_kinds(v)) for v in dense_variants())
    assert f"compiled {n} of {n}" in out


def test_small_fp32_linear_plans_and_compiles_for_sm90a():
    """Every variant the planner picks for the V4 shapes linear_f32 serves at 1 to 16 tokens, BF16 and
    fp32 weights, compiles for sm_90a; the planner splits K only as far as each warp keeps a round."""
    from kernels.linear import small_linear_plan
    assert small_linear_plan(1, 2048, 4096, True) == (1, 8)   # 512 warp rows: K split 8 ways, 2 rounds each
    assert small_linear_plan(9, 64, 128, False) == (16, 1)    # the tiny model's K gives one round
    assert small_linear_plan(8, 65536, 4096, True) == (8, 1)  # rows enough
    code = ("from kernels.linear import _compiled_small_linear, small_linear_plan\n"
            "from tests.gpu.test_linear_f32 import SHAPES\n"
            "plans = {(b, *small_linear_plan(t, n, k, b)) for n, k in SHAPES.values() for t in range(1, 17)\n"
            "         for b in (True, False)}\n"
            "for bf16, tokens, warps_k in sorted(plans):\n"
            "    _compiled_small_linear(bf16, warps_k, tokens, 'sm_90a')\n"
            "print(f'compiled {len(plans)} variants')\n")
    assert "variants" in compile_for("sm_90a", code)


def test_small_fp32_linear_off_the_gpu_is_its_twin():
    """On the CPU (and past 16 tokens) torch.ops.dsv4.linear_f32 is F.linear in fp32 math, eagerly and
    from compiled code."""
    import torch.nn.functional as F
    from kernels.linear import linear_f32_ref
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g).bfloat16()
    x = torch.randn(5, 128, generator=g)
    assert torch.equal(torch.ops.dsv4.linear_f32(x, w), F.linear(x, w.float()))
    assert torch.equal(linear_f32_ref(x, w), F.linear(x, w.float()))
    compiled = torch.compile(lambda a: torch.ops.dsv4.linear_f32(a, w) * 2, dynamic=True)
    assert torch.allclose(compiled(x), 2 * F.linear(x, w.float()))
