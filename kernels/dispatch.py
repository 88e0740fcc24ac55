"""Which kernels run where: one decision per device, logged once.

    compute capability 10.x (Blackwell) -> "sm100": W4A4 runners for NVFP4 (COMPILE-VERIFIED ONLY, no
                                           Blackwell GPU has run them), W4A16 runners for MXFP4
    compute capability 9.x  (Hopper)    -> "sm90":  FP8 block-128 wgmma GEMM, W4A16 runners
    anything else (CPU, older GPUs)     -> "twin":  the pure-torch twins

`linear(x, weight)` and `moe(...)` call the runner for the weight's format on that backend. FP8
block-128 layers on Blackwell use the twin until an sm_100a FP8 runner exists.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .formats import Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight, slice_rows

log = logging.getLogger("deepseek_v4.kernels")


def backend_for(capability: tuple[int, int] | None) -> str:
    if capability is None:
        return "twin"
    if capability[0] == 10:
        return "sm100"
    if capability[0] == 9:
        return "sm90"
    return "twin"


@functools.cache
def backend(device: torch.device) -> str:
    device = torch.device(device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    chosen = backend_for(cap)
    name = torch.cuda.get_device_name(device) if cap else "CPU"
    what = {"sm100": "sm_100a runners (W4A4 NVFP4: compile-verified only, never run on hardware)",
            "sm90": "sm_90a runners (FP8 wgmma GEMM, W4A16)", "twin": "pure-torch twins"}[chosen]
    log.info("kernels: %s (capability %s) -> %s", name, cap, what)
    return chosen


def linear(x, weight, out_dtype: torch.dtype | None = None, groups: int = 1) -> torch.Tensor:
    """y = x @ W^T on the device's runner for W's format; x bf16 or fp32 [T, K] (fp32 saves FP8 a
    double rounding), y in out_dtype (default: x's, fp32 for a pair). For an FP8 block-128 W, x may
    also come quantized already: (E4M3 [T, K], fp32 scales [T, K/128]) as quantize_activation_fp8
    gives them. groups > 1: W is block-diagonal [groups*R, K] and x [T, groups*K]; group g reads
    x[:, g*K:(g+1)*K] and gives y[:, g*R:(g+1)*R] (wo_a)."""
    from . import linear as lin
    quantized = isinstance(x, tuple)
    kind = backend((x[0] if quantized else x).device)
    out_dtype = out_dtype or (torch.float32 if quantized else x.dtype)
    if isinstance(weight, Fp8BlockWeight):
        if kind == "sm90":  # one launch for all groups
            return lin.linear_fp8(x if quantized else x.contiguous(), weight, groups, out_dtype=out_dtype)
        return lin.linear_fp8_ref(x, weight, groups).to(out_dtype)
    if quantized:
        raise TypeError(f"an FP8-quantized input goes to an FP8 block-128 weight only, not {type(weight).__name__}")
    if isinstance(weight, Mxfp4Weight) or (isinstance(weight, Nvfp4Weight) and kind != "sm100"):  # W4A16
        if kind in ("sm90", "sm100"):  # one launch for all groups
            return lin.linear_w4a16(x.contiguous(), weight, groups).to(out_dtype)
        return lin.linear_w4a16_ref(x, weight, groups).to(out_dtype)
    if groups > 1:
        k, r = x.shape[1] // groups, weight.shape[0] // groups
        return torch.cat([linear(x[:, i * k:(i + 1) * k], slice_rows(weight, i * r, (i + 1) * r), out_dtype)
                          for i in range(groups)], dim=-1)
    if isinstance(weight, Nvfp4Weight):  # on sm100
        return lin.linear_w4a4(x.to(torch.bfloat16).contiguous(), weight).to(out_dtype)
    return F.linear(x, weight.to(x.dtype)).to(out_dtype)


def moe_activations(x: torch.Tensor) -> torch.Tensor | None:
    """What `moe` would first make of x on this device, for a caller to make it beforehand (on
    another stream): the W4A16 kernels' activation order (kernels.moe.pair_order), else None."""
    from .moe import pair_order
    return pair_order(x) if backend(x.device) == "sm90" else None


def moe(x, weights, experts, stacked, swiglu_limit: float, sum_slots: bool = True,
        x_ordered: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts on the device's runner -> fp32 [T, D] (sum_slots False: [T, k, D], each
    (token, k) slot's output; their sum over k, in order, is the [T, D] result). x_ordered:
    moe_activations(x), made beforehand, or None."""
    from .moe import moe_w4a16, moe_w4a16_ref
    from .moe.w4a4 import moe_w4a4
    kind = backend(x.device)
    if kind == "sm100" and stacked.fmt == "nvfp4":
        return moe_w4a4(x, weights, experts, stacked, swiglu_limit, sum_slots=sum_slots)
    if kind in ("sm90", "sm100"):
        return moe_w4a16(x, weights, experts, stacked, swiglu_limit, sum_slots, x_ordered)
    return moe_w4a16_ref(x, weights, experts, stacked, swiglu_limit, sum_slots)
