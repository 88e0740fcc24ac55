"""mHC coefficients (sigmoid pre/post and the Sinkhorn-normalized 4x4 mix) in one kernel, CuTe DSL.

The torch version (backend.model.sinkhorn_split, its twin) is ~80 tiny kernels per call for 20
Sinkhorn rounds, twice per layer: in a decode step that is a good part of the launch budget. Here
16 lanes of a warp hold one token's 4x4 matrix, one element each; row and column sums are two
butterfly shuffles each, so a round costs a few dozen cycles. Plain SIMT: any sm_90a/sm_100a.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

HC = 4           # hc_mult of every V4 model; one lane per matrix element
THREADS = 128    # 8 tokens per block


@cute.jit
def _sigmoid(x: Float32) -> Float32:
    return Float32(1.0) / (Float32(1.0) + cute.math.exp(-x))


@cute.jit
def _sum_over(v: Float32, first: cutlass.Constexpr) -> Float32:
    """Sum of v over the 4 lanes that differ in lane bits first, first+1 (1: along a row, 4: a column)."""
    v = v + cute.arch.shuffle_sync_bfly(v, offset=first)
    return v + cute.arch.shuffle_sync_bfly(v, offset=2 * first)


@cute.kernel
def _kernel(mixes: cute.Tensor, scale: cute.Tensor, base: cute.Tensor, pre: cute.Tensor, post: cute.Tensor,
            comb: cute.Tensor, iters: cutlass.Constexpr, eps: cutlass.Constexpr):
    tidx, _, _ = cute.arch.thread_idx()
    bx, _, _ = cute.arch.block_idx()
    token = bx * (THREADS // 16) + tidx // 16
    r = (tidx % 16) // HC
    k = tidx % HC
    valid = token < mixes.shape[0]
    t = cutlass.min(token, mixes.shape[0] - 1)  # out-of-range lanes compute a copy, store nothing
    e = Float32(eps)
    c = mixes[t, 2 * HC + r * HC + k] * scale[2] + base[2 * HC + r * HC + k]
    top = cute.arch.fmax(c, cute.arch.shuffle_sync_bfly(c, offset=1))
    top = cute.arch.fmax(top, cute.arch.shuffle_sync_bfly(top, offset=2))
    c = cute.math.exp(c - top)
    c = c / _sum_over(c, 1) + e                    # row softmax, + eps
    c = c / (_sum_over(c, HC) + e)                 # column normalization
    for _ in cutlass.range(iters - 1, unroll=1):   # then rows and columns in turn
        c = c / (_sum_over(c, 1) + e)
        c = c / (_sum_over(c, HC) + e)
    if valid:
        comb[token, r * HC + k] = c
        if r == 0:
            pre[token, k] = _sigmoid(mixes[t, k] * scale[0] + base[k]) + e
            post[token, k] = Float32(2.0) * _sigmoid(mixes[t, HC + k] * scale[1] + base[HC + k])


@cute.jit
def mhc_coefficients(mixes, scale, base, pre, post, comb, stream, iters: cutlass.Constexpr, eps: cutlass.Constexpr):
    """mixes fp32 [N, 24] -> pre [N, 4], post [N, 4], comb [N, 16] (row-major 4x4)."""
    _kernel(mixes, scale, base, pre, post, comb, iters, eps).launch(
        grid=[(mixes.shape[0] * 16 + THREADS - 1) // THREADS, 1, 1], block=[THREADS, 1, 1], stream=stream)
