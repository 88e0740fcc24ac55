"""Grouped W4A16 expert GEMVs for decode-sized batches, CuTe DSL (compiles for sm_90a and newer).

One warp computes `rows` output rows of one active expert for that expert's tokens (up to
`token_tile` per pass over the weights). Lane l takes the 16-byte vectors v = l, l + 32, ... of each
row's packed E2M1 bytes (coalesced across the warp); `k_unroll` vectors per row are loaded per round,
with their block scales and the tokens' activations, before any of them is used, so each warp has
k_unroll * rows * 16 bytes per lane in flight; `pipelined` issues the next round's loads before a
round's products, so that a warp has weights in flight while it computes (twice the registers).
The E2M1 pairs decode in registers, products accumulate in f16x2 per 16 weights and in fp32 across
them, times the block scale (NVFP4: E4M3 per 16, MXFP4: E8M0 per 32), then a reduction across the
warp. `warps_k` warps of a CTA split a row's vectors round by round and add their sums through
shared memory in a fixed order (deterministic): a small dense weight, or a few experts, then still
gives the GPU enough warps.
Grid: (rows / (warps_m * rows), max active experts); CTAs past the device-side `num_active` exit, so
the launch shape is static and the kernels capture into CUDA graphs.

  L1 (`gated=True`):  h[slot, n] = w_route * silu(min(g1 * x.W1[n], L)) * clamp(g3 * x.W3[n], +-L)   (f16)
  L2 (`gated=False`): y[slot, n] = g2 * h[slot].W2[n]                                              (fp32)

E2M1 decode: the 3 magnitude bits go under an f16 exponent/mantissa (value * 2^-14, subnormals
included) and the sign on top; the 2^14 is folded into the global scale in the epilogue. Block
scales convert exactly: two E4M3 bytes with one cvt to f16x2, an E8M0 byte as an fp32 exponent.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm as mlir_llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from ..dependent_launch import wait_for_previous_kernel
from . import activation_position

E2M1_F16_CORRECTION = 2.0**14  # decoded f16 = value * 2^-14
# What the kernels' activation tensor holds (`x_kind`): f16 in activation order (kernels.moe.pair_order;
# the MoE, whose L1 writes h so), or a dense layer's own bf16 rows in K order, which the kernels
# round to f16 as they load them (one kernel fewer per dense call; kernels.linear.w4a16 says where).
X_ORDERED, X_BF16 = 0, 1
X_F32 = 2  # fp32 rows: what the layout kernel (layout_sm90) reads; the GEMMs are not compiled for it


def _ir(*values, loc=None, ip=None):
    return [v.ir_value(loc=loc, ip=ip) for v in values]


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


@dsl_user_op
def _e4m3_pair_to_f16x2(pair: Int32, *, loc=None, ip=None) -> Int32:
    """The two E4M3 bytes in the low 16 bits of `pair` as an exact f16x2 (low byte in the low half)."""
    return Int32(mlir_llvm.inline_asm(
        Int32.mlir_type, _ir(pair, loc=loc, ip=ip),
        "{ .reg .b16 s; cvt.u16.u32 s, $1; cvt.rn.f16x2.e4m3x2 $0, s; }", "=r,r", loc=loc, ip=ip))


@dsl_user_op
def _f16x2_to_f32(h: Int32, *, loc=None, ip=None):
    """Both halves of an f16x2 as fp32: (low, high)."""
    res = mlir_llvm.inline_asm(
        mlir_llvm.StructType.get_literal([T.f32()] * 2), _ir(h, loc=loc, ip=ip),
        "{ .reg .f16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }", "=f,=f,r",
        loc=loc, ip=ip)
    return tuple(Float32(mlir_llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(2))


@dsl_user_op
def _hfma2(a: Int32, b: Int32, c: Int32, *, loc=None, ip=None) -> Int32:
    """a * b + c on f16x2 registers."""
    return Int32(mlir_llvm.inline_asm(Int32.mlir_type, _ir(a, b, c, loc=loc, ip=ip),
                                      "fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", loc=loc, ip=ip))


@dsl_user_op
def _f16x2_sum(h: Int32, *, loc=None, ip=None) -> Float32:
    """lo + hi of an f16x2, in fp32."""
    return Float32(mlir_llvm.inline_asm(
        Float32.mlir_type, _ir(h, loc=loc, ip=ip),
        "{ .reg .f16 lo, hi; .reg .f32 a, b; mov.b32 {lo, hi}, $1; cvt.f32.f16 a, lo; cvt.f32.f16 b, hi; "
        "add.f32 $0, a, b; }", "=f,r", loc=loc, ip=ip))


@dsl_user_op
def _f16x2_from_f32(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Int32:
    """Two fp32 rounded to an f16x2 (round to nearest even, subnormals kept, as torch's .half())."""
    return Int32(mlir_llvm.inline_asm(Int32.mlir_type, _ir(lo, hi, loc=loc, ip=ip), "cvt.rn.f16x2.f32 $0, $2, $1;",
                                      "=r,f,f", loc=loc, ip=ip))


@cute.jit
def _bf16_as_f32(word: Int32, high: cutlass.Constexpr) -> Float32:
    """The low or high bf16 of a 32-bit word as fp32 (exact: its bits on top)."""
    bits = word & -65536 if cutlass.const_expr(high) else word << 16
    return bits.bitcast(Float32)


@cute.jit
def activation_pairs(x_vecs: cute.Tensor, row: Int32, k8: Int32, x_kind: cutlass.Constexpr):
    """Activations K = 8 k8 .. 8 k8 + 7 of row `row` as the 4 f16x2 the E2M1 pair decode meets:
    elements (q, q + 4) for q < 4. x_vecs holds 16-byte vectors: X_ORDERED f16 in activation order
    (logical vector 4t + w of a 128-wide K block sits at 4w + t), X_BF16 8 bf16 in K order, X_F32 4 fp32."""
    if cutlass.const_expr(x_kind == X_F32):  # elements 0-3 in one vector, 4-7 in the next
        lo = x_vecs[row, 2 * k8, None].load()
        hi = x_vecs[row, 2 * k8 + 1, None].load()
        return (_f16x2_from_f32(Int32(lo[0]).bitcast(Float32), Int32(hi[0]).bitcast(Float32)),
                _f16x2_from_f32(Int32(lo[1]).bitcast(Float32), Int32(hi[1]).bitcast(Float32)),
                _f16x2_from_f32(Int32(lo[2]).bitcast(Float32), Int32(hi[2]).bitcast(Float32)),
                _f16x2_from_f32(Int32(lo[3]).bitcast(Float32), Int32(hi[3]).bitcast(Float32)))
    return pairs_from_words(activation_words(x_vecs, row, k8, x_kind), x_kind)


@cute.jit
def activation_words(x_vecs: cute.Tensor, row: Int32, k8: Int32, x_kind: cutlass.Constexpr):
    """The 4 words (one 16-byte vector) holding activations K = 8 k8 .. 8 k8 + 7 of row `row`, as
    loaded: X_ORDERED or X_BF16 (pairs_from_words makes the pairs; no arithmetic here, so a load
    issued ahead does not wait for its data)."""
    xv = x_vecs[row, ordered_position(k8) if cutlass.const_expr(x_kind == X_ORDERED) else k8, None].load()
    return Int32(xv[0]), Int32(xv[1]), Int32(xv[2]), Int32(xv[3])


@cute.jit
def pairs_from_words(words, x_kind: cutlass.Constexpr):
    """activation_words' 4 words as the 4 f16x2 pairs (q, q + 4): X_ORDERED holds them already,
    X_BF16 holds element e in word e // 2 (its high half for odd e), rounded to f16 here."""
    if cutlass.const_expr(x_kind == X_ORDERED):
        return words
    w0, w1, w2, w3 = words
    return (_f16x2_from_f32(_bf16_as_f32(w0, False), _bf16_as_f32(w2, False)),
            _f16x2_from_f32(_bf16_as_f32(w0, True), _bf16_as_f32(w2, True)),
            _f16x2_from_f32(_bf16_as_f32(w1, False), _bf16_as_f32(w3, False)),
            _f16x2_from_f32(_bf16_as_f32(w1, True), _bf16_as_f32(w3, True)))


@cute.jit
def ordered_position(k8: Int32) -> Int32:
    """Where logical 8-vector k8 of a row sits in the activation order (within each 128-wide K
    block, vector w of chunk t at 4w + t)."""
    return (k8 & -16) | ((k8 & 3) << 2) | ((k8 >> 2) & 3)


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
        out[slot, activation_position(n)] = (route_weight * silu * up).to(cutlass.Float16)
    else:
        out[slot, n] = acc * scale


@cute.jit
def _load_round(w_vecs, lane_scales, x_vecs, e, n0, n_out, xrow, v0, n_vecs, wq, sraw, xw, halves: cutlass.Constexpr,
                rows: cutlass.Constexpr, token_tile: cutlass.Constexpr, k_unroll: cutlass.Constexpr,
                x_kind: cutlass.Constexpr):
    """Every load of one round into registers, as loaded (_dot_round does the arithmetic): vectors
    v0 + 32u of the warp's weight rows, their block scale bits, and the tokens' activations for
    them. A vector past the row's end reads the last one (_dot_round zeroes its scales)."""
    for u in cutlass.range_constexpr(k_unroll):
        v = cutlass.min(v0 + 32 * u, n_vecs - 1)
        for r in cutlass.range_constexpr(rows):
            for half in cutlass.range_constexpr(halves):
                row = n0 + r + half * n_out
                vec = w_vecs[e, row, v, None].load()
                for q in cutlass.range_constexpr(4):
                    wq[u, r, half, q] = vec[q]
                # NVFP4: the vector's 2 adjacent scale bytes in one 16-bit load; MXFP4: its byte
                sraw[u, r, half] = Int32(lane_scales[e, row, v])
        for tt in cutlass.range_constexpr(token_tile):
            for q in cutlass.range_constexpr(4):  # the 8 activations of weights 32v + 8q ..
                words = activation_words(x_vecs, xrow[tt], 4 * v + q, x_kind)
                for j in cutlass.range_constexpr(4):
                    xw[u, tt, q, j] = words[j]


@cute.jit
def _dot_round(wq, sraw, xw, acc, v0, n_vecs, n_valid, nvfp4: cutlass.Constexpr, halves: cutlass.Constexpr,
               rows: cutlass.Constexpr, token_tile: cutlass.Constexpr, k_unroll: cutlass.Constexpr,
               x_kind: cutlass.Constexpr):
    """The products of one round loaded by _load_round: per 16 weights (an NVFP4 block) an f16x2 chain
    of 8 FMAs, then fp32 times the block scale (exact: NVFP4 two E4M3 with one cvt to f16x2, MXFP4
    E8M0 2^(byte - 127) as an fp32 exponent, code 0 as 0; zero past the row's end: adds nothing)."""
    for u in cutlass.range_constexpr(k_unroll):
        keep = Float32(1.0) if v0 + 32 * u < n_vecs else Float32(0.0)
        sc = cute.make_rmem_tensor((rows, halves, 2), Float32)
        for r in cutlass.range_constexpr(rows):
            for half in cutlass.range_constexpr(halves):
                if cutlass.const_expr(nvfp4):
                    s0, s1 = _f16x2_to_f32(_e4m3_pair_to_f16x2(sraw[u, r, half]))
                    sc[r, half, 0] = s0 * keep
                    sc[r, half, 1] = s1 * keep
                else:
                    sc[r, half, 0] = Int32(sraw[u, r, half] << 23).bitcast(Float32) * keep
        for b in cutlass.range_constexpr(2):  # words 2b, 2b+1: weights 16b..16b+15 of the vector's 32
            for tt in cutlass.range_constexpr(token_tile):
                if tt == 0 or tt < n_valid:  # a tile's first token is always there: no branch
                    x_pairs = (_word_pairs(xw, u, tt, 2 * b, x_kind), _word_pairs(xw, u, tt, 2 * b + 1, x_kind))
                    for r in cutlass.range_constexpr(rows):
                        for half in cutlass.range_constexpr(halves):
                            dot = Int32(0)
                            for q in cutlass.range_constexpr(2):
                                for j in cutlass.range_constexpr(4):
                                    dot = _hfma2(_e2m1_pair(wq[u, r, half, 2 * b + q], j), x_pairs[q][j], dot)
                            acc[tt, r, half] = acc[tt, r, half] + _f16x2_sum(dot) * sc[r, half, b if nvfp4 else 0]


@cute.jit
def _word_pairs(xw, u: cutlass.Constexpr, tt: cutlass.Constexpr, q: cutlass.Constexpr, x_kind: cutlass.Constexpr):
    """The activation pairs of one loaded 16-byte vector of xw (see pairs_from_words)."""
    return pairs_from_words((xw[u, tt, q, 0], xw[u, tt, q, 1], xw[u, tt, q, 2], xw[u, tt, q, 3]), x_kind)


@cute.jit
def _prefetch_rows(w_vecs: cute.Tensor, scales: cute.Tensor, active_experts: cute.Tensor, num_active: cute.Tensor,
                   by: Int32, n0: Int32, n_out: Int32, lane: Int32, wk: Int32, warps_k: cutlass.Constexpr,
                   rows: cutlass.Constexpr, k_unroll: cutlass.Constexpr, prefetch_rounds: cutlass.Constexpr):
    """L2 (and a dense W4A16 linear): the 128-byte lines of the warp's first `prefetch_rounds`
    rounds of its weight rows, and their first scales, into the L2 cache while the kernel before
    (L1) still runs: enough to start streaming at once. Whole rows (as before) ran 9-20% slower
    on dense weights of 19-66 MB (an H200: they evict each other from the 50 MB L2 and compete
    with the kernel before for memory), and the MoE's L2 4-16% slower at 4-16 tokens
    (bench/NOTES.md). A hint only: the active experts come from the dispatch kernel, which had
    finished before L1 let this kernel start (kernels.dependent_launch), but nothing relies on
    reading them right here (the GEMV reads them again after its wait), so an index read from a
    buffer still being written only costs a wasted prefetch; indices are bounds-checked."""
    e = active_experts[by]  # by < its size: the grid has one row of CTAs per entry
    if by < num_active[0] and e >= 0 and e < w_vecs.shape[0] and n0 < n_out:
        per_round = 4 * k_unroll  # 128-byte lines (8 vectors) per row and round
        per_row = prefetch_rounds * per_round
        for i in cutlass.range_constexpr((rows * per_row + 31) // 32):  # a line per lane
            line = lane + 32 * i
            r = line // per_row
            v = (((line % per_row) // per_round * warps_k + wk) * per_round + line % per_round) * 8
            if r < rows and v < w_vecs.shape[2]:
                cute.arch.prefetch(w_vecs[e, n0 + r, v, None].iterator.llvm_ptr, cache_level="L2")
        if wk == 0 and lane < rows:
            cute.arch.prefetch(scales[e, n0 + lane, None].iterator.llvm_ptr, cache_level="L2")


@cute.jit
def _round_registers(halves: cutlass.Constexpr, rows: cutlass.Constexpr, token_tile: cutlass.Constexpr,
                     k_unroll: cutlass.Constexpr):
    """Registers for one round as _load_round fills them: weight words, scale bits, activation words."""
    return (cute.make_rmem_tensor((k_unroll, rows, halves, 4), Int32),
            cute.make_rmem_tensor((k_unroll, rows, halves), Int32),
            cute.make_rmem_tensor((k_unroll, token_tile, 4, 4), Int32))


def _acc_coord(i: int, rows: int, halves: int) -> tuple:
    """Accumulator i's (token, row, half)."""
    return i // (rows * halves), (i // halves) % rows, i % halves


@cute.kernel
def _grouped_gemv_kernel(
    x_vecs: cute.Tensor,       # int32 [rows_in, K/8, 4]: activations as x_kind says
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
    rows: cutlass.Constexpr,
    token_tile: cutlass.Constexpr,
    k_unroll: cutlass.Constexpr,
    x_kind: cutlass.Constexpr,
    pipelined: cutlass.Constexpr,
    prefetch_rounds: cutlass.Constexpr,
):
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    bx, by, _ = cute.arch.block_idx()
    wm = warp % warps_m  # this warp's rows within the CTA's
    wk = warp // warps_m  # and its share of the rounds
    n_out = out.shape[1]
    n0 = (bx * warps_m + wm) * rows  # first of this warp's rows (n_out is a multiple of `rows`)
    if cutlass.const_expr(not gated and prefetch_rounds != 0):
        _prefetch_rows(w_vecs, scales, active_experts, num_active, by, n0, n_out, lane, wk, warps_k, rows, k_unroll,
                       prefetch_rounds)
    wait_for_previous_kernel()
    nvfp4 = group == 16
    halves = 2 if gated else 1
    n_acc = token_tile * rows * halves
    # NVFP4: [E, N, K/32] 16-bit words, a vector's 2 scale bytes; MXFP4: the bytes, 1 per vector
    lane_scales = cute.recast_tensor(scales, cutlass.Uint16) if cutlass.const_expr(nvfp4) else scales
    smem = cutlass.memory.SmemAllocator()
    partial = smem.allocate_tensor(Float32, cute.make_layout((warps_k, warps_m, n_acc)), 16)
    if by < num_active[0]:  # uniform per CTA: every warp reaches the barriers below
        e = active_experts[by]
        s0 = active_start[by]
        s1 = active_start[by + 1]
        n_vecs = w_vecs.shape[2]
        rows_here = n0 < n_out  # warp-uniform
        for t0 in cutlass.range(s0, s1, token_tile, unroll=1):
            n_valid = cutlass.min(s1 - t0, token_tile)  # warp-uniform
            xrow = cute.make_rmem_tensor((token_tile,), Int32)
            for tt in cutlass.range_constexpr(token_tile):
                slot = sorted_slots[cutlass.min(t0 + tt, s1 - 1)]
                xrow[tt] = slot // top_k if cutlass.const_expr(gated) else slot
            acc = cute.make_rmem_tensor((token_tile, rows, halves), Float32)
            acc.fill(0.0)
            if rows_here:
                source = (w_vecs, lane_scales, x_vecs, e, n0, n_out, xrow)  # what _load_round reads
                tiling = (halves, rows, token_tile, k_unroll, x_kind)
                loaded = _round_registers(*tiling[:4])
                first, step = wk * 32 * k_unroll + lane, warps_k * 32 * k_unroll
                if cutlass.const_expr(pipelined):
                    # Two rounds in flight: the next one's loads go out before this one's products,
                    # so the warp always has weights on the way (registers for two rounds).
                    ahead = _round_registers(*tiling[:4])
                    _load_round(*source, first, n_vecs, *loaded, *tiling)
                    for v0 in cutlass.range(first, n_vecs, 2 * step, unroll=1):
                        _load_round(*source, v0 + step, n_vecs, *ahead, *tiling)
                        _dot_round(*loaded, acc, v0, n_vecs, n_valid, nvfp4, *tiling)
                        _load_round(*source, v0 + 2 * step, n_vecs, *loaded, *tiling)
                        if v0 - lane + step < n_vecs:  # warp-uniform: the round ahead has vectors
                            _dot_round(*ahead, acc, v0 + step, n_vecs, n_valid, nvfp4, *tiling)
                else:
                    for v0 in cutlass.range(first, n_vecs, step, unroll=1):
                        _load_round(*source, v0, n_vecs, *loaded, *tiling)
                        _dot_round(*loaded, acc, v0, n_vecs, n_valid, nvfp4, *tiling)
                for i in cutlass.range_constexpr(n_acc):
                    acc[_acc_coord(i, rows, halves)] = cute.arch.warp_reduction_sum(acc[_acc_coord(i, rows, halves)])
            if cutlass.const_expr(warps_k > 1):
                # The other K shares hand their sums over in shared memory; the first adds them in order.
                if wk > 0 and lane == 0:
                    for i in cutlass.range_constexpr(n_acc):
                        partial[wk, wm, i] = acc[_acc_coord(i, rows, halves)]
                cute.arch.sync_threads()
                if wk == 0 and lane == 0:
                    for i in cutlass.range_constexpr(n_acc):
                        for w in cutlass.range_constexpr(1, warps_k):
                            acc[_acc_coord(i, rows, halves)] = acc[_acc_coord(i, rows, halves)] + partial[w, wm, i]
                cute.arch.sync_threads()  # read before the next token tile writes them
            if rows_here and wk == 0 and lane == 0:
                up = halves - 1
                for tt in cutlass.range_constexpr(token_tile):
                    if t0 + tt < s1:
                        slot = sorted_slots[t0 + tt]
                        for r in cutlass.range_constexpr(rows):
                            store_output(out, slot, n0 + r, acc[tt, r, 0], acc[tt, r, up],
                                         gscale[e, 0] * E2M1_F16_CORRECTION, gscale[e, up] * E2M1_F16_CORRECTION,
                                         route_w[slot], gated, swiglu_limit)


@cute.jit
def grouped_gemv(x_words, w_words, scales, gscale, route_w, sorted_slots, active_experts, active_start, num_active,
                 out, stream, top_k: cutlass.Constexpr, group: cutlass.Constexpr, gated: cutlass.Constexpr,
                 swiglu_limit: cutlass.Constexpr, warps_m: cutlass.Constexpr, warps_k: cutlass.Constexpr,
                 rows: cutlass.Constexpr, token_tile: cutlass.Constexpr, k_unroll: cutlass.Constexpr,
                 x_kind: cutlass.Constexpr = X_ORDERED, pipelined: cutlass.Constexpr = False,
                 prefetch_rounds: cutlass.Constexpr = 1):
    n_out = out.shape[1]
    _grouped_gemv_kernel(x_words, w_words, scales, gscale, route_w, sorted_slots, active_experts, active_start,
                         num_active, out, top_k, group, gated, swiglu_limit, warps_m, warps_k, rows, token_tile,
                         k_unroll, x_kind, pipelined, prefetch_rounds).launch(
        grid=[(n_out + warps_m * rows - 1) // (warps_m * rows), active_experts.shape[0], 1],
        block=[32 * warps_m * warps_k, 1, 1],
        stream=stream, use_pdl=True)
