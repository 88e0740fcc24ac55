"""Linears with fp32 math for a handful of tokens, CuTe DSL (sm_90a and newer): y = x @ W^T with x
fp32 [T, K], W BF16 or fp32 [N, K] (the gate, the compressors' wkv||wgate and the indexer's
weights_proj, which DeepSeek's reference multiplies in fp32), y fp32 [T, N].

A decode step runs them on up to 16 tokens; cuBLAS's fp32 kernels for such shapes read the
weight far below the memory's rate (an H200 at 8 tokens: 45.6 us for a 32 MB compressor, 21 us for
the 4 MB gate; bench/NOTES.md). Here one warp computes `rows` output rows for all tokens: lane l
takes the weight's 16-byte vectors v = l, l + 32, ... of each row (8 BF16 or 4 fp32, coalesced
across the warp), widens them to fp32 in registers (BF16 is the top half of an fp32) and
accumulates fp32 FMAs with each token's matching activations, then the warp adds its lanes.
`warps_k` warps of a CTA split a row's vectors and add their sums through shared memory in a fixed
order (deterministic), so that a small weight still gives the GPU enough warps. Products are exact
widenings of what F.linear(x, W.float()) multiplies; only the order of the fp32 sums differs.
Grid: (N / (WARPS_M * rows),); `max_tokens` is static per compiled variant, T <= it at run time.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from ..dependent_launch import wait_for_previous_kernel

WARPS_M = 1  # warps splitting a CTA's rows (one: a CTA of warps_k <= 8 warps keeps its registers unbounded)
ROWS = 4     # output rows per warp (ptxas hoists every token's activation loads: 214 registers at
             # 16 tokens with BF16 weights, none spilled; a bound of 2 CTAs per SM spilled)


@cute.kernel
def _small_linear_kernel(x_vecs: cute.Tensor, w_vecs: cute.Tensor, out: cute.Tensor, bf16: cutlass.Constexpr,
                         warps_k: cutlass.Constexpr, max_tokens: cutlass.Constexpr):
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    bx, _, _ = cute.arch.block_idx()
    wm = warp % WARPS_M  # this warp's rows within the CTA's
    wk = warp // WARPS_M  # and its share of the row's vectors
    n_out = out.shape[1]
    tokens = out.shape[0]
    n0 = (bx * WARPS_M + wm) * ROWS
    if n0 < n_out:  # the weights (no kernel writes them) into the L2 cache while the kernel before runs
        for v in cutlass.range(wk * 32 + lane, w_vecs.shape[1], warps_k * 32, unroll=1):
            for r in cutlass.range_constexpr(ROWS):
                cute.arch.prefetch(w_vecs[n0 + r, v, None].iterator.llvm_ptr, cache_level="L2")
    wait_for_previous_kernel()
    per_vec = 8 if bf16 else 4  # weights per 16-byte vector; each is per_vec / 4 activation vectors
    smem = cutlass.memory.SmemAllocator()
    partial = smem.allocate_tensor(Float32, cute.make_layout((warps_k, WARPS_M, max_tokens * ROWS)), 16)
    acc = cute.make_rmem_tensor((max_tokens, ROWS), Float32)
    acc.fill(0.0)
    if n0 < n_out:  # warp-uniform; every warp still reaches the barriers below
        n_vecs = w_vecs.shape[1]
        wf = cute.make_rmem_tensor((ROWS, per_vec), Float32)
        for v in cutlass.range(wk * 32 + lane, n_vecs, warps_k * 32, unroll=1):
            for r in cutlass.range_constexpr(ROWS):
                vec = w_vecs[n0 + r, v, None].load()
                for q in cutlass.range_constexpr(4):
                    if cutlass.const_expr(bf16):  # word q: elements 2q (low half) and 2q + 1
                        wf[r, 2 * q] = Int32(vec[q] << 16).bitcast(Float32)
                        wf[r, 2 * q + 1] = Int32(vec[q] & -0x10000).bitcast(Float32)
                    else:
                        wf[r, q] = Int32(vec[q]).bitcast(Float32)
            for t in cutlass.range_constexpr(max_tokens):
                if t == 0 or t < tokens:  # uniform: no divergence, and token 0 always exists
                    for h in cutlass.range_constexpr(per_vec // 4):
                        xv = x_vecs[t, v * (per_vec // 4) + h, None].load()
                        for j in cutlass.range_constexpr(4):
                            xj = Int32(xv[j]).bitcast(Float32)
                            for r in cutlass.range_constexpr(ROWS):
                                acc[t, r] = acc[t, r] + xj * wf[r, 4 * h + j]
        for t in cutlass.range_constexpr(max_tokens):
            if t == 0 or t < tokens:
                for r in cutlass.range_constexpr(ROWS):
                    acc[t, r] = cute.arch.warp_reduction_sum(acc[t, r])
    if cutlass.const_expr(warps_k > 1):
        # The other shares hand their sums over in shared memory; the first adds them in order.
        if wk > 0 and lane == 0:
            for i in cutlass.range_constexpr(max_tokens * ROWS):
                partial[wk, wm, i] = acc[i // ROWS, i % ROWS]
        cute.arch.sync_threads()
        if wk == 0 and lane == 0:
            for i in cutlass.range_constexpr(max_tokens * ROWS):
                for w in cutlass.range_constexpr(1, warps_k):
                    acc[i // ROWS, i % ROWS] = acc[i // ROWS, i % ROWS] + partial[w, wm, i]
    if n0 < n_out and wk == 0 and lane == 0:
        for t in cutlass.range_constexpr(max_tokens):
            if t < tokens:
                for r in cutlass.range_constexpr(ROWS):
                    out[t, n0 + r] = acc[t, r]


@cute.jit
def small_linear(x_vecs, w_vecs, out, stream, bf16: cutlass.Constexpr, warps_k: cutlass.Constexpr,
                 max_tokens: cutlass.Constexpr):
    """x_vecs int32 [T, K/4, 4] (fp32 bits), w_vecs int32 [N, K/8 or K/4, 4] (BF16 or fp32 bits),
    out fp32 [T, N]; N % ROWS == 0, K % 8 == 0, T <= max_tokens."""
    n_out = out.shape[1]
    _small_linear_kernel(x_vecs, w_vecs, out, bf16, warps_k, max_tokens).launch(
        grid=[(n_out + WARPS_M * ROWS - 1) // (WARPS_M * ROWS), 1, 1], block=[32 * WARPS_M * warps_k, 1, 1],
        stream=stream, use_pdl=True)
