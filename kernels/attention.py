"""Sparse MQA for decode on the GPU (kernels/attention_sm90.py): one query token per sequence over
its sliding-window ring and compressed entries, read in place, with per-head sinks, the inverse
RoPE and the FP8 quantization of the output. The twin is backend.model.sparse_mqa_decode_reference."""
from __future__ import annotations

import functools

import torch

from .cute_compile import compile_tvm_ffi, fake, target_arch
from .formats import FP8_BLOCK


@functools.cache
def _compiled_partials(heads: int, dim: int, scale: float, has_entries: bool, arch: str):
    import cutlass

    from .attention_sm90 import mqa_partials
    f32, vecs = cutlass.Float32, dim // 4
    args = (fake(f32, None, None, vecs, 4), fake(f32, None, None, vecs, 4), fake(f32, None, None, vecs, 4),
            fake(cutlass.Uint8, None, None), fake(cutlass.Int64, None), fake(cutlass.Int64, None),
            fake(f32, None, None, None, vecs, 4), fake(f32, None, None, None, 2), cutlass.Int32(1))
    return compile_tvm_ffi(mqa_partials, args, (heads, dim, scale, has_entries))


@functools.cache
def _compiled_combine(dim: int, rope_dim: int, quantize: bool, arch: str):
    import cutlass

    from .attention_sm90 import mqa_combine
    f32, vecs = cutlass.Float32, dim // 4
    args = (fake(f32, None, None, None, vecs, 4), fake(f32, None, None, None, 2), fake(f32, None),
            fake(cutlass.Int64, None), fake(f32, None), fake(f32, None, None, vecs, 4),
            fake(cutlass.Int32, None, None), fake(f32, None, None))
    return compile_tvm_ffi(mqa_combine, args, (dim, rope_dim, quantize))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(batch: int, head_groups: int, chunks: int, ctas: int) -> tuple[int, int]:
    """(splits, chunks per split): the chunks of a sequence's keys spread over enough CTAs to give
    every SM two, and no split empty. A function of the shapes only, so a captured graph keeps it."""
    want = max(1, min(chunks, -(-ctas // (batch * head_groups))))
    per_split = -(-chunks // want)
    return -(-chunks // per_split), per_split


def heads_per_cta(heads: int) -> int:
    for n in (16, 8, 4):
        if heads % n == 0:
            return n
    raise ValueError(f"sparse_mqa_decode: the number of heads ({heads}) must be a multiple of 4")


def applies(heads: int, dim: int) -> bool:
    """Whether the kernels take `heads` query heads of head dim `dim` (every V4 model's do): heads
    in fours (a warp's share of a CTA's), a head dim of whole 128-blocks (a warp's share of a
    head) up to 512 (a float4 per thread)."""
    from .attention_sm90 import MAX_DIM
    return heads % 4 == 0 and dim % FP8_BLOCK == 0 and dim <= MAX_DIM


def sparse_mqa_decode(q: torch.Tensor, ring: torch.Tensor, entries: torch.Tensor | None,
                      comp_mask: torch.Tensor | None, slots: torch.Tensor, pos: torch.Tensor, sink: torch.Tensor,
                      inv_freq: torch.Tensor, scale: float, quantize: bool):
    """q fp32 [B, H, D] (the query heads after RoPE); ring fp32 [N, win, D], this step's keys already
    written (ring slot j holds the position p = j mod win, pos - win < p <= pos); entries fp32 [N, C, D]
    with comp_mask bool [B, C] (which of the sequence's entries it attends), or both None; slots,
    pos int [B]; sink [H]; inv_freq [rope/2] -> o fp32 [B, H, D] with the inverse RoPE applied, and
    (quantize) its FP8 activation quantization as rows [B, H*D] (E4M3, fp32 scales [B, H*D/128],
    bit for bit the FP8 runner quantizer's), else None."""
    from .attention_sm90 import KEYS, MAX_DIM
    b, h, dim = q.shape
    if not applies(h, dim) or ring.shape[-1] != dim or (entries is None) != (comp_mask is None):
        raise ValueError(f"sparse_mqa_decode: needs heads in fours and a head dim that is a multiple of {FP8_BLOCK} "
                         f"up to {MAX_DIM}, shared by q {tuple(q.shape)} and ring {tuple(ring.shape)}, and entries "
                         "with comp_mask")
    if entries is not None and (entries.shape[-1] != dim or tuple(comp_mask.shape) != (b, entries.shape[1])):
        raise ValueError(f"sparse_mqa_decode: entries {tuple(entries.shape)} and comp_mask "
                         f"{tuple(comp_mask.shape)} do not fit q {tuple(q.shape)}")
    arch, dev = target_arch(q.device), q.device
    heads = heads_per_cta(h)
    chunks = -(-ring.shape[1] // KEYS) + (0 if entries is None else -(-entries.shape[1] // KEYS))
    splits, per_split = split_plan(b, h // heads, chunks, 2 * _multiprocessors(dev))
    vecs = dim // 4
    pos = pos.long().contiguous()  # both kernels read it
    has_entries = entries is not None
    if not has_entries:  # unread stand-ins
        entries, comp_mask = ring, torch.empty(b, 1, dtype=torch.bool, device=dev)  # no fill kernel
    part_o = torch.empty(b, splits, h, vecs, 4, dtype=torch.float32, device=dev)
    part_ml = torch.empty(b, splits, h, 2, dtype=torch.float32, device=dev)
    _compiled_partials(heads, dim, float(scale), has_entries, arch)(
        q.float().contiguous().view(b, h, vecs, 4), ring.view(*ring.shape[:2], vecs, 4),
        entries.view(*entries.shape[:2], vecs, 4), comp_mask.contiguous().view(torch.uint8),
        slots.long().contiguous(), pos, part_o, part_ml, per_split)
    out = torch.empty(b, h, dim, dtype=torch.float32, device=dev)
    q_shape, scale_shape = ((b, h * dim), (b, h * dim // FP8_BLOCK)) if quantize else ((1, 4), (1, 1))  # else unwritten
    q8 = torch.empty(q_shape, dtype=torch.float8_e4m3fn, device=dev)
    q_scale = torch.empty(scale_shape, dtype=torch.float32, device=dev)
    _compiled_combine(dim, inv_freq.numel() * 2, quantize, arch)(
        part_o, part_ml, sink.float().contiguous(), pos, inv_freq.float().contiguous(),
        out.view(b, h, vecs, 4), q8.view(torch.int32), q_scale)
    return out, (q8, q_scale) if quantize else None
