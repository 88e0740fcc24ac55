"""What the swapped-operand wgmma GEMMs (fp8_block_sm90, w4a16_wgmma_sm90) share: the TMA ring of
stages and its producer warp, and how they end: the consumer warpgroups' sums meet in warpgroup 0,
which stores the 64-row x token-tile of the output, directly or, with K split over CTAs, through
fp32 partials that the last split to arrive adds in split order (a counter per output tile), so
the result does not depend on which split finished first."""
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import cpasync

from ..dependent_launch import wait_for_previous_kernel

WARPGROUP = 128  # threads; consumer warpgroups come first (wgmma needs warpgroup-aligned warps)


@cute.jit
def cta_work(splits: cutlass.Constexpr, k_stages: Int32):
    """This CTA's share: (warp, warpgroup, token tile, weight tile, group, split, first stage, stages).
    Grid: (token tiles, weight tiles, groups * splits), token tiles fastest, so the CTAs that share a
    weight tile run together (HBM serves its bytes once, L2 the rest)."""
    warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
    bn, bm, bz = cute.arch.block_idx()
    split = bz % splits
    k_begin = split * k_stages // splits
    return warp, warp // 4, bn, bm, bz // splits, split, k_begin, (split + 1) * k_stages // splits - k_begin


def sync_storage(smem, stages: int):
    """Shared memory for make_ring's barriers (a full and an empty one per stage) and store_tile's
    arrival flag (one int32), allocated first so both sit at the front: (barriers, arrived)."""
    barriers = smem.allocate_array(cutlass.Int64, stages * 2, byte_alignment=8)
    return barriers, smem.allocate_tensor(Int32, cute.make_layout(1), 4)


def make_ring(barriers, stages: int, stage_bytes):
    """The ring of `stages` TMA buffers between the producer warp and one consumer warpgroup per stage."""
    ring = pipeline.PipelineTmaAsync.create(
        barrier_storage=barriers, num_stages=stages,
        producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
        consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 4),  # one warpgroup per stage
        tx_count=stage_bytes, cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)), defer_sync=True)
    pipeline.pipeline_init_arrive(is_relaxed=True)
    return ring


def tma_tiles(atom, tensor: cute.Tensor, tile: tuple, staged: cute.Tensor):
    """A TMA operand's tiles of `tile` (rows, columns) and its ring buffers `staged` (rows, columns,
    stage), partitioned for the copy: (buffers, tiles), indexed [(None, stage)] and
    [(None, row tile, column tile, group)]."""
    tiles = cute.local_tile(tensor, tile, (None, None, None))
    return cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(staged, 0, 2),
                                 cute.group_modes(tiles, 0, 2))


def consumer_stage(j, stages):
    """The ring position of the CTA's j-th stage, consumer side (phase starts at 0)."""
    return pipeline.PipelineState(stages, j, j % stages, (j // stages) % 2)


@cute.jit
def produce(ring, stages: cutlass.Constexpr, n_stages: Int32, k_begin: Int32, bm: Int32, bn: Int32, group: Int32,
            tma_a, tAgA, tAsA, tma_b, tBgB, tBsB, tma_s=None, tSgS=None, tSsS=None,
            stages_per_scale_tile: cutlass.Constexpr = 1):
    """The producer warp: weight tile (bm, k) and token tile (bn, k) of stages k = k_begin.. by TMA, and
    the weight's scale tile (bm, k / stages_per_scale_tile) where given. Launched beside the kernel
    before it (programmatic dependent launch, where that kernel lets it start early), it loads the
    first stages' weights at once (no kernel writes them), the tokens once that kernel has finished."""
    state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, stages)
    ahead = cutlass.min(n_stages, stages)
    for j in cutlass.range(ahead, unroll=1):
        ring.producer_acquire(state)
        _load_weights(ring, state, bm, k_begin + j, group, tma_a, tAgA, tAsA, tma_s, tSgS, tSsS, stages_per_scale_tile)
        state.advance()
    wait_for_previous_kernel()
    early = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, stages)
    for j in cutlass.range(ahead, unroll=1):
        cute.copy(tma_b, tBgB[(None, bn, k_begin + j, group)], tBsB[(None, early.index)],
                  tma_bar_ptr=ring.producer_get_barrier(early))
        ring.producer_commit(early)
        early.advance()
    for j in cutlass.range(ahead, n_stages, unroll=1):
        ring.producer_acquire(state)
        _load_weights(ring, state, bm, k_begin + j, group, tma_a, tAgA, tAsA, tma_s, tSgS, tSsS, stages_per_scale_tile)
        cute.copy(tma_b, tBgB[(None, bn, k_begin + j, group)], tBsB[(None, state.index)],
                  tma_bar_ptr=ring.producer_get_barrier(state))
        ring.producer_commit(state)
        state.advance()
    ring.producer_tail(state)


@cute.jit
def _load_weights(ring, state, bm: Int32, k: Int32, group: Int32, tma_a, tAgA, tAsA, tma_s, tSgS, tSsS,
                  stages_per_scale_tile: cutlass.Constexpr):
    barrier = ring.producer_get_barrier(state)
    cute.copy(tma_a, tAgA[(None, bm, k, group)], tAsA[(None, state.index)], tma_bar_ptr=barrier)
    if cutlass.const_expr(tma_s is not None):
        cute.copy(tma_s, tSgS[(None, bm, k // stages_per_scale_tile, group)], tSsS[(None, state.index)],
                  tma_bar_ptr=barrier)


def _warpgroup0_sync():
    cute.arch.barrier(barrier_id=1, number_of_threads=WARPGROUP)


@cute.jit
def add_consumer_sums(acc: cute.Tensor, exchange: cute.Tensor, wg: Int32, lane_in_wg: Int32,
                      consumers: cutlass.Constexpr):
    """Warpgroups 1.. hand their accumulators to warpgroup 0 through shared memory `exchange`
    [values, WARPGROUP, consumers - 1]; warpgroup 0 adds them in warpgroup order."""
    if cutlass.const_expr(consumers > 1):
        per_thread = cute.size(acc)
        if wg > 0:
            for i in cutlass.range_constexpr(per_thread):
                exchange[i, lane_in_wg, wg - 1] = acc[i]
        cute.arch.barrier(barrier_id=2, number_of_threads=WARPGROUP * consumers)
        if wg == 0:
            for c in cutlass.range_constexpr(1, consumers):
                for i in cutlass.range_constexpr(per_thread):
                    acc[i] = acc[i] + exchange[i, lane_in_wg, c - 1]


@cute.jit
def store_tile(acc: cute.Tensor, coords: cute.Tensor, out: cute.Tensor, partials: cute.Tensor,
               counters: cute.Tensor, arrived: cute.Tensor, tokens: Int32, token0: Int32, col0: Int32,
               split: Int32, tidx: Int32, splits: cutlass.Constexpr):
    """Warpgroup 0 only: value i of `acc` is out[token0 + coords[i][1], col0 + coords[i][0]] (tokens
    past `tokens` are dropped). splits > 1: partials [splits, tokens, cols] fp32, counters int32 per
    tile (zero between launches, left at zero), `arrived` one int32 of shared memory."""
    per_thread = cute.size(acc)
    if cutlass.const_expr(splits == 1):
        for i in cutlass.range_constexpr(per_thread):
            t = token0 + coords[i][1]
            if t < tokens:
                out[t, col0 + coords[i][0]] = acc[i].to(out.element_type)
    else:
        for i in cutlass.range_constexpr(per_thread):
            t = token0 + coords[i][1]
            if t < tokens:
                partials[split, t, col0 + coords[i][0]] = acc[i]
        _warpgroup0_sync()  # then one fence makes all the CTA's stores visible before arriving
        bx, by, bz = cute.arch.block_idx()
        gx, gy, _ = cute.arch.grid_dim()
        tile_id = (bz // splits * gy + by) * gx + bx  # the output tile's counter: one per (group, weight, token) tile
        if tidx == 0:
            cute.arch.fence_acq_rel_gpu()
            arrived[0] = cute.arch.atomic_add(counters.iterator + tile_id, Int32(1), scope="gpu")
        _warpgroup0_sync()
        if arrived[0] == splits - 1:
            cute.arch.fence_acq_rel_gpu()
            for i in cutlass.range_constexpr(per_thread):
                t = token0 + coords[i][1]
                if t < tokens:
                    col = col0 + coords[i][0]
                    total = Float32(0.0)
                    for s in cutlass.range_constexpr(splits):
                        total = total + partials[s, t, col]
                    out[t, col] = total.to(out.element_type)
            if tidx == 0:
                counters[tile_id] = 0
