"""DeepSeek-V4 split across ranks with torch.distributed (gloo on CPU, NCCL on GPUs): the reference
model (backend.model) with each rank holding its share of the weights.

Sharding plan, for `world` ranks (rank r):
- Routed experts: expert parallel, expert e on rank e % world. Every rank routes every token
  (the gate is replicated), runs its own experts on the tokens that picked them, and one
  all-reduce sums the experts' outputs; rank 0 adds the shared expert.
- Attention: head parallel. Rank r keeps heads [r*H/world, (r+1)*H/world) of wq_b and attn_sink,
  the o_groups/world output groups those heads feed (their wo_a rows), and the matching wo_b
  columns (row-parallel): an all-reduce sums the partial wo_b outputs. wq_a, wkv, the compressors
  and the norms are replicated (MQA: one K=V head for all).
- Lightning indexer: index heads split the same way (its wq_b rows, weights_proj rows); the
  per-head scores are all-reduced before top-k, so every rank selects the same entries.
- Embedding and head: vocab parallel. Each rank keeps vocab/world rows; embedding lookups
  outside a rank's rows give zeros and an all-reduce completes them; head logits are all-gathered.
- Each rank takes only its slices of the checkpoint's tensors (views of the memory-mapped shards,
  so pages of other ranks' experts and heads are never read).

Collectives change the order of some fp32 sums, so results equal the single-process model up to
rounding (tests/engine/test_parallel.py: identical greedy tokens with gloo, 2 and 4 ranks).
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from kernels.formats import slice_columns, slice_rows

from .config import ModelArgs
from .model import DeepseekV4

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def shard_weights(args: ModelArgs, weights: dict, rank: int, world: int) -> dict:
    """The tensors rank `rank` holds (see the module docstring)."""
    h, g, ih = args.num_attention_heads, args.o_groups, args.index_n_heads
    for name, value in (("num_attention_heads", h), ("o_groups", g), ("index_n_heads", ih),
                        ("vocab_size", args.vocab_size)):
        if value % world:
            raise ValueError(f"{name} = {value} is not divisible by the {world} ranks")
    hd, r_, idim = args.head_dim, args.o_lora_rank, args.index_head_dim
    share = lambda n: (rank * n // world, (rank + 1) * n // world)
    out = {}
    for name, w in weights.items():
        m = _EXPERT.search(name)
        if m:
            if int(m.group(1)) % world == rank:
                out[name] = w
        elif name.endswith("attn.wq_b"):
            out[name] = slice_rows(w, *(s * hd for s in share(h)))
        elif name.endswith("attn.attn_sink"):
            out[name] = w[slice(*share(h))]
        elif name.endswith("attn.wo_a"):
            out[name] = slice_rows(w, *(s * r_ for s in share(g)))
        elif name.endswith("attn.wo_b"):
            out[name] = slice_columns(w, *(s * r_ for s in share(g)))
        elif name.endswith("indexer.wq_b"):
            out[name] = slice_rows(w, *(s * idim for s in share(ih)))
        elif name.endswith("indexer.weights_proj.weight"):
            out[name] = w[slice(*share(ih))]
        elif name in ("embed.weight", "head.weight"):
            out[name] = w[slice(*share(args.vocab_size))]
        else:
            out[name] = w
    return out


class DeepseekV4Parallel(DeepseekV4):
    """One rank of the model. Call forward on every rank with the same inputs; every rank gets
    the full logits. The reference model's code runs unchanged on the rank's share: it reads head
    counts from the weights' shapes and calls the hooks below where parts meet."""

    def __init__(self, args: ModelArgs, weights: dict, rank: int, world: int, group=None,
                 simulate_qat: bool = False, device="cpu"):
        self.rank, self.world, self.group = rank, world, group
        super().__init__(args, shard_weights(args, weights, rank, world), simulate_qat=simulate_qat, device=device)
        self.vocab_start = rank * args.vocab_size // world
        self.holds_shared_expert = rank == 0

    def holds_expert(self, e: int) -> bool:
        return e % self.world == self.rank

    def reduce_partial(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        return t

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.w["embed.weight"]
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < table.shape[0])
        return self.reduce_partial((table[local.clamp(0, table.shape[0] - 1)] * inside.unsqueeze(-1)).to(self.dtype))

    def logits(self, h: torch.Tensor, prefix: str = "") -> torch.Tensor:
        local = super().logits(h, prefix).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)
