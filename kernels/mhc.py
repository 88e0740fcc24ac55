"""mHC pre-mix on the GPU (kernels/mhc_sm90.py): the streams -> the sublayer's input, post and comb,
in two kernels. The twin is backend.model.mhc_pre_reference."""
from __future__ import annotations

import functools

import torch

from .cute_compile import compile_tvm_ffi, fake, target_arch
from .formats import FP8_BLOCK


@functools.cache
def _compiled_partials(arch: str):
    import cutlass

    from .mhc_sm90 import MIXES, mix_partials
    f32 = cutlass.Float32
    return compile_tvm_ffi(mix_partials, (fake(f32, None, None, 4), fake(f32, MIXES, None, 4),
                                          fake(f32, None, None, MIXES + 1)))


@functools.cache
def _compiled_finish(dim: int, iters: int, eps: float, rms_eps: float, quantize: bool, arch: str):
    import cutlass

    from .mhc_sm90 import HC, MIXES, mhc_pre_finish
    f32 = cutlass.Float32
    args = (fake(f32, None, None, MIXES + 1), fake(f32, None, None, 4), fake(f32, 3), fake(f32, MIXES),
            fake(f32, None, 4), fake(f32, None, None, 4), fake(f32, None, HC), fake(f32, None, HC * HC),
            fake(cutlass.Int32, None, None), fake(f32, None, None))
    return compile_tvm_ffi(mhc_pre_finish, args, (dim, iters, eps, rms_eps, quantize))


def applies(hc: int, dim: int) -> bool:
    """Whether the kernels take hc streams of width dim (every V4 model's: 4 streams, whole 128-wide chunks)."""
    from .mhc_sm90 import CHUNK, HC
    return hc == HC and dim % CHUNK == 0


def mhc_pre(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm: torch.Tensor,
            iters: int, eps: float, rms_eps: float, quantize: bool):
    """h fp32 [T, hc, D] (the residual streams), fn [(2+hc)*hc, hc*D], scale [3], base [(2+hc)*hc], norm [D]
    -> x [T, D] fp32 (RMSNorm of the streams mixed by pre), post [T, hc], comb [T, hc, hc], and x's FP8
    activation quantization (E4M3 [T, D], fp32 scales [T, D/128], bit for bit the FP8 runner's) or None."""
    from .mhc_sm90 import CHUNK, HC, MIXES
    t, hc, dim = h.shape
    if not applies(hc, dim) or tuple(fn.shape) != (MIXES, hc * dim) or norm.numel() != dim:
        raise ValueError(f"mhc_pre: needs streams [T, {HC}, D] with D % {CHUNK} == 0, fn [{MIXES}, {HC}*D] and a "
                         f"norm of D; got h {tuple(h.shape)}, fn {tuple(fn.shape)}, norm {tuple(norm.shape)}")
    arch, dev = target_arch(h.device), h.device
    h = h.float().contiguous()
    partials = torch.empty(t, hc * dim // CHUNK, MIXES + 1, dtype=torch.float32, device=dev)
    _compiled_partials(arch)(h.view(t, -1, 4), fn.float().contiguous().view(MIXES, -1, 4), partials)
    x = torch.empty(t, dim, dtype=torch.float32, device=dev)
    post = torch.empty(t, hc, dtype=torch.float32, device=dev)
    comb = torch.empty(t, hc * hc, dtype=torch.float32, device=dev)
    q_shape, scale_shape = ((t, dim), (t, dim // FP8_BLOCK)) if quantize else ((1, 4), (1, 1))  # else unwritten
    q = torch.empty(q_shape, dtype=torch.float8_e4m3fn, device=dev)
    q_scale = torch.empty(scale_shape, dtype=torch.float32, device=dev)
    _compiled_finish(dim, iters, float(eps), float(rms_eps), quantize, arch)(
        partials, h.view(t, -1, 4), scale.float().contiguous(), base.float().contiguous(),
        norm.float().contiguous().view(-1, 4), x.view(t, -1, 4), post, comb, q.view(torch.int32), q_scale)
    return x, post, comb.view(t, hc, hc), (q, q_scale) if quantize else None
