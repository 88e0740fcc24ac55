"""Dense linear layers per weight format: the pure-torch twins that define the GPU runners.

`linear_ref(x, weight)` computes y = x @ W^T for a weight in the format it ships in. It dequantizes
on the fly, one call at a time, and never stores the dequantized weight. The twin mirrors what the
runners compute:
- FP8 block-128 weights (FP8 GEMM): when `quantize_input` is set, activations are quantized per
  token per 128 along K to E4M3 with power-of-two scales (DeepSeek's act_quant) before the GEMM.
- NVFP4 / MXFP4 weights (Hopper W4A16): activations stay in their own precision.
- Plain tensors (BF16/fp32): F.linear in the activation's dtype.

`linear_w4a16(x, weight)` is the CuTe DSL runner for a dense NVFP4/MXFP4 linear: the MoE grouped
kernel with one group (kernels.moe), the checkpoint's bytes used in place (views, no copy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import MXFP4_BLOCK, NVFP4_BLOCK, Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight, fp8_qdq

__all__ = ["linear_ref", "dequantize_weight", "linear_w4a16", "linear_w4a16_ref"]


def dequantize_weight(weight, dtype=torch.float32) -> torch.Tensor:
    """Any weight container (or a plain tensor) -> a float tensor [out, in] of `dtype`."""
    if isinstance(weight, (Fp8BlockWeight, Nvfp4Weight, Mxfp4Weight)):
        return weight.dequantize().to(dtype)
    return weight.to(dtype)


def linear_ref(x: torch.Tensor, weight, quantize_input: bool = False) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype. `quantize_input` applies only to FP8 block weights."""
    if isinstance(weight, Fp8BlockWeight) and quantize_input:
        x = fp8_qdq(x)
    return F.linear(x, dequantize_weight(weight, x.dtype))


def linear_w4a16_ref(x: torch.Tensor, weight) -> torch.Tensor:
    """The twin of linear_w4a16: x [T, K] @ dequant(W)^T in fp32 -> fp32 [T, N]."""
    if not isinstance(weight, (Nvfp4Weight, Mxfp4Weight)):
        raise TypeError(f"linear_w4a16 takes NVFP4 or MXFP4 weights, got {type(weight).__name__}")
    return F.linear(x.float(), weight.dequantize())


def linear_w4a16(x: torch.Tensor, weight) -> torch.Tensor:
    """Dense W4A16 on the GPU: x bf16 [T, K], weight NVFP4/MXFP4 [N, K] -> fp32 [T, N].
    Graph safe (static shapes, no host syncs); compile first outside any capture (one eager call)."""
    from .moe import _arch, _compiled, _vecs, pair_order  # CuTe DSL is needed only here
    from .moe.experts import w4_parts
    from .moe.routing import Dispatch
    packed, scales, gscale = w4_parts(weight)
    group = NVFP4_BLOCK if isinstance(weight, Nvfp4Weight) else MXFP4_BLOCK
    t, dev = x.shape[0], x.device
    # One "expert" holding every token: slots 0..T-1 (built with fill kernels, no host copies).
    one = Dispatch(torch.arange(t, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev),
                   torch.zeros(2, dtype=torch.int32, device=dev), torch.ones(1, dtype=torch.int32, device=dev))
    one.active_start[1:].fill_(t)
    out = torch.empty(t, weight.shape[0], dtype=torch.float32, device=dev)
    kernel = _compiled(False, 1, group, 0.0, _arch(dev))
    kernel(_vecs(pair_order(x)), _vecs(packed.unsqueeze(0)), scales.unsqueeze(0), gscale.reshape(1, 1),
           one.sorted_slots.float(), one.sorted_slots, one.active_experts, one.active_start, one.num_active, out)
    return out
