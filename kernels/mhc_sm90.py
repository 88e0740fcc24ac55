"""mHC pre-mix in two kernels, CuTe DSL: the streams h [T, hc, D] -> the sublayer's input
x = RMSNorm(sum_k pre_k * h_k) [T, D] (and its FP8 activation quantization), post [T, hc] and
comb [T, hc*hc] (the Sinkhorn-normalized mix). The twin is backend.model's hc_mixes,
sinkhorn_split and sublayer_input.

Why two kernels: the projection of the streams on the 24 mix rows reads 1.5 MB of fp32 weights
(V4-Flash) per call, which one CTA per token would stream at a fraction of the bandwidth; torch
spends ~8 kernels per call on it (the projection, its RMS factor, the coefficients, the weighted
sum, the norm, the quantizer: H200 profile in bench/NOTES.md).

1. `mix_partials`: grid (K/128 chunks, token tiles). One warp-wide 128-element chunk of every mix
   row and of h itself (the RMS factor's sum of squares), per token: partial sums [T, chunks, 25].
2. `mhc_pre_finish`: one CTA per token sums the partials in a fixed order (deterministic: a graph
   replay and an eager call agree bit for bit), finds pre / post / comb (16 lanes of warp 0 hold
   the 4x4 matrix, one element each; row and column sums are two butterfly shuffles), then mixes
   the streams, normalizes and quantizes the result per 128 (power-of-two scales, as the FP8
   runner's quantizer). Plain SIMT: any sm_90a / sm_100a.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from .linear.fp8_block_sm90 import _pack_e4m3x4

HC = 4           # hc_mult of every V4 model; one lane per matrix element
MIXES = (2 + HC) * HC
CHUNK = 128      # K elements of one partial (a warp, 4 per lane); also the FP8 quantization block
WARPS = 4
TOKENS_PER_CTA = 4  # kernel 1: tokens that share one CTA's weight registers


@cute.jit
def _sigmoid(x: Float32) -> Float32:
    return Float32(1.0) / (Float32(1.0) + cute.math.exp(-x))


@cute.jit
def _sum_over(v: Float32, first: cutlass.Constexpr) -> Float32:
    """Sum of v over the 4 lanes that differ in lane bits first, first+1 (1: along a row, 4: a column)."""
    v = v + cute.arch.shuffle_sync_bfly(v, offset=first)
    return v + cute.arch.shuffle_sync_bfly(v, offset=2 * first)


@cute.jit
def _dot4(a, b) -> Float32:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3]


@cute.kernel
def _partials_kernel(h: cute.Tensor, fn: cute.Tensor, partials: cute.Tensor):
    """h [T, K/4, 4], fn [24, K/4, 4] -> partials [T, K/128, 25]: item i < 24 is chunk s of h . fn[i],
    item 24 is chunk s of h . h. Warp w takes items w, w+4, ..."""
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    s, by, _ = cute.arch.block_idx()
    per_warp = (MIXES + 1 + WARPS - 1) // WARPS
    vec = s * (CHUNK // 4) + lane
    rows = cute.make_rmem_tensor((per_warp, 4), Float32)
    for j in cutlass.range_constexpr(per_warp):
        item = warp + WARPS * j
        if item < MIXES:
            w = fn[item, vec, None].load()
            for e in cutlass.range_constexpr(4):
                rows[j, e] = w[e]
    t_end = cutlass.min(by * TOKENS_PER_CTA + TOKENS_PER_CTA, h.shape[0])
    x = cute.make_rmem_tensor((4,), Float32)
    for t in cutlass.range(by * TOKENS_PER_CTA, t_end, unroll=1):
        x.store(h[t, vec, None].load())
        for j in cutlass.range_constexpr(per_warp):
            item = warp + WARPS * j
            if item <= MIXES:  # warp-uniform
                acc = _dot4(x, x)
                if item < MIXES:
                    acc = _dot4(x, rows[j, None])
                acc = cute.arch.warp_reduction_sum(acc)
                if lane == 0:
                    partials[t, s, item] = acc


@cute.kernel
def _finish_kernel(partials: cute.Tensor, h: cute.Tensor, scale: cute.Tensor, base: cute.Tensor, norm: cute.Tensor,
                   x_out: cute.Tensor, post: cute.Tensor, comb: cute.Tensor, q_words: cute.Tensor,
                   q_scale: cute.Tensor, dim: cutlass.Constexpr, iters: cutlass.Constexpr, eps: cutlass.Constexpr,
                   rms_eps: cutlass.Constexpr, quantize: cutlass.Constexpr):
    """partials [T, S, 25]; h [T, hc*D/4, 4]; norm [D/4, 4] -> x_out [T, D/4, 4], post [T, hc],
    comb [T, hc*hc], and (quantize) q_words int32 [T, D/4] (E4M3 bytes), q_scale [T, D/128]."""
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    t, _, _ = cute.arch.block_idx()
    hc_dim = HC * dim
    chunks = hc_dim // CHUNK
    smem = cutlass.memory.SmemAllocator()
    sums = smem.allocate_tensor(Float32, cute.make_layout((WARPS, 32)), 16)
    mixes = smem.allocate_tensor(Float32, cute.make_layout((32,)), 16)
    pre = smem.allocate_tensor(Float32, cute.make_layout((HC,)), 16)
    sq = smem.allocate_tensor(Float32, cute.make_layout((WARPS,)), 16)

    # 1. The partials of each item, warp w summing chunks w, w+4, ...; then the warps' sums in order.
    if lane <= MIXES:
        acc = Float32(0.0)
        for s in cutlass.range_constexpr(0, chunks, WARPS):
            if s + warp < chunks:
                acc = acc + partials[t, s + warp, lane]
        sums[warp, lane] = acc
    cute.arch.sync_threads()
    if warp == 0 and lane <= MIXES:
        total = sums[0, lane]
        for w in cutlass.range_constexpr(1, WARPS):
            total = total + sums[w, lane]
        mixes[lane] = total
    cute.arch.sync_threads()

    # 2. Coefficients: mixes = projection * rsqrt(mean(h^2) + eps), then sigmoids and Sinkhorn.
    # The whole warp runs it (the shuffles name every lane): lanes 16-31 compute a copy, store nothing.
    if warp == 0:
        rms = cute.math.rsqrt(mixes[MIXES] / Float32(hc_dim) + Float32(rms_eps))
        el = lane % (HC * HC)
        k = el % HC
        floor = Float32(eps)  # added after the softmax and to every sum, as the twin
        c = (mixes[2 * HC + el] * rms) * scale[2] + base[2 * HC + el]
        top = cute.arch.fmax(c, cute.arch.shuffle_sync_bfly(c, offset=1))
        top = cute.arch.fmax(top, cute.arch.shuffle_sync_bfly(top, offset=2))
        c = cute.math.exp(c - top)
        c = c / _sum_over(c, 1) + floor                  # row softmax, + eps
        c = c / (_sum_over(c, HC) + floor)               # column normalization
        for _ in cutlass.range(iters - 1, unroll=1):   # then rows and columns in turn
            c = c / (_sum_over(c, 1) + floor)
            c = c / (_sum_over(c, HC) + floor)
        if lane < HC * HC:
            comb[t, lane] = c
        if lane < HC:
            pre[k] = _sigmoid((mixes[k] * rms) * scale[0] + base[k]) + floor
            post[t, k] = Float32(2.0) * _sigmoid((mixes[HC + k] * rms) * scale[1] + base[HC + k])
    cute.arch.sync_threads()

    # 3. y = sum_k pre_k h_k: warp w takes 128-element blocks w, w+4, ...; lane 4 elements of each.
    blocks = dim // CHUNK
    per_warp = (blocks + WARPS - 1) // WARPS
    y = cute.make_rmem_tensor((per_warp, 4), Float32)
    ss = Float32(0.0)
    for j in cutlass.range_constexpr(per_warp):
        b = warp + WARPS * j
        if b < blocks:
            vec = b * (CHUNK // 4) + lane
            for k in cutlass.range_constexpr(HC):  # streams in order, as the twin's sum
                stream = cute.make_rmem_tensor((4,), Float32)
                stream.store(h[t, k * (dim // 4) + vec, None].load())
                for e in cutlass.range_constexpr(4):
                    if cutlass.const_expr(k == 0):
                        y[j, e] = stream[e] * pre[0]
                    else:
                        y[j, e] = y[j, e] + stream[e] * pre[k]
            for e in cutlass.range_constexpr(4):
                ss = ss + y[j, e] * y[j, e]
    ss = cute.arch.warp_reduction_sum(ss)
    if lane == 0:
        sq[warp] = ss
    cute.arch.sync_threads()
    total = sq[0]
    for w in cutlass.range_constexpr(1, WARPS):
        total = total + sq[w]
    inv_rms = cute.math.rsqrt(total / Float32(dim) + Float32(rms_eps))

    # 4. RMSNorm, store; per 128-block: amax, power-of-two scale, E4M3 (the FP8 runner's quantizer).
    for j in cutlass.range_constexpr(per_warp):
        b = warp + WARPS * j
        if b < blocks:
            vec = b * (CHUNK // 4) + lane
            w = cute.make_rmem_tensor((4,), Float32)
            w.store(norm[vec, None].load())
            v = cute.make_rmem_tensor((4,), Float32)
            amax = Float32(1e-4)  # DeepSeek's floor on a block's amax
            for e in cutlass.range_constexpr(4):
                v[e] = (y[j, e] * inv_rms) * w[e]
                amax = cutlass.max(amax, cute.arch.fmax(v[e], -v[e]))
            x_out[t, vec, None].store(v.load())
            if cutlass.const_expr(quantize):
                amax = cute.arch.warp_reduction_max(amax)
                # 2^ceil(log2(amax / 448)) exactly: round the fp32 bits up to the next power of two.
                ratio_bits = (amax / Float32(448.0)).bitcast(Int32)
                up = (ratio_bits + 0x7FFFFF) & 0x7F800000
                inv = Int32(0x7F000000 - up).bitcast(Float32)  # 1/scale, exact
                q_words[t, vec] = _pack_e4m3x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv)
                if lane == 0:
                    q_scale[t, b] = Int32(up).bitcast(Float32)


@cute.jit
def mix_partials(h: cute.Tensor, fn: cute.Tensor, partials: cute.Tensor, stream):
    """h fp32 [T, K/4, 4]; fn fp32 [24, K/4, 4]; partials fp32 [T, K/128, 25]."""
    _partials_kernel(h, fn, partials).launch(
        grid=[partials.shape[1], (h.shape[0] + TOKENS_PER_CTA - 1) // TOKENS_PER_CTA, 1],
        block=[32 * WARPS, 1, 1], stream=stream)


@cute.jit
def mhc_pre_finish(partials, h, scale, base, norm, x_out, post, comb, q_words, q_scale, stream,
                   dim: cutlass.Constexpr, iters: cutlass.Constexpr, eps: cutlass.Constexpr,
                   rms_eps: cutlass.Constexpr, quantize: cutlass.Constexpr):
    """See _finish_kernel; one CTA per token."""
    _finish_kernel(partials, h, scale, base, norm, x_out, post, comb, q_words, q_scale, dim, iters, eps, rms_eps,
                   quantize).launch(grid=[h.shape[0], 1, 1], block=[32 * WARPS, 1, 1], stream=stream)
