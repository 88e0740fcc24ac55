"""Dense NVFP4 / MXFP4 linear layers (W4A16) on wgmma for 9-32 tokens, CuTe DSL, sm_90a.

    y[t, l*R + r] = g * sum_k  x[t, l, k] * E2M1(W[l*R + r, k]) * s(W)[l*R + r, k // block]

Operands are swapped as in the FP8 GEMM (fp8_block_sm90): a 64-row weight tile is the wgmma's M,
the tokens (a tile of 8, 16 or 32) its N. Hopper has no FP4 MMA, so the weight is the operand from
registers: each consumer warp decodes its 16 rows' E2M1 bytes into f16 with the block scale folded
in exactly (as the MoE's tensor-core kernel does, kernels.moe.w4a16_mma_sm90), and the tokens' f16
activations are the operand from shared memory, read once per CTA for all 64 rows. (The mma.sync
kernel reads them per warp of 16 rows: at 16-32 tokens that traffic outgrew the weight's.)

One producer warp brings, per 256-wide K stage, by TMA into a ring of `stages` buffers: the packed
weight tile (64 rows x 128 bytes, 128-byte swizzle, so the 8 rows a warp reads at once hit
distinct banks), the rows' 16 scale bytes (TMA's narrowest box: NVFP4's for the stage, MXFP4's for
two), and the activations in pair_order's layout (kernels.moe.pair_order: the layout kernel runs
before each call). A consumer warpgroup decodes the stage's two 128-wide K blocks into two A
fragments in turn: one decodes while the other's wgmmas run.

K order. The MMA sums over K in any order as long as A and B agree, so B is pair_order's f16 as it
lies: K step s (of 8 per block) takes the block's f16x2 words 8s .. 8s+7, and word 16w + 4c + q of
a block holds the activations at 32c + 8w + q and 32c + 8w + q + 4 (chunk c, its 8-vector w,
pair q). The A fragment gives lane (g, q) (g = lane / 4, q = lane % 4) rows g and g + 8 at MMA
columns 2q, 2q+1 (word q of the step) and 2q+8, 2q+9 (word 4 + q): chunks c = 2(s % 2) and
2(s % 2) + 1 of 8-vector w = s / 2, pair q. So every lane reads its two rows' whole 64-byte block
(lanes of equal g read the same bytes: shared-memory broadcasts) and decodes E2M1 pair q of each
word. Scales: NVFP4 E4M3 per 16, MXFP4 E8M0 per 32 (`check_mxfp4_scales` bounds them as for the
MoE); the global scale (NVFP4) and the decode's 2^14 multiply the sums.

K splits over CTAs (grid z = groups * splits) spread a small weight over the GPU; `consumers`
warpgroups take a CTA's stages in turn. The ring, its producer and the tile's store are the FP8
GEMM's (kernels.linear.swapped_gemm_sm90). A programmatic dependent launch: the producer loads its
first weight tiles before waiting for the kernel before (the layout kernel). K % 512 == 0 (whole
stages and 16-byte scale rows).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float16, Float32, Int32, Uint8
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.utils import LayoutEnum

from ..dependent_launch import wait_for_previous_kernel
from ..moe.w4a16_mma_sm90 import _hmul2, _prmt, _scale_f16x2
from ..moe.w4a16_sm90 import E2M1_F16_CORRECTION, _e2m1_pair, _e4m3_pair_to_f16x2
from .swapped_gemm_sm90 import (WARPGROUP, add_consumer_sums, consumer_stage, cta_work, make_ring, produce,
                                store_tile, sync_storage, tma_tiles)

TILE_M = 64       # weight rows per CTA: one m64 wgmma
BLOCK_K = 128     # K per A fragment (8 k16 wgmmas)
TILE_K = 2 * BLOCK_K  # K per pipeline stage
ROW_BYTES = TILE_K // 2  # a weight row's packed bytes per stage: 128-byte swizzle
STEPS = BLOCK_K // 16
# Scale bytes come by TMA too, 16 per row (TMA's narrowest box): a stage's NVFP4 scales, or two
# stages' MXFP4 scales (each stage reads its neighbour's again, from L2).
SCALE_ROW_BYTES = 16
SCALE_TILE_BYTES = TILE_M * SCALE_ROW_BYTES


@cute.jit
def _decode_block(sW: cute.Tensor, sS: cute.Tensor, stage: Int32, k: Int32, block: cutlass.Constexpr,
                  local_row: Int32, q: Int32, a_words: cute.Tensor, nvfp4: cutlass.Constexpr):
    """This lane's A fragment for 128-wide K block `block` (0, 1) of stage k, from the stage's bytes:
    rows local_row and local_row + 8, E2M1 pair q of every word, times its block scale (f16x2,
    exact; see the module docstring)."""
    wq = cute.make_rmem_tensor((2, 16), Int32)  # the rows' 16 words: vector c, word w at 4c + w
    sc = cute.make_rmem_tensor((2, 8), Int32)   # their scales, the same f16 in both halves
    for r in cutlass.range_constexpr(2):
        lr = local_row + 8 * r
        for c in cutlass.range_constexpr(4):  # 128-byte swizzle: vector v of row lr sits at v ^ (lr % 8)
            vec = sW[lr, (c + 4 * block) ^ (lr & 7), None, stage].load()
            for w in cutlass.range_constexpr(4):
                wq[r, 4 * c + w] = vec[w]
        if cutlass.const_expr(nvfp4):  # 8 E4M3 bytes (one per 16): words 2 block, 2 block + 1 of the row's 16
            for h in cutlass.range_constexpr(2):
                word = sS[lr, 2 * block + h, stage]
                for p in cutlass.range_constexpr(2):
                    pair = _e4m3_pair_to_f16x2(word >> (16 * p))
                    sc[r, 4 * h + 2 * p] = _prmt(pair, 0x1010)
                    sc[r, 4 * h + 2 * p + 1] = _prmt(pair, 0x3232)
        else:  # 4 E8M0 bytes (one per 32): word 2 (k % 2) + block
            word = sS[lr, 2 * (k % 2) + block, stage]
            for c in cutlass.range_constexpr(4):
                sc[r, c] = _scale_f16x2((word >> (8 * c)) & 0xFF, False)
    for s in cutlass.range_constexpr(STEPS):
        w = s // 2
        for side in cutlass.range_constexpr(2):  # columns 2q.. from chunk c, 2q+8.. from chunk c + 1
            c = 2 * (s % 2) + side
            for r in cutlass.range_constexpr(2):
                block_scale = sc[r, 2 * c + w // 2] if cutlass.const_expr(nvfp4) else sc[r, c]
                a_words[4 * s + 2 * side + r] = _hmul2(_e2m1_pair(wq[r, 4 * c + w] >> (4 * q), 0), block_scale)


@cute.jit
def _issue(tiled_mma: cute.TiledMma, acc: cute.Tensor, a_frag: cute.Tensor, tCrB: cute.Tensor, stage: Int32,
           block: cutlass.Constexpr):
    """The wgmmas of K block `block` of a stage, as one commit group."""
    warpgroup.fence()
    for s in cutlass.range_constexpr(STEPS):
        cute.gemm(tiled_mma, acc, a_frag[(None, None, s)], tCrB[(None, None, STEPS * block + s, stage)], acc)
    warpgroup.commit_group()


@cute.kernel
def _kernel(
    tma_a: cute.CopyAtom, mA: cute.Tensor,  # packed weights, bytes (R, K/2, L)
    tma_b: cute.CopyAtom, mB: cute.Tensor,  # activations, f16 in pair order (T, K, L)
    tma_s: cute.CopyAtom, mS: cute.Tensor,  # scale bytes (R, K/16 or K/32, L)
    global_scale: cute.Tensor,              # fp32 [1]: the weight's (MXFP4: 1)
    out: cute.Tensor,                       # fp32 [T, L*R]
    partials: cute.Tensor,                  # fp32 [splits, T, L*R] (splits > 1)
    counters: cute.Tensor,                  # int32 [>= tiles], zero between launches (splits > 1)
    tiled_mma: cute.TiledMma,
    a_staged: cute.ComposedLayout,
    b_staged: cute.ComposedLayout,
    s_staged: cute.Layout,
    tile_n: cutlass.Constexpr,
    stages: cutlass.Constexpr,
    splits: cutlass.Constexpr,
    consumers: cutlass.Constexpr,
    nvfp4: cutlass.Constexpr,
):
    tidx, _, _ = cute.arch.thread_idx()
    warp, wg, bn, bm, group, split, k_begin, n_stages = cta_work(splits, mB.shape[1] // TILE_K)
    rows = mA.shape[0]
    tokens = mB.shape[0]
    producer_warp = 4 * consumers

    if warp == producer_warp:
        cpasync.prefetch_descriptor(tma_a)
        cpasync.prefetch_descriptor(tma_b)
        cpasync.prefetch_descriptor(tma_s)

    smem = cutlass.memory.SmemAllocator()
    barriers, arrived = sync_storage(smem, stages)
    a_bytes = TILE_M * ROW_BYTES
    a_base = smem.allocate(a_bytes * stages, 1024)
    sA = cute.make_tensor(cute.recast_ptr(a_base, a_staged.inner, dtype=Uint8), a_staged.outer)
    # The same bytes as 16-byte vectors (row, vector, word, stage), read with the swizzle spelled out.
    sW = cute.make_tensor(cute.recast_ptr(a_base, dtype=Int32),
                          cute.make_layout((TILE_M, 8, 4, stages), stride=(32, 4, 1, a_bytes // 4)))
    sB = smem.allocate_tensor(Float16, b_staged.outer, 1024, swizzle=b_staged.inner)
    s_base = smem.allocate(SCALE_TILE_BYTES * stages, 128)
    sS_bytes = cute.make_tensor(cute.recast_ptr(s_base, dtype=Uint8), s_staged)
    sS = cute.make_tensor(cute.recast_ptr(s_base, dtype=Int32),
                          cute.make_layout((TILE_M, 4, stages), stride=(4, 1, SCALE_TILE_BYTES // 4)))
    per_thread = TILE_M * tile_n // WARPGROUP
    exchange = smem.allocate_tensor(Float32, cute.make_layout((per_thread, WARPGROUP, max(consumers - 1, 1))), 16)
    stage_bytes = a_bytes + SCALE_TILE_BYTES + cute.size_in_bytes(Float16, cute.slice_(b_staged, (None, None, 0)))
    ring = make_ring(barriers, stages, stage_bytes)

    tAsA, tAgA = tma_tiles(tma_a, mA, (TILE_M, ROW_BYTES), sA)
    tBsB, tBgB = tma_tiles(tma_b, mB, (tile_n, TILE_K), sB)
    tSsS, tSgS = tma_tiles(tma_s, mS, (TILE_M, SCALE_ROW_BYTES), sS_bytes)
    pipeline.pipeline_init_wait()

    if warp == producer_warp:
        produce(ring, stages, n_stages, k_begin, bm, bn, group, tma_a, tAgA, tAsA, tma_b, tBgB, tBsB, tma_s, tSgS, tSsS,
                1 if cutlass.const_expr(nvfp4) else 2)  # a 16-byte scale row holds 1 stage's NVFP4 or 2 MXFP4

    if warp < producer_warp:
        wait_for_previous_kernel()  # the output may be memory the kernel before still reads
        lane_in_wg = tidx % WARPGROUP
        lane = tidx % 32
        thr_mma = tiled_mma.get_slice(lane_in_wg)
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        # Two A fragments: a block decodes into one while the other's wgmmas run.
        a_frags = [cute.make_rmem_tensor(thr_mma.partition_shape_A((TILE_M, BLOCK_K)), Float16) for _ in range(2)]
        a_words = [cute.recast_tensor(a, Int32) for a in a_frags]  # 4 per k16 step: rows g, g+8 x columns 2q.., 2q+8..
        coords = thr_mma.partition_C(cute.make_identity_tensor((TILE_M, tile_n)))  # (m, n) of each value
        acc = cute.make_rmem_tensor(coords.shape, Float32)
        acc.fill(0.0)
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        local_row = (warp % 4) * 16 + lane // 4
        q = lane % 4
        for j in cutlass.range(wg, n_stages, consumers, unroll=1):
            stage = consumer_stage(j, stages)
            ring.consumer_wait(stage)
            for block in cutlass.range_constexpr(2):
                _decode_block(sW, sS, stage.index, k_begin + j, block, local_row, q, a_words[block], nvfp4)
                _issue(tiled_mma, acc, a_frags[block], tCrB, stage.index, block)
                warpgroup.wait_group(1)  # the fragment decoded next is free; after block 0, the stage before is done
                if block == 0 and j - consumers >= wg:
                    ring.consumer_release(consumer_stage(j - consumers, stages))
        warpgroup.wait_group(0)
        if n_stages > wg:
            ring.consumer_release(consumer_stage(wg + (n_stages - 1 - wg) // consumers * consumers, stages))

        add_consumer_sums(acc, exchange, wg, lane_in_wg, consumers)
        if wg == 0:
            scale = global_scale[0] * (E2M1_F16_CORRECTION if cutlass.const_expr(nvfp4) else 1.0)
            for i in cutlass.range_constexpr(per_thread):
                acc[i] = acc[i] * scale
            store_tile(acc, coords, out, partials, counters, arrived, tokens, bn * tile_n, group * rows + bm * TILE_M,
                       split, tidx, splits)


@cute.jit
def w4a16_wgmma(w: cute.Tensor, x: cute.Tensor, scales: cute.Tensor, global_scale: cute.Tensor,
                out: cute.Tensor, partials: cute.Tensor, counters: cute.Tensor, stream, tile_n: cutlass.Constexpr,
                stages: cutlass.Constexpr, splits: cutlass.Constexpr, consumers: cutlass.Constexpr,
                nvfp4: cutlass.Constexpr):
    """w: packed E2M1 bytes (R, K/2, L), K-major; x: f16 (T, K, L) in pair order; scales: the block
    scale bytes (R, K/16 or K/32, L); see the module docstring. K % 512 == 0 (the scale tiles)."""
    if cutlass.const_expr(stages % consumers != 0 or stages < 2 * consumers):
        # A warpgroup holds two stages (one decoding, one in its wgmmas); an mbarrier tells phases
        # apart by parity alone (see fp8_block_gemm).
        raise ValueError(f"w4a16_wgmma: stages ({stages}) must be a multiple of consumers ({consumers}), "
                         "at least twice it")
    tiled_mma = sm90_utils.make_trivial_tiled_mma(
        Float16, Float16, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32, (1, 1, 1),
        tiler_mn=(TILE_M, tile_n), a_source=warpgroup.OperandSource.RMEM)
    a_staged = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (TILE_M, tile_n, ROW_BYTES), Uint8, stages)
    b_staged = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (TILE_M, tile_n, TILE_K), Float16, stages)
    tma_a, tma_w = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), w,
                                               cute.slice_(a_staged, (None, None, 0)), (TILE_M, ROW_BYTES))
    tma_b, tma_x = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), x,
                                               cute.slice_(b_staged, (None, None, 0)), (tile_n, TILE_K))
    s_staged = cute.make_layout((TILE_M, SCALE_ROW_BYTES, stages), stride=(SCALE_ROW_BYTES, 1, SCALE_TILE_BYTES))
    tma_s, tma_sc = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), scales,
                                                cute.slice_(s_staged, (None, None, 0)), (TILE_M, SCALE_ROW_BYTES))
    m, n, groups = w.shape[0], x.shape[0], w.shape[2]
    _kernel(tma_a, tma_w, tma_b, tma_x, tma_s, tma_sc, global_scale, out, partials, counters, tiled_mma, a_staged,
            b_staged, s_staged, tile_n, stages, splits, consumers, nvfp4).launch(
        grid=[(n + tile_n - 1) // tile_n, (m + TILE_M - 1) // TILE_M, groups * splits],
        block=[WARPGROUP * consumers + 32, 1, 1],
        stream=stream, use_pdl=True)
