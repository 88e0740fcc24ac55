"""Grouped W4A16 expert GEMMs for decode-sized batches, CuTe DSL (compiles for sm_90a and newer).

One warp computes `rows_per_warp` output rows of one active expert for that expert's tokens: it streams the
rows' packed E2M1 bytes once (16-byte loads, coalesced across the warp), decodes them in registers,
applies the block scale per 16 (NVFP4, E4M3) or per 32 (MXFP4, E8M0) elements, and accumulates
fp32 dot products with each token (up to `token_tile` at a time), reduced across the warp.
Grid: (rows / (warps * rows_per_warp), max active experts); blocks past the device-side `num_active` exit, so the
launch shape is static and the kernels capture into CUDA graphs.

  L1 (`gated=True`):  h[slot, n] = w_route * silu(min(g1 * x.W1[n], L)) * clamp(g3 * x.W3[n], +-L)   (bf16)
  L2 (`gated=False`): y[slot, n] = g2 * h[slot].W2[n]                                              (fp32)

E2M1 decode: the 3 magnitude bits go under an f16 exponent/mantissa (value * 2^-14, subnormals
included) and the sign on top; the 2^14 is folded into the block scale.
E4M3 scale decode: (byte & 0x7f) << 7 is an f16 of value * 2^-8; the 2^8 is folded likewise.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float16, Float32, Int16, Int32
from cutlass._mlir.dialects import llvm as mlir_llvm
from cutlass.cutlass_dsl import dsl_user_op

from . import activation_position

# Default tiling (bench/moe_tiles.py sweeps these on a GPU). Weight rows per warp amortize each
# warp's setup (expert, token slots) and put more independent 16-byte loads in flight per lane;
# L1's rows come in w1/w3 pairs, so it takes fewer.
WARPS = 4
ROWS_L1, ROWS_L2 = 2, 4
TOKEN_TILE = 1
E2M1_F16_CORRECTION = 2.0**14  # decoded f16 = value * 2^-14
E4M3_F16_CORRECTION = 2.0**8   # decoded f16 = scale * 2^-8


@cute.jit
def _e2m1_pair(word: Int32, j: cutlass.Constexpr) -> Int32:
    """Elements j and j+4 (0 <= j < 4) of a word of 8 packed E2M1 (low nibble first) as an f16x2
    (element j low), each times 2^-14: nibbles j and j+4 sit at bits 4j and 16+4j, so one 32-bit
    pass places both under the f16 exponent/mantissa (subnormals included) with the sign on top.
    Each field is shifted straight from the word (3-4 integer ops per pair): the magnitude bits
    4j..4j+2 to 9..11, the sign bit 4j+3 to 15 (j = 3: already there); the masks drop the rest,
    including what an arithmetic right shift brings in at the top."""
    magnitude = word << (9 - 4 * j) if cutlass.const_expr(j < 3) else word >> 3
    sign = word << (12 - 4 * j) if cutlass.const_expr(j < 3) else word
    return (magnitude & 0x0E000E00) | (sign & -0x7FFF8000)  # -0x7FFF8000 == 0x80008000 as an int32


@cute.jit
def store_output(out: cute.Tensor, slot: Int32, n: Int32, acc: Float32, acc_up: Float32, scale: Float32,
                 scale_up: Float32, route_weight: Float32, gated: cutlass.Constexpr, swiglu_limit: cutlass.Constexpr):
    """Both kernels' epilogue for output row n of one (token, k) slot, from fp32 sums and their scales.
    L1 (gated): DeepSeek's clamped SwiGLU times the routing weight, as f16 at the row's place in the
    activation order L2 reads; L2: the scaled sum in fp32."""
    if cutlass.const_expr(gated):
        gate = cutlass.min(acc * scale, Float32(swiglu_limit))
        up = cutlass.max(cutlass.min(acc_up * scale_up, Float32(swiglu_limit)), Float32(-swiglu_limit))
        silu = gate / (Float32(1.0) + cute.math.exp(-gate))
        out[slot, activation_position(n)] = (route_weight * silu * up).to(Float16)
    else:
        out[slot, n] = acc * scale


@dsl_user_op
def _hfma2(a: Int32, b: Int32, c: Int32, *, loc=None, ip=None) -> Int32:
    """a * b + c on f16x2 registers."""
    return Int32(mlir_llvm.inline_asm(Int32.mlir_type, [a.ir_value(loc=loc, ip=ip), b.ir_value(loc=loc, ip=ip),
                                                        c.ir_value(loc=loc, ip=ip)],
                                      "fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", loc=loc, ip=ip))


@dsl_user_op
def _f16x2_sum(h: Int32, *, loc=None, ip=None) -> Float32:
    """lo + hi of an f16x2, in fp32."""
    return Float32(mlir_llvm.inline_asm(
        Float32.mlir_type, [h.ir_value(loc=loc, ip=ip)],
        "{ .reg .f16 lo, hi; .reg .f32 a, b; mov.b32 {lo, hi}, $1; cvt.f32.f16 a, lo; cvt.f32.f16 b, hi; "
        "add.f32 $0, a, b; }", "=f,r", loc=loc, ip=ip))


@cute.jit
def _block_scale(byte: Int32, nvfp4: cutlass.Constexpr) -> Float32:
    """A block scale byte as fp32, including the E2M1 decode correction."""
    if cutlass.const_expr(nvfp4):
        s = Int16((byte & 0x7F) << 7).bitcast(Float16).to(Float32)
        return s * (E2M1_F16_CORRECTION * E4M3_F16_CORRECTION)
    return Int32(byte << 23).bitcast(Float32) * E2M1_F16_CORRECTION  # E8M0 (code 0 reads as 0)


@cute.kernel
def _grouped_gemv_kernel(
    x_vecs: cute.Tensor,       # int32 [rows_in, K/8, 4]: f16 activations in activation order, 8 per vector
    w_vecs: cute.Tensor,       # int32 [E, N, K/32, 4]: packed E2M1, 32 per 4-word vector
    scales: cute.Tensor,       # uint8 [E, N, K/G]
    gscale: cute.Tensor,       # fp32  [E, 2] (gated: w1 half, w3 half) or [E, 1]
    route_w: cute.Tensor,      # fp32  [slots]
    sorted_slots: cute.Tensor, # int32 [slots]
    active_experts: cute.Tensor,
    active_start: cute.Tensor,
    num_active: cute.Tensor,
    out: cute.Tensor,          # gated: f16 [slots, N/2] (activation order); else fp32 [slots, N]
    top_k: cutlass.Constexpr,
    group: cutlass.Constexpr,
    gated: cutlass.Constexpr,
    swiglu_limit: cutlass.Constexpr,
    warps: cutlass.Constexpr,
    rows_per_warp: cutlass.Constexpr,
    token_tile: cutlass.Constexpr,
):
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    bx, by, _ = cute.arch.block_idx()
    n_out = out.shape[1]
    n0 = (bx * warps + warp) * rows_per_warp  # first of this warp's rows (n_out is a multiple of rows_per_warp)
    if by < num_active[0] and n0 < n_out:
        e = active_experts[by]
        s0 = active_start[by]
        s1 = active_start[by + 1]
        n_vecs = w_vecs.shape[2]
        halves = 2 if gated else 1
        for t0 in cutlass.range(s0, s1, token_tile):
            n_valid = cutlass.min(s1 - t0, token_tile)  # warp-uniform
            acc = cute.make_rmem_tensor((token_tile, rows_per_warp, 2), Float32)
            acc.fill(0.0)
            rows = cute.make_rmem_tensor((token_tile,), Int32)
            for tt in cutlass.range_constexpr(token_tile):
                slot = sorted_slots[cutlass.min(t0 + tt, s1 - 1)]
                if cutlass.const_expr(gated):
                    rows[tt] = slot // top_k
                else:
                    rows[tt] = slot
            for v in cutlass.range(lane, n_vecs, 32):
                # 16-byte loads: 32 weights of every row (2 NVFP4 blocks or 1 MXFP4 block) and their scales.
                wq = cute.make_rmem_tensor((rows_per_warp, 2, 4), Int32)
                sv = cute.make_rmem_tensor((rows_per_warp, 2, 2), Float32)
                for r in cutlass.range_constexpr(rows_per_warp):
                    for half in cutlass.range_constexpr(halves):
                        wrow = n0 + r + half * n_out
                        vec = w_vecs[e, wrow, v, None].load()
                        for q in cutlass.range_constexpr(4):
                            wq[r, half, q] = vec[q]
                        for b in cutlass.range_constexpr(32 // group):
                            sv[r, half, b] = _block_scale(Int32(scales[e, wrow, v * (32 // group) + b]), group == 16)
                for q in cutlass.range_constexpr(4):  # word q: weights 8q..8q+7 of the 32
                    for tt in cutlass.range_constexpr(token_tile):
                        if tt < n_valid:
                            # logical vector 4v + q: chunk v % 4 of K block v // 4, in activation order
                            xvec = x_vecs[rows[tt], (v // 4) * 16 + 4 * q + v % 4, None].load()  # 4 f16x2
                            for r in cutlass.range_constexpr(rows_per_warp):
                                for half in cutlass.range_constexpr(halves):
                                    dot = Int32(0)
                                    for j in cutlass.range_constexpr(4):
                                        dot = _hfma2(_e2m1_pair(wq[r, half, q], j), xvec[j], dot)
                                    acc[tt, r, half] = acc[tt, r, half] + _f16x2_sum(dot) * sv[
                                        r, half, q // 2 if group == 16 else 0]
            for tt in cutlass.range_constexpr(token_tile):
                for r in cutlass.range_constexpr(rows_per_warp):
                    for half in cutlass.range_constexpr(halves):
                        acc[tt, r, half] = cute.arch.warp_reduction_sum(acc[tt, r, half])
            if lane == 0:
                for tt in cutlass.range_constexpr(token_tile):
                    if t0 + tt < s1:
                        slot = sorted_slots[t0 + tt]
                        for r in cutlass.range_constexpr(rows_per_warp):
                            half = 1 if cutlass.const_expr(gated) else 0
                            store_output(out, slot, n0 + r, acc[tt, r, 0], acc[tt, r, half], gscale[e, 0],
                                         gscale[e, half], route_w[slot], gated, swiglu_limit)


@cute.jit
def grouped_gemv(x_words, w_words, scales, gscale, route_w, sorted_slots, active_experts, active_start, num_active,
                 out, stream, top_k: cutlass.Constexpr, group: cutlass.Constexpr, gated: cutlass.Constexpr,
                 swiglu_limit: cutlass.Constexpr, warps: cutlass.Constexpr, rows_per_warp: cutlass.Constexpr,
                 token_tile: cutlass.Constexpr):
    rows = out.shape[1]
    _grouped_gemv_kernel(x_words, w_words, scales, gscale, route_w, sorted_slots, active_experts, active_start,
                         num_active, out, top_k, group, gated, swiglu_limit, warps, rows_per_warp, token_tile).launch(
        grid=[(rows + warps * rows_per_warp - 1) // (warps * rows_per_warp), active_experts.shape[0], 1],
        block=[32 * warps, 1, 1],
        stream=stream)
