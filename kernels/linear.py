"""Dense linear layers per weight format: the pure-torch twins that define the GPU runners.

`linear_ref(x, weight)` computes y = x @ W^T for a weight in the format it ships in. It dequantizes
on the fly, one call at a time, and never stores the dequantized weight. The twin mirrors what the
runners compute:
- FP8 block-128 weights (FP8 GEMM): when `quantize_input` is set, activations are quantized per
  token per 128 along K to E4M3 with power-of-two scales (DeepSeek's act_quant) before the GEMM.
- NVFP4 / MXFP4 weights (Hopper W4A16): activations stay in their own precision.
- Plain tensors (BF16/fp32): F.linear in the activation's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight, fp8_qdq

__all__ = ["linear_ref", "dequantize_weight"]


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
