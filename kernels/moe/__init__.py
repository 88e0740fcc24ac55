"""Routed-expert MoE in W4A16 (NVFP4 or MXFP4 weights, BF16 activations).

    moe_w4a16(x, weights, experts, stacked, swiglu_limit)      CuTe DSL runner (sm_90a and newer)
    moe_w4a16_ref(x, weights, experts, stacked, swiglu_limit)  the pure-torch twin (the spec)

Both return fp32 [T, D]. The runner groups slots by expert on the device in one kernel
(`dispatch_fused`, the same result as the twin's `routing.dispatch` up to the order of slots within
an expert, which no output depends on). It runs the L1 kernel (w1||w3, clamped SwiGLU, routing
weight) into an FP16 intermediate per (token, k) slot, then the L2 kernel (w2), and sums each
token's k slots in order. No host syncs and static launch shapes, so it captures into CUDA graphs.
Kernels compile once per static configuration (format, top-k, limit, experts) for any token
count, and are cached in memory and on disk (CUTE_DSL_CACHE_DIR). Call `compile_kernels` (or run
once eagerly) before capturing a graph: compiling cannot happen inside a capture.
"""
from __future__ import annotations

import functools

import torch

from ..cute_compile import compile_tvm_ffi, fake, target_arch
from .experts import StackedExperts, moe_w4a16_ref, stack_experts, unstack
from .routing import Dispatch, dispatch, route_hash, route_topk

__all__ = ["moe_w4a16", "moe_w4a16_ref", "StackedExperts", "stack_experts", "unstack", "dispatch", "Dispatch",
           "route_topk", "route_hash", "compile_kernels", "dispatch_fused"]


@functools.cache
def _compiled(gated: bool, top_k: int, group: int, swiglu_limit: float, arch: str, tiles: tuple | None = None):
    """One compiled grouped GEMV per static configuration; every size is a runtime value.
    tiles: (warps, rows per warp, token tile); default: the module's tuned values."""
    import cutlass

    from . import w4a16_sm90 as kernel

    if tiles is None:
        tiles = (kernel.WARPS, kernel.ROWS_L1 if gated else kernel.ROWS_L2, kernel.TOKEN_TILE)

    args = (fake(cutlass.Int32, None, None, 4), fake(cutlass.Int32, None, None, None, 4), fake(cutlass.Uint8, None, None, None),
            fake(cutlass.Float32, None, 2 if gated else 1), fake(cutlass.Float32, None), fake(cutlass.Int32, None),
            fake(cutlass.Int32, None), fake(cutlass.Int32, None), fake(cutlass.Int32, 1),
            fake(cutlass.Float16 if gated else cutlass.Float32, None, None))
    return compile_tvm_ffi(kernel.grouped_gemv, args, (top_k, group, gated, swiglu_limit, *tiles))


@functools.cache
def _compiled_dispatch(num_experts: int, arch: str):
    import cutlass

    from .dispatch_sm90 import dispatch_launch
    args = (fake(cutlass.Int64, None), fake(cutlass.Int32, None), fake(cutlass.Int32, None),
            fake(cutlass.Int32, None), fake(cutlass.Int32, 1))
    return compile_tvm_ffi(dispatch_launch, args, (num_experts,))


def dispatch_fused(experts: torch.Tensor, num_experts: int) -> Dispatch:
    """kernels.moe.routing.dispatch in one kernel launch (slot order within an expert is arbitrary)."""
    t, k = experts.shape
    n, a = t * k, min(num_experts, t * k)
    dev = experts.device
    d = Dispatch(torch.empty(n, dtype=torch.int32, device=dev), torch.empty(a, dtype=torch.int32, device=dev),
                 torch.empty(a + 1, dtype=torch.int32, device=dev), torch.empty(1, dtype=torch.int32, device=dev))
    _compiled_dispatch(num_experts, target_arch(dev))(experts.reshape(-1).to(torch.int64), d.sorted_slots,
                                                d.active_experts, d.active_start, d.num_active)
    return d


def compile_kernels(fmt: str, top_k: int, swiglu_limit: float, device=None, num_experts: int | None = None) -> None:
    """Warm-up: compile (or load from the disk cache) both kernels before any CUDA-graph capture."""
    group = 16 if fmt == "nvfp4" else 32
    arch = target_arch(device or ("cuda" if torch.cuda.is_available() else None))
    for gated in (True, False):
        _compiled(gated, top_k, group, float(swiglu_limit), arch)
    if num_experts is not None:
        _compiled_dispatch(num_experts, arch)


def pair_order(x: torch.Tensor) -> torch.Tensor:
    """Activations [T, D] (bf16 or fp32) as f16 in the kernels' pair order: within each 8,
    (0,4),(1,5),(2,6),(3,7)."""
    t, d = x.shape
    out = torch.empty(t, d, dtype=torch.float16, device=x.device)
    out.view(t, d // 8, 4, 2).copy_(x.view(t, d // 8, 2, 4).transpose(-1, -2))  # one kernel: permute + convert
    return out


def _vecs(t: torch.Tensor) -> torch.Tensor:
    """[..., K] bf16 or packed-FP4 bytes -> int32 [..., K', 4]: 16-byte vectors for the kernels."""
    words = t.view(torch.int32)
    return words.view(*words.shape[:-1], words.shape[-1] // 4, 4)


def moe_w4a16(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, stacked: StackedExperts,
              swiglu_limit: float) -> torch.Tensor:
    """x: bf16 or fp32 [T, D]; weights: fp32 [T, k]; experts: int [T, k] -> fp32 [T, D] (see moe_w4a16_ref).
    Inner products run in f16x2 per 8 weights (activations converted to f16, which holds BF16
    activations exactly within +-65504), accumulated in fp32 with the block scale per word."""
    t, k = experts.shape
    if x.dtype not in (torch.bfloat16, torch.float32) or not x.is_contiguous():
        raise ValueError(f"moe_w4a16: x must be a contiguous bfloat16 or float32 tensor [T, D], got {x.dtype}")
    if stacked.hidden % 32 or stacked.inter % 32:
        raise ValueError("moe_w4a16: hidden and intermediate sizes must be multiples of 32")  # also of ROWS (4)
    arch = target_arch(x.device)
    d = dispatch_fused(experts, stacked.num_experts)
    route_w = weights.reshape(-1).float().contiguous()
    h = torch.empty(t * k, stacked.inter, dtype=torch.float16, device=x.device)
    y = torch.empty(t * k, stacked.hidden, dtype=torch.float32, device=x.device)
    common = (d.sorted_slots, d.active_experts, d.active_start, d.num_active)
    l1 = _compiled(True, k, stacked.group, float(swiglu_limit), arch)
    l1(_vecs(pair_order(x)), _vecs(stacked.w13), stacked.s13, stacked.g13, route_w, *common, h)
    l2 = _compiled(False, k, stacked.group, float(swiglu_limit), arch)
    l2(_vecs(h), _vecs(stacked.w2), stacked.s2, stacked.g2.view(-1, 1), route_w, *common, y)
    return y.view(t, k, -1).sum(1)
