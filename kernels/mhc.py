"""mHC coefficients on the GPU (kernels/mhc_sm90.py); the twin is backend.model.sinkhorn_split."""
from __future__ import annotations

import functools

import torch


@functools.cache
def _compiled(hc: int, iters: int, eps: float, arch: str):
    from .moe import _ensure_cache_dir, _fake
    _ensure_cache_dir()
    import cutlass
    import cutlass.cute as cute
    from cutlass.runtime import make_fake_stream

    from .mhc_sm90 import mhc_coefficients as kernel
    f32 = cutlass.Float32
    args = (_fake(f32, None, (2 + hc) * hc), _fake(f32, 3), _fake(f32, (2 + hc) * hc), _fake(f32, None, hc),
            _fake(f32, None, hc), _fake(f32, None, hc * hc), make_fake_stream(use_tvm_ffi_env_stream=True))
    return cute.compile(kernel, *args, iters, eps, options="--enable-tvm-ffi")


def mhc_coefficients(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int, eps: float):
    """mixes fp32 [..., (2+hc)*hc] -> pre [..., hc], post [..., hc], comb [..., hc, hc]: one kernel."""
    from .moe import _arch
    if hc != 4:
        raise ValueError(f"mhc_coefficients: the kernel is written for hc_mult 4, got {hc}")
    lead = mixes.shape[:-1]
    flat = mixes.reshape(-1, mixes.shape[-1]).float().contiguous()
    n = flat.shape[0]
    pre = torch.empty(n, hc, dtype=torch.float32, device=mixes.device)
    post = torch.empty_like(pre)
    comb = torch.empty(n, hc * hc, dtype=torch.float32, device=mixes.device)
    _compiled(hc, iters, float(eps), _arch(mixes.device))(flat, scale.float().contiguous(), base.float().contiguous(),
                                                         pre, post, comb)
    return pre.view(*lead, hc), post.view(*lead, hc), comb.view(*lead, hc, hc)
