"""Sparse MQA for decode (one query token per sequence), CuTe DSL, in two kernels (flash-decoding):
DeepSeek-V4's shared K=V head (head_dim <= 512) over the sequence's sliding-window ring and, on
compressed layers, its compressed entries, with per-head sinks; then the inverse RoPE of the output
and its FP8 activation quantization. The twin is backend.model.sparse_mqa_decode_reference.

Keys are read in place: the ring (this step's token already written) masked by position, and the
compressed entries masked by `comp_mask` (the indexer's pick or the emitted entries). Why kernels:
the torch form copies the window and every entry slot into one key tensor, masks the scores over
all of it and runs a dozen kernels (H200 profile, bench/NOTES.md: ~31 us per layer at batch 1).
These two take 13-31 us per call at batch 1, 15-86 at batch 8 (V4-Flash, `bench.attention_decode`).

1. `mqa_partials`: grid (head groups, splits, batch). A CTA takes 4-16 heads and a run of 32-key
   chunks, each chunk all ring or all entries. Per chunk: warp 0 votes which keys exist (an empty
   chunk is skipped without loading a key), the valid keys go to shared memory by cp.async (the
   queries too, once), lane k of each warp scores key k against the warp's heads (fp32, four
   partial sums per head for independent FMA chains), the warp updates its heads' running max and
   sum (online softmax), and each thread accumulates a float4 of the head dim over the chunk's keys
   for every head. Out: unnormalized partial outputs with their max and sum, per split.
2. `mqa_combine`: grid (heads, batch), a float4 of the head dim per thread: the splits' partials
   and the head's sink (exp(sink) joins the denominator) in a fixed order, so a graph replay and an
   eager call agree bit for bit; the inverse RoPE of the trailing rope dims (interleaved pairs);
   the FP8 quantization per 128 (power-of-two scales, as the FP8 runner's quantizer).
Plain SIMT fp32 (the reference's precision): any sm_90a / sm_100a. At large batch its fp32 FMAs
bound it; and a chunk with any picked entry is scored whole, so scattered picks cost their chunks
(V4-Flash, 128 sequences, 512 of 1024 entries picked at random: every chunk, 0.87 ms). A list of
the picked entries' indices instead of the mask would cut that to the picks.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from .dependent_launch import wait_for_previous_kernel
from .linear.fp8_block_sm90 import quantize_warp_block

KEYS = 32                      # keys per chunk: one per lane when scoring
WARPS = 4                      # a CTA's warps split its heads when scoring
THREADS = 32 * WARPS           # a float4 of the head dim each when accumulating
MAX_DIM = 4 * THREADS          # 512: V4's head dim
NEG_INF = float("-inf")


@cute.jit
def _key_is_valid(row: Int32, rows: Int32, in_ring: cutlass.Boolean, position, comp_mask: cute.Tensor, b: Int32):
    """Key `row` of the ring (it holds positions pos-win+1 .. pos, slot j position j before the
    ring first wraps) or of the compressed entries (comp_mask)."""
    ok = row < rows
    if in_ring:
        ok = ok & (row <= position)
    else:
        ok = ok & (comp_mask[b, cutlass.min(row, rows - 1)] != 0)
    return ok


@cute.kernel
def _partials_kernel(q: cute.Tensor, ring: cute.Tensor, entries: cute.Tensor, comp_mask: cute.Tensor,
                     slots: cute.Tensor, pos: cute.Tensor, part_o: cute.Tensor, part_ml: cute.Tensor,
                     chunks_per_split: Int32, heads: cutlass.Constexpr, dim: cutlass.Constexpr,
                     scale: cutlass.Constexpr, has_entries: cutlass.Constexpr):
    """q [B, H, D/4, 4]; ring [slots, win, D/4, 4]; entries [slots, C, D/4, 4]; comp_mask uint8 [B, C];
    slots, pos int64 [B] -> part_o [B, splits, H, D/4, 4] (sum_k e^(s_k - m) v_k), part_ml [B, splits, H, 2]
    (m, sum_k e^(s_k - m)); m = -inf and zeros where a split has no valid key."""
    wait_for_previous_kernel()
    tid, _, _ = cute.arch.thread_idx()
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    group, split, b = cute.arch.block_idx()
    vecs = dim // 4
    per_warp = heads // WARPS
    smem = cutlass.memory.SmemAllocator()
    qs = smem.allocate_tensor(Float32, cute.make_layout((heads, vecs, 4), stride=(dim, 4, 1)), 16)
    # Rows padded by a float4: lane k reads row k when scoring, and the 8 lanes of a 16-byte phase
    # then fall on distinct banks.
    ks = smem.allocate_tensor(Float32, cute.make_layout((KEYS, vecs, 4), stride=(dim + 4, 4, 1)), 16)
    ps = smem.allocate_tensor(Float32, cute.make_layout((KEYS, heads), stride=(heads, 1)), 16)
    alpha = smem.allocate_tensor(Float32, cute.make_layout((heads,)), 16)
    valid = smem.allocate_tensor(Int32, cute.make_layout((1,)), 16)  # the chunk's key bits
    to_shared = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), Float32, num_bits_per_copy=128)
    zeros = cute.make_rmem_tensor((4,), Float32)
    zeros.fill(0.0)

    slot = slots[b]
    position = pos[b].to(Int32)
    for r in cutlass.range_constexpr((heads * vecs + THREADS - 1) // THREADS):  # waited for with the first keys
        i = tid + THREADS * r
        if i < heads * vecs:
            cute.copy(to_shared, q[b, group * heads + i // vecs, i % vecs, None], qs[i // vecs, i % vecs, None])
    cute.arch.cp_async_commit_group()

    win = ring.shape[1]
    ring_chunks = (win + KEYS - 1) // KEYS
    chunks = ring_chunks
    if cutlass.const_expr(has_entries):
        chunks = chunks + (entries.shape[1] + KEYS - 1) // KEYS
    first = split * chunks_per_split
    last = cutlass.min(first + chunks_per_split, chunks)

    m = cute.make_rmem_tensor((per_warp,), Float32)
    l = cute.make_rmem_tensor((per_warp,), Float32)
    for hh in cutlass.range_constexpr(per_warp):
        m[hh] = Float32(NEG_INF)
        l[hh] = Float32(0.0)
    acc = cute.make_rmem_tensor((heads, 4), Float32)
    for h in cutlass.range_constexpr(heads):
        for e in cutlass.range_constexpr(4):
            acc[h, e] = Float32(0.0)

    for chunk in cutlass.range(first, last, unroll=1):
        in_ring = chunk < ring_chunks
        base = chunk * KEYS
        rows = win
        if cutlass.const_expr(has_entries):
            if not in_ring:
                base = (chunk - ring_chunks) * KEYS
                rows = entries.shape[1]
        # 1. Which keys exist (a bit per key); a chunk without any is skipped whole (CTA-uniform).
        if warp == 0:
            bits = cute.arch.vote_ballot_sync(_key_is_valid(base + lane, rows, in_ring, position, comp_mask, b))
            if lane == 0:
                valid[0] = Int32(bits)
        cute.arch.sync_threads()
        bits = valid[0]
        if bits != 0:
            # 2. The valid keys into shared memory by cp.async (all of a thread's in flight at once),
            #    zeros for the rest (their weight is 0, and 0 * a stale NaN would not be).
            for r in cutlass.range_constexpr(KEYS * vecs // THREADS):
                i = tid + THREADS * r
                k = i // vecs
                v = i % vecs
                row = cutlass.min(base + k, rows - 1)
                if (bits >> k) & 1 != 0:
                    if cutlass.const_expr(has_entries):
                        if in_ring:
                            cute.copy(to_shared, ring[slot, row, v, None], ks[k, v, None])
                        else:
                            cute.copy(to_shared, entries[slot, row, v, None], ks[k, v, None])
                    else:
                        cute.copy(to_shared, ring[slot, row, v, None], ks[k, v, None])
                else:
                    ks[k, v, None].store(zeros.load())
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()

            # 3. Lane k scores key k against the warp's heads; online softmax per head.
            # A sum per head and float4 lane: 4 * per_warp independent FMA chains (one chain per head
            # stalls on each FMA's latency).
            s4 = cute.make_rmem_tensor((per_warp, 4), Float32)
            s4.fill(0.0)
            for v in cutlass.range(vecs, unroll=8):
                key = ks[lane, v, None].load()
                for hh in cutlass.range_constexpr(per_warp):
                    query = qs[warp * per_warp + hh, v, None].load()
                    for e in cutlass.range_constexpr(4):
                        s4[hh, e] = s4[hh, e] + query[e] * key[e]
            s = cute.make_rmem_tensor((per_warp,), Float32)
            for hh in cutlass.range_constexpr(per_warp):
                s[hh] = (s4[hh, 0] + s4[hh, 1]) + (s4[hh, 2] + s4[hh, 3])
            mine = (bits >> lane) & 1 != 0
            for hh in cutlass.range_constexpr(per_warp):
                score = Float32(NEG_INF)
                if mine:
                    score = s[hh] * Float32(scale)
                top = cute.arch.fmax(m[hh], cute.arch.warp_reduction_max(score))
                p = Float32(0.0)
                rescale = Float32(1.0)
                if top != Float32(NEG_INF):  # warp-uniform; else nothing seen yet: p 0, sums unchanged
                    p = cute.math.exp(score - top)
                    rescale = cute.math.exp(m[hh] - top)
                l[hh] = l[hh] * rescale + cute.arch.warp_reduction_sum(p)
                m[hh] = top
                ps[lane, warp * per_warp + hh] = p
                if lane == 0:
                    alpha[warp * per_warp + hh] = rescale
            cute.arch.sync_threads()

            # 4. Thread t: float4 t of the head dim, sum over the chunk's keys, every head.
            if tid < vecs:
                for h in cutlass.range_constexpr(heads):
                    for e in cutlass.range_constexpr(4):
                        acc[h, e] = acc[h, e] * alpha[h]
                for k in cutlass.range(KEYS, unroll=4):
                    key = ks[k, tid, None].load()
                    weights = ps[k, None].load()
                    for h in cutlass.range_constexpr(heads):
                        for e in cutlass.range_constexpr(4):
                            acc[h, e] = acc[h, e] + weights[h] * key[e]
        cute.arch.sync_threads()  # before the next chunk overwrites shared memory

    cute.arch.cp_async_wait_group(0)  # the queries' copies, where no chunk had a key
    if tid < vecs:
        for h in cutlass.range_constexpr(heads):
            out = cute.make_rmem_tensor((4,), Float32)
            for e in cutlass.range_constexpr(4):
                out[e] = acc[h, e]
            part_o[b, split, group * heads + h, tid, None].store(out.load())
    if lane == 0:
        for hh in cutlass.range_constexpr(per_warp):
            part_ml[b, split, group * heads + warp * per_warp + hh, 0] = m[hh]
            part_ml[b, split, group * heads + warp * per_warp + hh, 1] = l[hh]


@cute.kernel
def _combine_kernel(part_o: cute.Tensor, part_ml: cute.Tensor, sink: cute.Tensor, pos: cute.Tensor,
                    inv_freq: cute.Tensor, out: cute.Tensor, q_words: cute.Tensor, q_scale: cute.Tensor,
                    dim: cutlass.Constexpr, rope_dim: cutlass.Constexpr, quantize: cutlass.Constexpr):
    """part_o [B, S, H, D/4, 4], part_ml [B, S, H, 2], sink [H], pos int64 [B], inv_freq [rope/2] ->
    out [B, H, D/4, 4]; (quantize) q_words int32 [B, H*D/4] (E4M3 bytes), q_scale [B, H*D/128]."""
    wait_for_previous_kernel()
    tid, _, _ = cute.arch.thread_idx()
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    h, b, _ = cute.arch.block_idx()
    vecs = dim // 4
    splits = part_ml.shape[1]
    if tid < vecs:  # whole warps (dim % 128 == 0)
        sink_h = sink[h]
        top = sink_h
        for s in cutlass.range(splits, unroll=1):
            top = cute.arch.fmax(top, part_ml[b, s, h, 0])
        total = cute.math.exp(sink_h - top)
        o = cute.make_rmem_tensor((4,), Float32)
        o.fill(0.0)
        for s in cutlass.range(splits, unroll=1):
            weight = cute.math.exp(part_ml[b, s, h, 0] - top)  # 0 for a split without keys
            total = total + part_ml[b, s, h, 1] * weight
            part = part_o[b, s, h, tid, None].load()
            for e in cutlass.range_constexpr(4):
                o[e] = o[e] + weight * part[e]
        for e in cutlass.range_constexpr(4):
            o[e] = o[e] / total
        # Inverse RoPE of the trailing rope dims: pairs (2i, 2i+1) rotated by -pos * inv_freq[i].
        nope = dim - rope_dim
        if tid * 4 >= nope:
            for pair in cutlass.range_constexpr(2):
                angle = pos[b].to(Float32) * inv_freq[(tid * 4 - nope) // 2 + pair]
                c = cute.math.cos(angle)
                sn = cute.math.sin(angle)
                even = o[2 * pair]
                odd = o[2 * pair + 1]
                o[2 * pair] = even * c + odd * sn
                o[2 * pair + 1] = odd * c - even * sn
        out[b, h, tid, None].store(o.load())
        if cutlass.const_expr(quantize):
            word, block_scale = quantize_warp_block(o)
            q_words[b, h * vecs + tid] = word
            if lane == 0:
                q_scale[b, h * (dim // 128) + warp] = block_scale


@cute.jit
def mqa_partials(q, ring, entries, comp_mask, slots, pos, part_o, part_ml, chunks_per_split: Int32, stream,
                 heads: cutlass.Constexpr, dim: cutlass.Constexpr, scale: cutlass.Constexpr,
                 has_entries: cutlass.Constexpr):
    """See _partials_kernel; grid (H / heads, splits, B)."""
    _partials_kernel(q, ring, entries, comp_mask, slots, pos, part_o, part_ml, chunks_per_split, heads, dim, scale,
                     has_entries).launch(grid=[q.shape[1] // heads, part_ml.shape[1], q.shape[0]],
                                         block=[THREADS, 1, 1], stream=stream, use_pdl=True)


@cute.jit
def mqa_combine(part_o, part_ml, sink, pos, inv_freq, out, q_words, q_scale, stream, dim: cutlass.Constexpr,
                rope_dim: cutlass.Constexpr, quantize: cutlass.Constexpr):
    """See _combine_kernel; grid (H, B)."""
    _combine_kernel(part_o, part_ml, sink, pos, inv_freq, out, q_words, q_scale, dim, rope_dim, quantize).launch(
        grid=[out.shape[1], out.shape[0], 1], block=[THREADS, 1, 1], stream=stream, use_pdl=True)
