"""Routed experts in W4A4 (NVFP4 weights and NVFP4 activations): Blackwell's path.

On sm_100a the block-scaled tensor cores take E2M1 operands with E4M3 scales per 16 directly, so
activations are quantized on the fly, each with its expert's calibrated `input_scale` as the
fixed global scale:

    L1:  xq = nvfp4(x, a13[e]);  g, u = xq W1^T, xq W3^T        (alpha = a13[e] * g13[e] in the epilogue)
         h  = w_route * silu(min(g, L)) * clamp(u, +-L)
    L2:  hq = nvfp4(h, a2[e]);   y = hq W2^T                     (alpha = a2[e] * g2[e])
    out[t] = sum over the token's k slots, in order

`moe_w4a4_ref` is that pipeline in torch (CPU or any GPU): the spec of `moe_w4a4`, the sm_100a
runner (kernels.w4a4), which compiles here but has NOT run on hardware.

`padded_tiles` is the runner's dispatch, in torch ops with static shapes (graph safe): every
(token, k) slot gets a row in an expert-contiguous buffer where each expert's rows are padded to
whole token tiles, so a tile belongs to exactly one expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import nvfp4_qdq
from .experts import StackedExperts, clamped_swiglu, expert_runs, slot_outputs


def moe_w4a4_ref(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, stacked: StackedExperts,
                 swiglu_limit: float, sum_slots: bool = True) -> torch.Tensor:
    """x [T, D]; weights fp32 [T, k]; experts [T, k] -> fp32 [T, D] (sum_slots False: [T, k, D]).
    NVFP4 experts only."""
    if stacked.fmt != "nvfp4" or stacked.a13 is None:
        raise ValueError("moe_w4a4_ref: W4A4 needs NVFP4 experts with their input_scale "
                         f"(got {stacked.fmt} experts)")
    t, k = experts.shape
    y = torch.zeros(t * k, stacked.hidden, dtype=torch.float32, device=x.device)
    for e, slots, (w1, w2, w3) in expert_runs(experts, stacked):
        xq = nvfp4_qdq(x[slots // k].float(), stacked.a13[e])
        h = clamped_swiglu(xq, w1, w3, weights.reshape(-1)[slots, None].float(), swiglu_limit)
        y[slots] = nvfp4_qdq(h, stacked.a2[e]) @ w2.T
    return slot_outputs(y, t, k, sum_slots)


def calibrate_input_scales(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, stacked: StackedExperts,
                           swiglu_limit: float) -> StackedExperts:
    """ModelOpt-style calibration on sample tokens: input_scale = amax / (6 * 448) of each expert's
    L1 input x and L2 input h (BF16-activation pipeline); experts that saw no token keep theirs.
    For synthetic checkpoints and tests; real checkpoints ship calibrated scales."""
    k = experts.shape[1]
    a13, a2 = stacked.a13.clone(), stacked.a2.clone()
    for e, slots, (w1, _, w3) in expert_runs(experts, stacked):
        xs = x[slots // k].float()
        h = clamped_swiglu(xs, w1, w3, weights.reshape(-1)[slots, None].float(), swiglu_limit)
        a13[e], a2[e] = xs.abs().amax() / (6 * 448), h.abs().amax().clamp(min=1e-30) / (6 * 448)
    return StackedExperts(stacked.fmt, stacked.w13, stacked.s13, stacked.g13, stacked.w2, stacked.s2, stacked.g2,
                          a13, a2)


@dataclass
class PaddedTiles:
    row_source: torch.Tensor   # int32 [R]: the token a row reads (-1: padding)
    row_slot: torch.Tensor     # int64 [R]: the (token, k) slot a row computes (T*k: padding)
    row_weight: torch.Tensor   # fp32 [R]: the slot's routing weight (0: padding)
    tile_group: torch.Tensor   # int32 [R / tile_n]: each tile's expert (-1: unused)


def padded_tiles(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, tile_n: int) -> PaddedTiles:
    """Rows for every slot, expert by expert, each expert's run padded to a multiple of tile_n.
    R = the static bound ceil((T*k + min(E, T*k) * (tile_n - 1)) / tile_n) * tile_n."""
    t, k = experts.shape
    n, dev = t * k, experts.device
    rows = -(-(n + min(num_experts, n) * (tile_n - 1)) // tile_n) * tile_n
    flat = experts.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + tile_n - 1) // tile_n * tile_n
    start = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices                     # slots grouped by expert
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    row_of = start[flat[order]] + rank
    row_slot = torch.full((rows,), n, dtype=torch.long, device=dev).scatter_(0, row_of, order)
    valid = row_slot < n
    row_source = torch.where(valid, row_slot // k, -1).to(torch.int32)
    row_weight = torch.where(valid, weights.reshape(-1).float()[row_slot.clamp(max=n - 1)], 0.0)
    tile_start = torch.arange(rows // tile_n, device=dev) * tile_n
    owner = torch.searchsorted(torch.cumsum(padded, 0), tile_start, right=True)
    tile_group = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return PaddedTiles(row_source, row_slot, row_weight, tile_group)


def moe_w4a4(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, stacked: StackedExperts,
             swiglu_limit: float, tile_n: int = 128, sum_slots: bool = True) -> torch.Tensor:
    """The sm_100a runner of moe_w4a4_ref (COMPILE-VERIFIED ONLY): x bf16 [T, D] -> fp32 [T, D]
    (sum_slots False: [T, k, D])."""
    from ..w4a4 import blockscaled_matmul, quantize_rows_nvfp4, swizzled
    if stacked.fmt != "nvfp4" or stacked.a13 is None:
        raise ValueError("moe_w4a4: W4A4 needs NVFP4 experts with their input_scale")
    t, k = experts.shape
    e, d, i = stacked.num_experts, stacked.hidden, stacked.inter
    tiles = padded_tiles(weights, experts, e, tile_n)
    s13, s2 = swizzled(stacked.s13), swizzled(stacked.s2)
    xq, xs = quantize_rows_nvfp4(x, tiles.row_source, tiles.row_weight, tiles.tile_group, stacked.a13, d, tile_n)
    alpha13 = stacked.a13[:, None] * stacked.g13
    h = blockscaled_matmul(stacked.w13, s13, xq, xs, alpha13, tiles.tile_group, 2 * i, d, e, i, tile_n)
    identity = torch.arange(h.shape[0], dtype=torch.int32, device=x.device)
    rows = torch.where(tiles.row_source >= 0, identity, -1)
    hq, hs = quantize_rows_nvfp4(h, rows, tiles.row_weight, tiles.tile_group, stacked.a2, i, tile_n,
                                 gated=True, swiglu_limit=swiglu_limit)
    alpha2 = (stacked.a2 * stacked.g2)[:, None].expand(e, 2).contiguous()
    y = blockscaled_matmul(stacked.w2, s2, hq, hs, alpha2, tiles.tile_group, d, i, e, d, tile_n)
    out = torch.zeros(t * k + 1, d, dtype=torch.float32, device=x.device)
    out.index_copy_(0, tiles.row_slot, y)  # padding rows all land on the discarded row t*k
    return slot_outputs(out[: t * k], t, k, sum_slots)
