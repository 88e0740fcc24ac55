"""FP8 block-128 GEMM for decode-sized batches, CuTe DSL, sm_90a (wgmma).

    y[t, l*M + m] = sum_k  xq[t, l, k] * sx[t, l, k // 128]  *  W[l*M + m, k] * sw[(l*M + m) // 128, k // 128]

Operands are swapped (as DeepGEMM and TensorRT-LLM do for small M): the weight is the wgmma A
operand (its output rows are the 64-row M of the instruction) and the tokens are B (N = 8..128), so
one token does not waste a 64-row tile. Both operands are FP8 E4M3 and K-major, as the checkpoint and
the activation quantizer store them, and reach shared memory by TMA in a ring of `stages` buffers fed
by one producer warp. A consumer warpgroup runs four k32 wgmmas per 128-wide K block into a
temporary fp32 accumulator, waits for them, then adds it into its main accumulator times the weight
block scale and the token's block scale: the scales are exact per 128 along K, as the format defines
them. That wait leaves a warpgroup idle for the wgmma latency once per block (reading a temporary
while other wgmmas are in flight makes ptxas serialize every wgmma), so `consumers` warpgroups take
the CTA's K blocks in turn and add their accumulators through shared memory at the end.

L is a batch of independent GEMMs with their own weight rows (the block-diagonal wo_a: one per
output group); dense layers use L = 1. Split-K (grid z = L * splits) spreads a small weight over the
GPU: each split writes fp32 partials, and the last split to finish a tile sums them in split order
(a counter per tile), which keeps the result deterministic in one launch. Tails are handled by TMA
(zero fill on loads) and by predicated stores.

The GEMM launches as a programmatic dependent launch (kernels.dependent_launch): where the kernel
before it on the stream lets its dependents start early (every CuTe DSL kernel here and Inductor's
Triton kernels do), its CTAs start beside that kernel, load their first `stages` weight tiles, and
wait for it (`griddepcontrol.wait`) before reading the tokens and their scales or writing anything.
At one token the launch and the first loads are a few of a GEMM's ~10 us (H200).

Weight scales are fp32 or E8M0 (a byte e meaning 2^(e-127); codes 0 and 255 never occur in V4
checkpoints and are not special-cased).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass import Float8E4M3FN as FP8
from cutlass._mlir.dialects import llvm as mlir_llvm
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cutlass_dsl import dsl_user_op
from cutlass.utils import LayoutEnum

from ..dependent_launch import wait_for_previous_kernel
from .swapped_gemm_sm90 import (WARPGROUP, add_consumer_sums, consumer_stage, cta_work, make_ring, produce,
                                store_tile, sync_storage, tma_tiles)

TILE_M = 64    # weight rows per CTA: one m64 wgmma
TILE_K = 128   # one scale block per pipeline stage


@cute.kernel
def _kernel(
    tma_a: cute.CopyAtom, mA: cute.Tensor,  # weights (M, K, L)
    tma_b: cute.CopyAtom, mB: cute.Tensor,  # tokens  (N, K, L)
    w_scale: cute.Tensor,                   # [ceil(L*M/128), K/128] fp32, or uint8 E8M0
    x_scale: cute.Tensor,                   # (N, K/128, L) fp32
    out: cute.Tensor,                       # bf16 or fp32 [N, L*M]
    partials: cute.Tensor,                  # fp32 [splits, N, L*M] (splits > 1)
    counters: cute.Tensor,                  # int32 [>= tiles], zero between launches (splits > 1)
    tiled_mma: cute.TiledMma,
    a_staged: cute.ComposedLayout,
    b_staged: cute.ComposedLayout,
    tile_n: cutlass.Constexpr,
    stages: cutlass.Constexpr,
    splits: cutlass.Constexpr,
    consumers: cutlass.Constexpr,
    e8m0: cutlass.Constexpr,
):
    tidx, _, _ = cute.arch.thread_idx()
    warp, wg, bn, bm, group, split, k_begin, n_blocks = cta_work(splits, x_scale.shape[1])
    rows = mA.shape[0]
    tokens = x_scale.shape[0]
    producer_warp = 4 * consumers

    if warp == producer_warp:
        cpasync.prefetch_descriptor(tma_a)
        cpasync.prefetch_descriptor(tma_b)

    smem = cutlass.memory.SmemAllocator()
    barriers, arrived = sync_storage(smem, stages)
    sA = smem.allocate_tensor(FP8, a_staged.outer, 1024, swizzle=a_staged.inner)
    sB = smem.allocate_tensor(FP8, b_staged.outer, 1024, swizzle=b_staged.inner)
    per_thread = TILE_M * tile_n // WARPGROUP
    exchange = smem.allocate_tensor(Float32, cute.make_layout((per_thread, WARPGROUP, max(consumers - 1, 1))), 16)
    stage_bytes = (cute.size_in_bytes(FP8, cute.slice_(a_staged, (None, None, 0)))
                   + cute.size_in_bytes(FP8, cute.slice_(b_staged, (None, None, 0))))
    ring = make_ring(barriers, stages, stage_bytes)

    tAsA, tAgA = tma_tiles(tma_a, mA, (TILE_M, TILE_K), sA)
    tBsB, tBgB = tma_tiles(tma_b, mB, (tile_n, TILE_K), sB)
    pipeline.pipeline_init_wait()

    if warp == producer_warp:
        produce(ring, stages, n_blocks, k_begin, bm, bn, group, tma_a, tAgA, tAsA, tma_b, tBgB, tBsB)

    if warp < producer_warp:
        wait_for_previous_kernel()  # the scales and the output, like the tokens, wait for the kernel before
        lane_in_wg = tidx % WARPGROUP
        thr_mma = tiled_mma.get_slice(lane_in_wg)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        coords = thr_mma.partition_C(cute.make_identity_tensor((TILE_M, tile_n)))  # (m, n) of each value
        acc = cute.make_rmem_tensor(coords.shape, Float32)
        part = cute.make_rmem_tensor(coords.shape, Float32)
        scale = cute.make_rmem_tensor(coords.shape, Float32)
        acc.fill(0.0)
        w_row_block = (group * rows + bm * TILE_M) // 128
        for j in cutlass.range(wg, n_blocks, consumers, unroll=1):
            k = k_begin + j
            # Scales first: their loads overlap the wait for the block's tiles.
            if cutlass.const_expr(e8m0):
                sw = Int32(Int32(w_scale[w_row_block, k]) << 23).bitcast(Float32)
            else:
                sw = w_scale[w_row_block, k]
            for i in cutlass.range_constexpr(per_thread):
                scale[i] = sw * x_scale[cutlass.min(bn * tile_n + coords[i][1], tokens - 1), k, group]
            stage = consumer_stage(j, stages)
            ring.consumer_wait(stage)
            warpgroup.fence()
            tiled_mma.set(warpgroup.Field.ACCUMULATE, False)
            for kk in cutlass.range_constexpr(cute.size(tCrA, mode=[2])):
                cute.gemm(tiled_mma, part, tCrA[(None, None, kk, stage.index)], tCrB[(None, None, kk, stage.index)],
                          part)
                tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            ring.consumer_release(stage)
            for i in cutlass.range_constexpr(per_thread):
                acc[i] = acc[i] + part[i] * scale[i]

        add_consumer_sums(acc, exchange, wg, lane_in_wg, consumers)
        if wg == 0:
            store_tile(acc, coords, out, partials, counters, arrived, tokens, bn * tile_n, group * rows + bm * TILE_M,
                       split, tidx, splits)


@cute.jit
def fp8_block_gemm(w: cute.Tensor, x: cute.Tensor, w_scale: cute.Tensor, x_scale: cute.Tensor, out: cute.Tensor,
                   partials: cute.Tensor, counters: cute.Tensor, stream, tile_n: cutlass.Constexpr,
                   stages: cutlass.Constexpr, splits: cutlass.Constexpr, consumers: cutlass.Constexpr,
                   e8m0: cutlass.Constexpr):
    """w: fp8 (M, K, L) K-major; x: fp8 (N, K, L) K-major; see the module docstring for the rest."""
    if cutlass.const_expr(stages % consumers != 0):
        # A warpgroup may wait for block j only once block j - stages has landed (an mbarrier
        # tells phases apart by parity alone); with stages a multiple of consumers, block
        # j - stages is the warpgroup's own earlier block.
        raise ValueError(f"fp8_block_gemm: stages ({stages}) must be a multiple of consumers ({consumers})")
    tiled_mma = sm90_utils.make_trivial_tiled_mma(
        FP8, FP8, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32, (1, 1, 1),
        tiler_mn=(TILE_M, tile_n))
    tile_mnk = (TILE_M, tile_n, TILE_K)
    a_staged = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, tile_mnk, FP8, stages)
    b_staged = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, tile_mnk, FP8, stages)
    tma_a, tma_w = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), w,
                                               cute.slice_(a_staged, (None, None, 0)), (TILE_M, TILE_K))
    tma_b, tma_x = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), x,
                                               cute.slice_(b_staged, (None, None, 0)), (tile_n, TILE_K))
    m, n, groups = w.shape[0], x.shape[0], w.shape[2]
    _kernel(tma_a, tma_w, tma_b, tma_x, w_scale, x_scale, out, partials, counters, tiled_mma, a_staged, b_staged,
            tile_n, stages, splits, consumers, e8m0).launch(
        grid=[(n + tile_n - 1) // tile_n, (m + TILE_M - 1) // TILE_M, groups * splits],
        block=[WARPGROUP * consumers + 32, 1, 1],
        stream=stream, use_pdl=True)


# ---------------------------------------------------------------------------------------------
# Activation quantization: bf16/fp32 [T, K] -> E4M3 [T, K] + power-of-two fp32 scales [T, K/128]
# ---------------------------------------------------------------------------------------------

QUANT_WARPS = 4  # one warp per 128-wide block, 4 values per lane


@dsl_user_op
def _pack_e4m3x4(a0: Float32, a1: Float32, a2: Float32, a3: Float32, *, loc=None, ip=None) -> Int32:
    """Four fp32 -> four E4M3 bytes (a0 lowest), round to nearest even, saturating at +-448."""
    return Int32(mlir_llvm.inline_asm(
        Int32.mlir_type, [v.ir_value(loc=loc, ip=ip) for v in (a0, a1, a2, a3)],
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,f,f,f,f", loc=loc, ip=ip))


@cute.jit
def quantize_warp_block(v: cute.Tensor):
    """The FP8 activation quantization of one 128-wide block that a warp holds, 4 values per lane
    (v, fp32): amax floored at 1e-4 (DeepSeek's act_quant), the scale 2^ceil(log2(amax / 448)).
    -> (the lane's 4 E4M3 bytes as one word, the block's scale). Every kernel that hands an FP8
    linear its input quantizes through this, so all give the runner quantizer's bits."""
    amax = Float32(1e-4)
    for e in cutlass.range_constexpr(4):
        amax = cutlass.max(amax, cute.arch.fmax(v[e], -v[e]))
    amax = cute.arch.warp_reduction_max(amax)
    # 2^ceil(log2(amax / 448)) exactly: round the fp32 bits up to the next power of two.
    ratio_bits = (amax / Float32(448.0)).bitcast(Int32)
    up = (ratio_bits + 0x7FFFFF) & 0x7F800000
    inv = Int32(0x7F000000 - up).bitcast(Float32)  # 1/scale, exact
    return _pack_e4m3x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv), Int32(up).bitcast(Float32)


@cute.kernel
def _quant_kernel(x: cute.Tensor, q_words: cute.Tensor, scale: cute.Tensor):
    wait_for_previous_kernel()
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    t, bx, _ = cute.arch.block_idx()
    block = bx * QUANT_WARPS + warp
    if block < scale.shape[1]:
        base = block * 128 + lane * 4
        v = cute.make_rmem_tensor((4,), Float32)
        for j in cutlass.range_constexpr(4):
            v[j] = x[t, base + j].to(Float32)
        word, s = quantize_warp_block(v)
        q_words[t, block * 32 + lane] = word
        if lane == 0:
            scale[t, block] = s


@cute.jit
def quantize_rows(x: cute.Tensor, q_words: cute.Tensor, scale: cute.Tensor, stream):
    """x bf16 or fp32 [T, K]; q_words int32 [T, K/4] (E4M3 bytes); scale fp32 [T, K/128]."""
    _quant_kernel(x, q_words, scale).launch(
        grid=[x.shape[0], (scale.shape[1] + QUANT_WARPS - 1) // QUANT_WARPS, 1], block=[32 * QUANT_WARPS, 1, 1],
        stream=stream, use_pdl=True)
