"""FP8 block-128 GEMM for decode-sized batches, CuTe DSL, sm_90a (wgmma).

    y[t, l*M + m] = sum_k  xq[t, l, k] * sx[t, l, k // 128]  *  W[l*M + m, k] * sw[(l*M + m) // 128, k // 128]

Operands are swapped (as DeepGEMM and TensorRT-LLM do for small M): the weight is the wgmma A
operand (its output rows are the 64-row M of the instruction) and the tokens are B (N = 8..128), so
one token does not waste a 64-row tile. Both operands are FP8 E4M3 and K-major, as the checkpoint and
the activation quantizer store them, and reach shared memory by TMA in a ring of `stages` buffers fed
by one producer warp. One consumer warpgroup runs four k32 wgmmas per 128-wide K block into a
temporary fp32 accumulator, then adds it into the main accumulator times the weight block scale and
the token's block scale: the scales are exact per 128 along K, as the format defines them.

L is a batch of independent GEMMs with their own weight rows (the block-diagonal wo_a: one per
output group); dense layers use L = 1. Split-K (grid z = L * splits) spreads a small weight over the
GPU: each split writes fp32 partials that the caller sums in split order, which keeps the result
deterministic. Tails are handled by TMA (zero fill on loads) and by predicated stores.

Weight scales are fp32 or E8M0 (a byte e meaning 2^(e-127); codes 0 and 255 never occur in V4
checkpoints and are not special-cased).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32
from cutlass import Float8E4M3FN as FP8
from cutlass._mlir.dialects import llvm as mlir_llvm
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cutlass_dsl import dsl_user_op
from cutlass.utils import LayoutEnum

TILE_M = 64    # weight rows per CTA: one m64 wgmma
TILE_K = 128   # one scale block per pipeline stage
MMA_WARPS = 4  # one consumer warpgroup (warps 0-3; wgmma needs a warpgroup-aligned group)
PRODUCER_WARP = MMA_WARPS


@cute.kernel
def _kernel(
    tma_a: cute.CopyAtom, mA: cute.Tensor,  # weights (M, K, L)
    tma_b: cute.CopyAtom, mB: cute.Tensor,  # tokens  (N, K, L)
    w_scale: cute.Tensor,                   # [ceil(L*M/128), K/128] fp32, or uint8 E8M0
    x_scale: cute.Tensor,                   # (N, K/128, L) fp32
    out: cute.Tensor,                       # splits == 1: bf16 [N, L*M]; else fp32 [splits, N, L*M]
    tiled_mma: cute.TiledMma,
    a_staged: cute.ComposedLayout,
    b_staged: cute.ComposedLayout,
    tile_n: cutlass.Constexpr,
    stages: cutlass.Constexpr,
    splits: cutlass.Constexpr,
    e8m0: cutlass.Constexpr,
):
    tidx, _, _ = cute.arch.thread_idx()
    warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
    bm, bn, bz = cute.arch.block_idx()
    group = bz // splits
    split = bz % splits
    rows = mA.shape[0]
    tokens = x_scale.shape[0]
    k_blocks = x_scale.shape[1]
    k_begin = split * k_blocks // splits
    k_end = (split + 1) * k_blocks // splits

    if warp == PRODUCER_WARP:
        cpasync.prefetch_descriptor(tma_a)
        cpasync.prefetch_descriptor(tma_b)

    smem = cutlass.memory.SmemAllocator()
    barriers = smem.allocate_array(cutlass.Int64, stages * 2, byte_alignment=8)
    sA = smem.allocate_tensor(FP8, a_staged.outer, 1024, swizzle=a_staged.inner)
    sB = smem.allocate_tensor(FP8, b_staged.outer, 1024, swizzle=b_staged.inner)
    stage_bytes = (cute.size_in_bytes(FP8, cute.slice_(a_staged, (None, None, 0)))
                   + cute.size_in_bytes(FP8, cute.slice_(b_staged, (None, None, 0))))
    ring = pipeline.PipelineTmaAsync.create(
        barrier_storage=barriers, num_stages=stages,
        producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
        consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, MMA_WARPS),
        tx_count=stage_bytes, cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)), defer_sync=True)
    pipeline.pipeline_init_arrive(is_relaxed=True)

    # (TILE_M, TILE_K, RestM, RestK, RestL) and (tile_n, TILE_K, RestN, RestK, RestL)
    gA = cute.local_tile(mA, (TILE_M, TILE_K), (None, None, None))
    gB = cute.local_tile(mB, (tile_n, TILE_K), (None, None, None))
    tAsA, tAgA = cpasync.tma_partition(tma_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2),
                                       cute.group_modes(gA, 0, 2))
    tBsB, tBgB = cpasync.tma_partition(tma_b, 0, cute.make_layout(1), cute.group_modes(sB, 0, 2),
                                       cute.group_modes(gB, 0, 2))
    pipeline.pipeline_init_wait()

    if warp == PRODUCER_WARP:
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, stages)
        for k in cutlass.range(k_begin, k_end, unroll=1):
            ring.producer_acquire(state)
            cute.copy(tma_a, tAgA[(None, bm, k, group)], tAsA[(None, state.index)],
                      tma_bar_ptr=ring.producer_get_barrier(state))
            cute.copy(tma_b, tBgB[(None, bn, k, group)], tBsB[(None, state.index)],
                      tma_bar_ptr=ring.producer_get_barrier(state))
            ring.producer_commit(state)
            state.advance()
        ring.producer_tail(state)

    if warp < MMA_WARPS:
        thr_mma = tiled_mma.get_slice(tidx)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        coords = thr_mma.partition_C(cute.make_identity_tensor((TILE_M, tile_n)))  # (m, n) of each value
        acc = cute.make_rmem_tensor(coords.shape, Float32)
        part = cute.make_rmem_tensor(coords.shape, Float32)
        acc.fill(0.0)
        k_steps = cute.size(tCrA, mode=[2])
        w_row_block = (group * rows + bm * TILE_M) // 128
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, stages)
        for k in cutlass.range(k_begin, k_end, unroll=1):
            if cutlass.const_expr(e8m0):
                sw = Int32(Int32(w_scale[w_row_block, k]) << 23).bitcast(Float32)
            else:
                sw = w_scale[w_row_block, k]
            ring.consumer_wait(state)
            warpgroup.fence()
            tiled_mma.set(warpgroup.Field.ACCUMULATE, False)
            for kk in cutlass.range_constexpr(k_steps):
                cute.gemm(tiled_mma, part, tCrA[(None, None, kk, state.index)],
                          tCrB[(None, None, kk, state.index)], part)
                tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            ring.consumer_release(state)
            state.advance()
            for i in cutlass.range_constexpr(cute.size(acc)):
                t = cutlass.min(bn * tile_n + coords[i][1], tokens - 1)
                acc[i] = acc[i] + part[i] * (sw * x_scale[t, k, group])

        for i in cutlass.range_constexpr(cute.size(acc)):
            t = bn * tile_n + coords[i][1]
            col = group * rows + bm * TILE_M + coords[i][0]
            if t < tokens:
                if cutlass.const_expr(splits == 1):
                    out[t, col] = acc[i].to(BFloat16)
                else:
                    out[split, t, col] = acc[i]


@cute.jit
def fp8_block_gemm(w: cute.Tensor, x: cute.Tensor, w_scale: cute.Tensor, x_scale: cute.Tensor, out: cute.Tensor,
                   stream, tile_n: cutlass.Constexpr, stages: cutlass.Constexpr, splits: cutlass.Constexpr,
                   e8m0: cutlass.Constexpr):
    """w: fp8 (M, K, L) K-major; x: fp8 (N, K, L) K-major; see the module docstring for the rest."""
    tiled_mma = sm90_utils.make_trivial_tiled_mma(
        w.element_type, x.element_type, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32,
        (1, 1, 1), tiler_mn=(TILE_M, tile_n))
    tile_mnk = (TILE_M, tile_n, TILE_K)
    a_staged = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, tile_mnk, w.element_type, stages)
    b_staged = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, tile_mnk, x.element_type, stages)
    tma_a, tma_w = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), w,
                                               cute.slice_(a_staged, (None, None, 0)), (TILE_M, TILE_K))
    tma_b, tma_x = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), x,
                                               cute.slice_(b_staged, (None, None, 0)), (tile_n, TILE_K))
    m, n, groups = w.shape[0], x.shape[0], w.shape[2]
    _kernel(tma_a, tma_w, tma_b, tma_x, w_scale, x_scale, out, tiled_mma, a_staged, b_staged,
            tile_n, stages, splits, e8m0).launch(
        grid=[(m + TILE_M - 1) // TILE_M, (n + tile_n - 1) // tile_n, groups * splits],
        block=[32 * (MMA_WARPS + 1), 1, 1],
        stream=stream)


# ---------------------------------------------------------------------------------------------
# Activation quantization: bf16 [T, K] -> E4M3 [T, K] + power-of-two fp32 scales [T, K/128]
# ---------------------------------------------------------------------------------------------

QUANT_WARPS = 4  # one warp per 128-wide block, 4 values per lane


@dsl_user_op
def _pack_e4m3x4(a0: Float32, a1: Float32, a2: Float32, a3: Float32, *, loc=None, ip=None) -> Int32:
    """Four fp32 -> four E4M3 bytes (a0 lowest), round to nearest even, saturating at +-448."""
    return Int32(mlir_llvm.inline_asm(
        Int32.mlir_type, [v.ir_value(loc=loc, ip=ip) for v in (a0, a1, a2, a3)],
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,f,f,f,f", loc=loc, ip=ip))


@cute.kernel
def _quant_kernel(x: cute.Tensor, q_words: cute.Tensor, scale: cute.Tensor):
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    t, bx, _ = cute.arch.block_idx()
    block = bx * QUANT_WARPS + warp
    if block < scale.shape[1]:
        base = block * 128 + lane * 4
        v = cute.make_rmem_tensor((4,), Float32)
        amax = Float32(1e-4)  # DeepSeek's floor on a block's amax
        for j in cutlass.range_constexpr(4):
            v[j] = x[t, base + j].to(Float32)
            amax = cutlass.max(amax, cute.arch.fmax(v[j], -v[j]))
        amax = cute.arch.warp_reduction_max(amax)
        # 2^ceil(log2(amax / 448)) exactly: round the fp32 bits up to the next power of two.
        ratio_bits = (amax / Float32(448.0)).bitcast(Int32)
        s = Int32((ratio_bits + 0x7FFFFF) & 0x7F800000).bitcast(Float32)
        inv = Int32(0x7F000000 - ((ratio_bits + 0x7FFFFF) & 0x7F800000)).bitcast(Float32)  # 1/s, exact
        q_words[t, block * 32 + lane] = _pack_e4m3x4(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv)
        if lane == 0:
            scale[t, block] = s


@cute.jit
def quantize_rows(x: cute.Tensor, q_words: cute.Tensor, scale: cute.Tensor, stream):
    """x bf16 [T, K]; q_words int32 [T, K/4] (E4M3 bytes); scale fp32 [T, K/128]."""
    _quant_kernel(x, q_words, scale).launch(
        grid=[x.shape[0], (scale.shape[1] + QUANT_WARPS - 1) // QUANT_WARPS, 1], block=[32 * QUANT_WARPS, 1, 1],
        stream=stream)
