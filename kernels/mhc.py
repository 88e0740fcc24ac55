"""mHC coefficients on the GPU (kernels/mhc_sm90.py); the twin is backend.model.sinkhorn_split."""
from __future__ import annotations

import functools

import torch

from .cute_compile import compile_tvm_ffi, fake, target_arch


@functools.cache
def _compiled(hc: int, iters: int, eps: float, arch: str):
    import cutlass

    from .mhc_sm90 import mhc_coefficients as kernel
    f32 = cutlass.Float32
    args = (fake(f32, None, (2 + hc) * hc), fake(f32, 3), fake(f32, (2 + hc) * hc), fake(f32, None, hc),
            fake(f32, None, hc), fake(f32, None, hc * hc))
    return compile_tvm_ffi(kernel, args, (iters, eps))


def mhc_coefficients(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int, eps: float):
    """mixes fp32 [..., (2+hc)*hc] -> pre [..., hc], post [..., hc], comb [..., hc, hc]: one kernel."""
    if hc != 4:
        raise ValueError(f"mhc_coefficients: the kernel is written for hc_mult 4, got {hc}")
    lead = mixes.shape[:-1]
    flat = mixes.reshape(-1, mixes.shape[-1]).float().contiguous()
    n = flat.shape[0]
    pre = torch.empty(n, hc, dtype=torch.float32, device=mixes.device)
    post = torch.empty_like(pre)
    comb = torch.empty(n, hc * hc, dtype=torch.float32, device=mixes.device)
    _compiled(hc, iters, float(eps), target_arch(mixes.device))(flat, scale.float().contiguous(), base.float().contiguous(),
                                                         pre, post, comb)
    return pre.view(*lead, hc), post.view(*lead, hc), comb.view(*lead, hc, hc)
