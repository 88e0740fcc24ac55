"""Grouped W4A16 expert GEMMs on the tensor cores (mma.sync m16n8k16, f16 in, fp32 accumulate),
CuTe DSL, sm_90a and newer. Weights are the MMA's A operand (16 output rows per warp), tokens its B
operand (8 per MMA, `n_tiles` MMAs per decoded A fragment), so a decode-sized batch wastes no
weight traffic: each expert's packed E2M1 bytes are read from memory once per `8 * n_tiles` tokens.

No re-layout of the checkpoint's bytes. The MMA sums over K in any order, so each lane is given
the K positions that are contiguous in memory: lane (g, t) of a warp (g = lane / 4, t = lane % 4)
reads, per 128-wide K block, the 16 bytes at K = 32t .. 32t+31 of weight rows g and g+8 (one
16-byte load each), their 2 NVFP4 scale bytes (one 16-bit load), and the matching 64 bytes of its
token's activations. Within each 8 weights, E2M1 nibbles j and j+4 decode together into one f16x2
(`_e2m1_pair`), and the activations come in the same pair order, so A and B agree on the order of
K by construction. The activations are ours to lay out (`kernels.moe.pair_order`, and L1's
epilogue writing h): their 16-byte vectors are interleaved across the 4 chunks of each K block,
so each of a lane's 4 activation loads is, across the warp, 64 contiguous bytes per token
instead of 16 bytes out of every 64.

Scales: the block scale is folded into the decoded f16 weight before the MMA, exactly:
  NVFP4: (v * 2^-14) * e4m3  = v * s * 2^-14, a multiple of 2^-24 with <= 6 significant bits
         and below 0.17, so f16 holds it exactly; the epilogue multiplies by 2^14 * weight_scale_2.
  MXFP4: (v * 2^-14) * 2^(s+14) = v * 2^s, exact for E8M0 scales 2^-23 .. 2^1 (real MXFP4 weights
         sit far inside; `experts.check_mxfp4_scales` rejects larger ones when experts are
         stacked; blocks below 2^-28 read as zero).

  L1 (`gated=True`):  h[slot, n] = w_route * silu(min(g1 * x.W1[n], L)) * clamp(g3 * x.W3[n], +-L)   (f16)
  L2 (`gated=False`): y[slot, n] = g2 * h[slot].W2[n]                                              (fp32)

Grid: (output rows / (16 * warps_m), max active experts); CTAs past the device-side `num_active`
exit at once, so the launch shape is static and the kernels capture into CUDA graphs. A CTA holds
warps_m x warps_k warps: warps_m take 16 rows each and share their tokens' activations through
L1; warps_k split K (K block kb goes to slice (kb / k_unroll) % warps_k) and add their partial
sums through shared memory in slice order, so the result stays deterministic. Splitting K
multiplies the warps in flight at decode, where a few experts (or one small dense weight) give too
few row tiles to keep the memory busy.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm as mlir_llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ..dependent_launch import wait_for_previous_kernel
from .w4a16_sm90 import (E2M1_F16_CORRECTION, X_ORDERED, _e2m1_pair, _e4m3_pair_to_f16x2, _ir,  # shared with the GEMV
                         activation_pairs, store_output)

ROWS = 16  # output rows per warp: the MMA's M


@dsl_user_op
def _mma_f16(a0: Int32, a1: Int32, a2: Int32, a3: Int32, b0: Int32, b1: Int32,
             c0: Float32, c1: Float32, c2: Float32, c3: Float32, *, loc=None, ip=None):
    """One m16n8k16 MMA, f16 inputs (f16x2 registers), fp32 accumulators: returns (d0, d1, d2, d3)."""
    res = mlir_llvm.inline_asm(
        mlir_llvm.StructType.get_literal([T.f32()] * 4),
        _ir(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, loc=loc, ip=ip),
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
        "{$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", loc=loc, ip=ip)
    return tuple(Float32(mlir_llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def _hmul2(a: Int32, b: Int32, *, loc=None, ip=None) -> Int32:
    """a * b on f16x2 registers, round to nearest (subnormals kept)."""
    return Int32(mlir_llvm.inline_asm(Int32.mlir_type, _ir(a, b, loc=loc, ip=ip), "mul.rn.f16x2 $0, $1, $2;",
                                      "=r,r,r", loc=loc, ip=ip))


@dsl_user_op
def _prmt(a: Int32, selector: int, *, loc=None, ip=None) -> Int32:
    """prmt.b32 a, 0 with a constant byte selector (e.g. 0x1010: the low f16 in both halves)."""
    return Int32(mlir_llvm.inline_asm(Int32.mlir_type, _ir(a, loc=loc, ip=ip), f"prmt.b32 $0, $1, 0, {selector};",
                                      "=r,r", loc=loc, ip=ip))


@cute.jit
def _scale_f16x2(byte: Int32, nvfp4: cutlass.Constexpr) -> Int32:
    """A block scale byte as the f16x2 (same value in both halves) the decoded weights are multiplied by."""
    if cutlass.const_expr(nvfp4):
        return _e4m3_pair_to_f16x2(byte | (byte << 8))
    # E8M0 2^(e-127) times 2^14: f16 exponent field e - 127 + 14 + 15; below range reads as zero.
    field = cutlass.max(cutlass.min(byte - 98, Int32(30)), Int32(0))
    return (field << 10) | (field << 26)


@cute.jit
def _load_round(w_vecs, scales, x_vecs, e, row0, n_out, xrow, kb0, t, wq, sc, xq, nvfp4: cutlass.Constexpr,
                halves: cutlass.Constexpr, n_tiles: cutlass.Constexpr, k_unroll: cutlass.Constexpr,
                x_kind: cutlass.Constexpr):
    """One round's loads into registers: k_unroll K blocks of this lane's weight rows (row0, row0 + 8,
    and the w3 half's), their scales (as f16x2), and its tokens' activations."""
    for u in cutlass.range_constexpr(k_unroll):
        kb = kb0 + u
        for half in cutlass.range_constexpr(halves):
            for r in cutlass.range_constexpr(2):
                row = row0 + 8 * r + half * n_out
                vec = w_vecs[e, row, kb * 4 + t, None].load()
                for q in cutlass.range_constexpr(4):
                    wq[u, half, r, q] = vec[q]
                if cutlass.const_expr(nvfp4):
                    # the lane's 2 scale bytes (one per 16 weights) are adjacent: one 16-bit load
                    pair = _e4m3_pair_to_f16x2(Int32(scales[e, row, kb * 4 + t]))
                    sc[u, half, r, 0] = _prmt(pair, 0x1010)  # (s0, s0)
                    sc[u, half, r, 1] = _prmt(pair, 0x3232)  # (s1, s1)
                else:
                    sc[u, half, r, 0] = _scale_f16x2(Int32(scales[e, row, kb * 4 + t]), nvfp4)
        for j in cutlass.range_constexpr(n_tiles):
            for w in cutlass.range_constexpr(4):
                # K = 128 kb + 32t + 8w ..: in activation order a warp's loads are contiguous per token
                pairs = activation_pairs(x_vecs, xrow[j], kb * 16 + 4 * t + w, x_kind)
                for q in cutlass.range_constexpr(4):
                    xq[u, j, w, q] = pairs[q]


@cute.jit
def _mma_round(wq, sc, xq, acc, nvfp4: cutlass.Constexpr, halves: cutlass.Constexpr, n_tiles: cutlass.Constexpr,
               k_unroll: cutlass.Constexpr):
    """The MMAs of one round. Step s uses weight word s // 2, pairs 2(s % 2) and 2(s % 2) + 1 (A's
    K columns 2t, 2t+1 and 2t+8, 2t+9; B's rows alike)."""
    for u in cutlass.range_constexpr(k_unroll):
        for s in cutlass.range_constexpr(8):
            w = s // 2
            p = 2 * (s % 2)
            b = w // 2 if nvfp4 else 0
            for half in cutlass.range_constexpr(halves):
                a0 = _hmul2(_e2m1_pair(wq[u, half, 0, w], p), sc[u, half, 0, b])
                a1 = _hmul2(_e2m1_pair(wq[u, half, 1, w], p), sc[u, half, 1, b])
                a2 = _hmul2(_e2m1_pair(wq[u, half, 0, w], p + 1), sc[u, half, 0, b])
                a3 = _hmul2(_e2m1_pair(wq[u, half, 1, w], p + 1), sc[u, half, 1, b])
                for j in cutlass.range_constexpr(n_tiles):
                    d = _mma_f16(a0, a1, a2, a3, xq[u, j, w, p], xq[u, j, w, p + 1],
                                 acc[j, half, 0], acc[j, half, 1], acc[j, half, 2], acc[j, half, 3])
                    for i in cutlass.range_constexpr(4):
                        acc[j, half, i] = d[i]


@cute.kernel
def _grouped_mma_kernel(
    x_vecs: cute.Tensor,       # int32 [rows_in, K/8, 4]: activations as x_kind says (w4a16_sm90)
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
    warps_m: cutlass.Constexpr,
    warps_k: cutlass.Constexpr,
    n_tiles: cutlass.Constexpr,
    k_unroll: cutlass.Constexpr,
    split_halves: cutlass.Constexpr,
    x_kind: cutlass.Constexpr,
):
    wait_for_previous_kernel()
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    bx, by, _ = cute.arch.block_idx()
    g = lane // 4
    t = lane % 4
    wm = warp % warps_m   # this warp's 16 rows within the CTA's
    wk = warp // warps_m  # and its K-slice, or with split_halves its half (0: w1, 1: w3)
    n_out = out.shape[1]
    n0 = (bx * warps_m + wm) * ROWS  # first of this warp's 16 output rows (n_out is a multiple of 16)
    nvfp4 = group == 16
    halves = 2 if gated else 1
    warp_halves = 1 if split_halves else halves  # the halves one warp computes
    n_acc = n_tiles * halves * 4
    slices = 2 if split_halves else warps_k      # warps per 16-row group
    # NVFP4: [E, N, K/32] 16-bit words, a lane's 2 scale bytes per K block; MXFP4: the bytes, 1 per lane
    lane_scales = cute.recast_tensor(scales, cutlass.Uint16) if cutlass.const_expr(nvfp4) else scales
    smem = cutlass.memory.SmemAllocator()
    partial = smem.allocate_tensor(Float32, cute.make_layout((slices, warps_m, n_acc, 32)), 16)
    if by < num_active[0] and n0 < n_out:  # uniform per CTA when warps_m divides n_out / 16 (the host checks)
        e = active_experts[by]
        s0 = active_start[by]
        s1 = active_start[by + 1]
        n_kb = w_vecs.shape[2] // 4
        for t0 in cutlass.range(s0, s1, 8 * n_tiles, unroll=1):
            # This lane's B column in each token tile: token t0 + 8j + g (clamped: extra columns are discarded).
            xrow = cute.make_rmem_tensor((n_tiles,), Int32)
            for j in cutlass.range_constexpr(n_tiles):
                slot = sorted_slots[cutlass.min(t0 + 8 * j + g, s1 - 1)]
                if cutlass.const_expr(gated):
                    xrow[j] = slot // top_k
                else:
                    xrow[j] = slot
            acc = cute.make_rmem_tensor((n_tiles, halves, 4), Float32)
            acc.fill(0.0)
            wq = cute.make_rmem_tensor((k_unroll, warp_halves, 2, 4), Int32)
            sc = cute.make_rmem_tensor((k_unroll, warp_halves, 2, 2), Int32)
            xq = cute.make_rmem_tensor((k_unroll, n_tiles, 4, 4), Int32)
            # Every load of a round first (bytes in flight), then its MMAs. (Prefetching the next
            # round into a second register buffer was slower on an H200: register pressure.)
            row0 = n0 + g + (wk * n_out if cutlass.const_expr(split_halves) else 0)
            k_slice = 0 if cutlass.const_expr(split_halves) else wk
            for kb in cutlass.range(k_slice * k_unroll, n_kb, warps_k * k_unroll, unroll=1):
                _load_round(w_vecs, lane_scales, x_vecs, e, row0, n_out, xrow, kb, t, wq, sc, xq, nvfp4, warp_halves,
                            n_tiles, k_unroll, x_kind)
                _mma_round(wq, sc, xq, acc, nvfp4, warp_halves, n_tiles, k_unroll)
            if cutlass.const_expr(split_halves):
                # The w3 warp hands its sums (in its acc[:, 0]) to the w1 warp of the same rows.
                if wk == 1:
                    for i in cutlass.range_constexpr(n_tiles * 4):
                        partial[1, wm, i, lane] = acc[i // 4, 0, i % 4]
                cute.arch.sync_threads()
                if wk == 0:
                    for i in cutlass.range_constexpr(n_tiles * 4):
                        acc[i // 4, 1, i % 4] = partial[1, wm, i, lane]
            if cutlass.const_expr(warps_k > 1):
                # K-slices other than the first hand their partial sums over in shared memory;
                # the first adds them in slice order (deterministic).
                if wk > 0:
                    for i in cutlass.range_constexpr(n_acc):
                        partial[wk, wm, i, lane] = acc[i // (halves * 4), (i // 4) % halves, i % 4]
                cute.arch.sync_threads()
                if wk == 0:
                    for i in cutlass.range_constexpr(n_acc):
                        for w in cutlass.range_constexpr(1, warps_k):
                            acc[i // (halves * 4), (i // 4) % halves, i % 4] = (
                                acc[i // (halves * 4), (i // 4) % halves, i % 4] + partial[w, wm, i, lane])
            if wk == 0:
                # Epilogue. Accumulator i of tile j: row g + 8 (i // 2), token t0 + 8j + 2t + i % 2.
                correction = E2M1_F16_CORRECTION if nvfp4 else 1.0
                for j in cutlass.range_constexpr(n_tiles):
                    for i in cutlass.range_constexpr(4):
                        tok = t0 + 8 * j + 2 * t + i % 2
                        if tok < s1:
                            slot = sorted_slots[tok]
                            up = halves - 1
                            store_output(out, slot, n0 + g + 8 * (i // 2), acc[j, 0, i], acc[j, up, i],
                                         gscale[e, 0] * correction, gscale[e, up] * correction, route_w[slot],
                                         gated, swiglu_limit)
            if cutlass.const_expr(slices > 1):
                cute.arch.sync_threads()  # the partials are read before the next token tile writes them


@cute.jit
def grouped_mma(x_vecs, w_vecs, scales, gscale, route_w, sorted_slots, active_experts, active_start, num_active,
                out, stream, top_k: cutlass.Constexpr, group: cutlass.Constexpr, gated: cutlass.Constexpr,
                swiglu_limit: cutlass.Constexpr, warps_m: cutlass.Constexpr, warps_k: cutlass.Constexpr,
                n_tiles: cutlass.Constexpr, k_unroll: cutlass.Constexpr, min_ctas: cutlass.Constexpr = 0,
                split_halves: cutlass.Constexpr = False, x_kind: cutlass.Constexpr = X_ORDERED):
    """min_ctas > 0: ask ptxas for registers that fit that many CTAs per SM (more warps in flight).
    split_halves (gated, warps_k == 1): the w1 and w3 rows of each 16-row group go to two warps,
    each holding half the weight registers; the w3 warp's sums reach the epilogue through shared memory.
    x_kind: what x_vecs holds (w4a16_sm90.X_ORDERED or X_BF16)."""
    rows = out.shape[1]
    _grouped_mma_kernel(x_vecs, w_vecs, scales, gscale, route_w, sorted_slots, active_experts, active_start,
                        num_active, out, top_k, group, gated, swiglu_limit, warps_m, warps_k, n_tiles,
                        k_unroll, split_halves, x_kind).launch(
        grid=[(rows + warps_m * ROWS - 1) // (warps_m * ROWS), active_experts.shape[0], 1],
        block=[32 * warps_m * (2 if split_halves else warps_k), 1, 1],
        stream=stream, use_pdl=True,
        min_blocks_per_mp=min_ctas,
        preferred_smem_carveout=25 if min_ctas else None)  # set: the DSL would ask a GPU for the maximum
