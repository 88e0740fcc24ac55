"""MoE routing and dispatch on the device, CUDA-graph safe: static shapes, no host syncs.

`route_topk` / `route_hash` turn gate logits into (weights, expert ids) per token; `dispatch` sorts
the (token, k) slots by expert so each active expert owns a contiguous run, and lists the active
experts; every buffer is sized by the worst case (tokens x top-k) and nothing is read back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sqrtsoftplus(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits.float()).sqrt()


def route_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, scale: float):
    """Score routing: experts = top-k of (scores + bias); weights = scores of those experts,
    normalized to sum 1, times `scale`. logits: [T, E] -> weights fp32 [T, k], experts int64 [T, k]."""
    scores = sqrtsoftplus(logits)
    experts = (scores + bias.float()).topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    return weights / weights.sum(-1, keepdim=True) * scale, experts


def route_hash(logits: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor, scale: float):
    """Hash routing: experts fixed per token id (tid2eid [V, k]); weights from the scores as above."""
    scores = sqrtsoftplus(logits)
    experts = tid2eid[input_ids.reshape(-1)].long()
    weights = scores.gather(1, experts)
    return weights / weights.sum(-1, keepdim=True) * scale, experts


@dataclass
class Dispatch:
    """Slots (token * k + j) grouped by expert, and the active experts, all on the device.

    sorted_slots:   int32 [T*k]    slots ordered by expert (stable: by token within an expert)
    active_experts: int32 [A]      the distinct experts in ascending order; -1 past num_active
    active_start:   int32 [A + 1]  run start of each active expert in sorted_slots; T*k past the end
    num_active:     int32 [1]
    A = min(num_experts, T*k): the most experts that can be active.
    """
    sorted_slots: torch.Tensor
    active_experts: torch.Tensor
    active_start: torch.Tensor
    num_active: torch.Tensor


def max_active_experts(num_tokens: int, top_k: int, num_experts: int) -> int:
    return min(num_experts, num_tokens * top_k)


def dispatch(experts: torch.Tensor, num_experts: int) -> Dispatch:
    """experts: [T, k] expert ids -> Dispatch. Graph safe (sort, cumsum, scatter; static sizes)."""
    flat = experts.reshape(-1)
    n = flat.numel()
    a = max_active_experts(experts.shape[0], experts.shape[1], num_experts)
    sorted_ids, order = torch.sort(flat, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    rank = torch.cumsum(first.to(torch.int64), 0) - 1                   # active index of each slot
    active_experts = torch.full((a + 1,), -1, dtype=torch.int64, device=flat.device)
    active_experts.scatter_(0, torch.where(first, rank, a), sorted_ids)  # non-first slots write the spare entry
    active_start = torch.full((a + 2,), n, dtype=torch.int64, device=flat.device)
    active_start.scatter_(0, torch.where(first, rank, a + 1), torch.arange(n, device=flat.device))
    return Dispatch(order.to(torch.int32), active_experts[:a].to(torch.int32),
                    active_start[:a + 1].to(torch.int32), (rank[-1:] + 1).to(torch.int32))
