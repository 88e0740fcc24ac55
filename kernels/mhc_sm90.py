"""mHC coefficients (sigmoid pre/post and the Sinkhorn-normalized 4x4 mix) in one kernel, CuTe DSL.

The torch version (backend.model.sinkhorn_split, its twin) is ~80 tiny kernels per call for 20
Sinkhorn rounds, twice per layer: in a decode step that is a good part of the launch budget. Here
one thread does one token's rounds in registers. Plain SIMT: compiles for sm_90a and sm_100a.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

THREADS = 128


@cute.jit
def _sigmoid(x: Float32) -> Float32:
    return Float32(1.0) / (Float32(1.0) + cute.math.exp(-x))


@cute.kernel
def _kernel(mixes: cute.Tensor, scale: cute.Tensor, base: cute.Tensor, pre: cute.Tensor, post: cute.Tensor,
            comb: cute.Tensor, hc: cutlass.Constexpr, iters: cutlass.Constexpr, eps: cutlass.Constexpr):
    tidx, _, _ = cute.arch.thread_idx()
    bx, _, _ = cute.arch.block_idx()
    i = bx * THREADS + tidx
    if i < mixes.shape[0]:
        for j in cutlass.range_constexpr(hc):
            pre[i, j] = _sigmoid(mixes[i, j] * scale[0] + base[j]) + Float32(eps)
            post[i, j] = Float32(2.0) * _sigmoid(mixes[i, hc + j] * scale[1] + base[hc + j])
        c = cute.make_rmem_tensor((hc * hc,), Float32)
        for r in cutlass.range_constexpr(hc):  # row softmax, + eps
            top = Float32(-3.0e38)
            for k in cutlass.range_constexpr(hc):
                c[r * hc + k] = mixes[i, 2 * hc + r * hc + k] * scale[2] + base[2 * hc + r * hc + k]
                top = cutlass.max(top, c[r * hc + k])
            total = Float32(0.0)
            for k in cutlass.range_constexpr(hc):
                c[r * hc + k] = cute.math.exp(c[r * hc + k] - top)
                total = total + c[r * hc + k]
            for k in cutlass.range_constexpr(hc):
                c[r * hc + k] = c[r * hc + k] / total + Float32(eps)
        for it in cutlass.range_constexpr(2 * iters - 1):  # column first, then row/column pairs
            columns = it % 2 == 0
            for a in cutlass.range_constexpr(hc):
                total = Float32(0.0)
                for b in cutlass.range_constexpr(hc):
                    total = total + (c[b * hc + a] if columns else c[a * hc + b])
                for b in cutlass.range_constexpr(hc):
                    if cutlass.const_expr(columns):
                        c[b * hc + a] = c[b * hc + a] / (total + Float32(eps))
                    else:
                        c[a * hc + b] = c[a * hc + b] / (total + Float32(eps))
        for k in cutlass.range_constexpr(hc * hc):
            comb[i, k] = c[k]


@cute.jit
def mhc_coefficients(mixes, scale, base, pre, post, comb, stream, hc: cutlass.Constexpr, iters: cutlass.Constexpr,
                     eps: cutlass.Constexpr):
    """mixes fp32 [N, (2+hc)*hc] -> pre [N, hc], post [N, hc], comb [N, hc*hc] (row-major hc x hc)."""
    _kernel(mixes, scale, base, pre, post, comb, hc, iters, eps).launch(
        grid=[(mixes.shape[0] + THREADS - 1) // THREADS, 1, 1], block=[THREADS, 1, 1], stream=stream)
