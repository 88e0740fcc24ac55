"""mHC pre-mix in two kernels, CuTe DSL: the streams h [T, hc, D] -> the sublayer's input
x = RMSNorm(sum_k pre_k * h_k) [T, D] (and its FP8 activation quantization), post [T, hc] and
comb [T, hc*hc] (the Sinkhorn-normalized mix). The twin is
backend.model.mhc_pre_reference.

Why two kernels: the projection of the streams on the 24 mix rows reads 1.5 MB of fp32 weights
(V4-Flash) per call, which one CTA per token would stream at a fraction of the bandwidth; torch
spends ~8 kernels per call on it (the projection, its RMS factor, the coefficients, the weighted
sum, the norm, the quantizer: H200 profile in bench/NOTES.md).

1. `mix_partials`: grid (K/128 chunks, token tiles). One warp-wide 128-element chunk of every mix
   row and of h itself (the RMS factor's sum of squares), per token: partial sums [T, chunks, 25].
2. `mhc_pre_finish`: one CTA of 16 warps per token. It loads its part of the streams first (in
   flight while the rest runs), sums the partials in a fixed order (deterministic: a graph replay
   and an eager call agree bit for bit), finds pre / post / comb (16 lanes of warp 0 hold the 4x4
   matrix, one element each; row and column sums are two butterfly shuffles), then mixes the
   streams, normalizes and quantizes the result per 128 (power-of-two scales, as the FP8 runner's
   quantizer). Plain SIMT: any sm_90a / sm_100a.

Both issue every load of a thread before using any. The first version loaded token by token
(kernel 1) and each partial behind a branch (kernel 2), with 4 warps doing the whole token: its
finishing kernel took 13 us per call at batch 8 (H200 profile); this one is not profiled yet.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from .dependent_launch import wait_for_previous_kernel
from .linear.fp8_block_sm90 import quantize_warp_block

HC = 4           # hc_mult of every V4 model; one lane per matrix element
MIXES = (2 + HC) * HC
CHUNK = 128      # K elements of one partial (a warp, 4 per lane); also the FP8 quantization block
WARPS = 4           # kernel 1: a CTA's warps share the chunk's mix rows
TOKENS_PER_CTA = 4  # kernel 1: tokens that share one CTA's weight registers
FINISH_WARPS = 16   # kernel 2: one CTA per token; its streams spread thin enough to sit in registers


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
    wait_for_previous_kernel()
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
    # Every token's chunk is loaded first (the last token repeated past the end), so the loads
    # overlap instead of costing a memory latency per token.
    t0 = by * TOKENS_PER_CTA
    x = cute.make_rmem_tensor((TOKENS_PER_CTA, 4), Float32)
    for tt in cutlass.range_constexpr(TOKENS_PER_CTA):
        chunk = h[cutlass.min(t0 + tt, h.shape[0] - 1), vec, None].load()
        for e in cutlass.range_constexpr(4):
            x[tt, e] = chunk[e]
    for tt in cutlass.range_constexpr(TOKENS_PER_CTA):
        if t0 + tt < h.shape[0]:  # uniform per CTA
            for j in cutlass.range_constexpr(per_warp):
                item = warp + WARPS * j
                if item <= MIXES:  # warp-uniform
                    acc = _dot4(x[tt, None], x[tt, None])
                    if item < MIXES:
                        acc = _dot4(x[tt, None], rows[j, None])
                    acc = cute.arch.warp_reduction_sum(acc)
                    if lane == 0:
                        partials[t0 + tt, s, item] = acc


@cute.kernel
def _finish_kernel(partials: cute.Tensor, h: cute.Tensor, scale: cute.Tensor, base: cute.Tensor, norm: cute.Tensor,
                   x_out: cute.Tensor, post: cute.Tensor, comb: cute.Tensor, q_words: cute.Tensor,
                   q_scale: cute.Tensor, dim: cutlass.Constexpr, iters: cutlass.Constexpr, eps: cutlass.Constexpr,
                   rms_eps: cutlass.Constexpr, quantize: cutlass.Constexpr):
    """partials [T, S, 25]; h [T, hc*D/4, 4]; norm [D/4, 4] -> x_out [T, D/4, 4], post [T, hc],
    comb [T, hc*hc], and (quantize) q_words int32 [T, D/4] (E4M3 bytes), q_scale [T, D/128]."""
    wait_for_previous_kernel()
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    t, _, _ = cute.arch.block_idx()
    hc_dim = HC * dim
    chunks = hc_dim // CHUNK
    blocks = dim // CHUNK  # of the output: warp w takes blocks w, w + FINISH_WARPS, ...; a lane 4 elements
    per_warp = (blocks + FINISH_WARPS - 1) // FINISH_WARPS
    smem = cutlass.memory.SmemAllocator()
    sums = smem.allocate_tensor(Float32, cute.make_layout((FINISH_WARPS, 32)), 16)
    mixes = smem.allocate_tensor(Float32, cute.make_layout((32,)), 16)
    pre = smem.allocate_tensor(Float32, cute.make_layout((HC,)), 16)
    sq = smem.allocate_tensor(Float32, cute.make_layout((FINISH_WARPS,)), 16)

    # 0. This lane's part of the streams, loaded first: the loads overlap steps 1 and 2. Past the
    #    last block a warp loads the last one again and uses nothing.
    streams = cute.make_rmem_tensor((per_warp, HC, 4), Float32)
    for j in cutlass.range_constexpr(per_warp):
        vec = cutlass.min(warp + FINISH_WARPS * j, blocks - 1) * (CHUNK // 4) + lane
        for k in cutlass.range_constexpr(HC):
            chunk = h[t, k * (dim // 4) + vec, None].load()
            for e in cutlass.range_constexpr(4):
                streams[j, k, e] = chunk[e]

    # 1. The partials of each item, warp w summing chunks w, w+16, ... (loads unconditional, so
    #    they are all in flight at once); then the warps' sums in order.
    if lane <= MIXES:
        acc = Float32(0.0)
        for first in cutlass.range_constexpr(0, chunks, FINISH_WARPS):
            v = partials[t, cutlass.min(first + warp, chunks - 1), lane]
            if cutlass.const_expr(chunks % FINISH_WARPS == 0):
                acc = acc + v
            else:
                if first + warp < chunks:
                    acc = acc + v
        sums[warp, lane] = acc
    cute.arch.sync_threads()
    if warp == 0 and lane <= MIXES:
        total = sums[0, lane]
        for other in cutlass.range_constexpr(1, FINISH_WARPS):
            total = total + sums[other, lane]
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

    # 3. y = sum_k pre_k h_k (streams in order, as the twin's sum) and its sum of squares.
    y = cute.make_rmem_tensor((per_warp, 4), Float32)
    ss = Float32(0.0)
    for j in cutlass.range_constexpr(per_warp):
        for e in cutlass.range_constexpr(4):
            y[j, e] = streams[j, 0, e] * pre[0]
            for k in cutlass.range_constexpr(1, HC):
                y[j, e] = y[j, e] + streams[j, k, e] * pre[k]
        if warp + FINISH_WARPS * j < blocks:  # warp-uniform
            for e in cutlass.range_constexpr(4):
                ss = ss + y[j, e] * y[j, e]
    ss = cute.arch.warp_reduction_sum(ss)
    if lane == 0:
        sq[warp] = ss
    cute.arch.sync_threads()
    total = sq[0]
    for other in cutlass.range_constexpr(1, FINISH_WARPS):
        total = total + sq[other]
    inv_rms = cute.math.rsqrt(total / Float32(dim) + Float32(rms_eps))

    # 4. RMSNorm, store; per 128-block: amax, power-of-two scale, E4M3 (the FP8 runner's quantizer).
    for j in cutlass.range_constexpr(per_warp):
        b = warp + FINISH_WARPS * j
        if b < blocks:
            vec = b * (CHUNK // 4) + lane
            w = cute.make_rmem_tensor((4,), Float32)
            w.store(norm[vec, None].load())
            v = cute.make_rmem_tensor((4,), Float32)
            for e in cutlass.range_constexpr(4):
                v[e] = (y[j, e] * inv_rms) * w[e]
            x_out[t, vec, None].store(v.load())
            if cutlass.const_expr(quantize):
                word, block_scale = quantize_warp_block(v)
                q_words[t, vec] = word
                if lane == 0:
                    q_scale[t, b] = block_scale


@cute.jit
def mix_partials(h: cute.Tensor, fn: cute.Tensor, partials: cute.Tensor, stream):
    """h fp32 [T, K/4, 4]; fn fp32 [24, K/4, 4]; partials fp32 [T, K/128, 25]."""
    _partials_kernel(h, fn, partials).launch(
        grid=[partials.shape[1], (h.shape[0] + TOKENS_PER_CTA - 1) // TOKENS_PER_CTA, 1],
        block=[32 * WARPS, 1, 1], stream=stream, use_pdl=True)


@cute.jit
def mhc_pre_finish(partials, h, scale, base, norm, x_out, post, comb, q_words, q_scale, stream,
                   dim: cutlass.Constexpr, iters: cutlass.Constexpr, eps: cutlass.Constexpr,
                   rms_eps: cutlass.Constexpr, quantize: cutlass.Constexpr):
    """See _finish_kernel; one CTA per token."""
    _finish_kernel(partials, h, scale, base, norm, x_out, post, comb, q_words, q_scale, dim, iters, eps, rms_eps,
                   quantize).launch(grid=[h.shape[0], 1, 1], block=[32 * FINISH_WARPS, 1, 1], stream=stream,
                              use_pdl=True)
