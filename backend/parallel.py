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

import dataclasses
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.formats import Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight

from .config import ModelArgs
from .model import DeepseekV4, apply_rope, fp4_qdq, stable_topk_mask, wide, INDEXER_QAT_BLOCK

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def rows(w, start: int, stop: int):
    """Rows start:stop of a weight in any format (views; block scales follow)."""
    if isinstance(w, Fp8BlockWeight):
        return Fp8BlockWeight(w.weight[start:stop], w.scale[start // 128:-(-stop // 128)])
    if isinstance(w, Nvfp4Weight):
        return Nvfp4Weight(w.weight[start:stop], w.weight_scale[start:stop], w.weight_scale_2, w.input_scale)
    if isinstance(w, Mxfp4Weight):
        return Mxfp4Weight(w.weight[start:stop], w.scale[start:stop])
    return w[start:stop]


def columns(w, start: int, stop: int):
    """Input columns start:stop of a weight (multiples of its scale block)."""
    if isinstance(w, Fp8BlockWeight):
        return Fp8BlockWeight(w.weight[:, start:stop], w.scale[:, start // 128:-(-stop // 128)])
    if isinstance(w, Nvfp4Weight):
        return Nvfp4Weight(w.weight[:, start // 2:stop // 2], w.weight_scale[:, start // 16:stop // 16],
                           w.weight_scale_2, w.input_scale)
    if isinstance(w, Mxfp4Weight):
        return Mxfp4Weight(w.weight[:, start // 2:stop // 2], w.scale[:, start // 32:stop // 32])
    return w[:, start:stop]


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
            out[name] = rows(w, *(s * hd for s in share(h)))
        elif name.endswith("attn.attn_sink"):
            out[name] = w[slice(*share(h))]
        elif name.endswith("attn.wo_a"):
            out[name] = rows(w, *(s * r_ for s in share(g)))
        elif name.endswith("attn.wo_b"):
            out[name] = columns(w, *(s * r_ for s in share(g)))
        elif name.endswith("indexer.wq_b"):
            out[name] = rows(w, *(s * idim for s in share(ih)))
        elif name.endswith("indexer.weights_proj.weight"):
            out[name] = w[slice(*share(ih))]
        elif name in ("embed.weight", "head.weight"):
            out[name] = w[slice(*share(args.vocab_size))]
        else:
            out[name] = w
    return out


class DeepseekV4Parallel(DeepseekV4):
    """One rank of the model. Call forward on every rank with the same inputs; every rank gets
    the full logits."""

    def __init__(self, args: ModelArgs, weights: dict, rank: int, world: int, group=None,
                 simulate_qat: bool = False, device="cpu"):
        self.global_args, self.rank, self.world, self.group = args, rank, world, group
        local = dataclasses.replace(args, num_attention_heads=args.num_attention_heads // world,
                                    o_groups=args.o_groups // world, index_n_heads=args.index_n_heads // world)
        super().__init__(local, shard_weights(args, weights, rank, world), simulate_qat=simulate_qat, device=device)
        self.vocab_start = rank * args.vocab_size // world

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def attention(self, prefix, layer, x, pos, slots, st):
        return self.all_reduce(super().attention(prefix, layer, x, pos, slots, st))

    def indexer(self, prefix: str, x, qr, pos, slots, st) -> torch.Tensor:
        """As the reference, with this rank's heads; scores summed over all ranks' heads."""
        a, heads = self.args, self.global_args.index_n_heads
        q = self.linear(qr, f"{prefix}wq_b").unflatten(-1, (a.index_n_heads, a.index_head_dim))
        q = apply_rope(q, pos, self.freqs[True], a.qk_rope_head_dim)
        if self.simulate_qat:
            q = fp4_qdq(q @ self._hadamard, INDEXER_QAT_BLOCK)
        self.compress(f"{prefix}compressor.", x, pos, slots, st, 4, a.index_head_dim, rotate=True)
        keys = st.entries[slots]
        weights = self.plain_linear(x, f"{prefix}weights_proj.weight") * (a.index_head_dim ** -0.5 * heads ** -0.5)
        scores = torch.einsum("bshd,bcd->bshc", wide(q), wide(keys)).relu()
        scores = self.all_reduce((scores * weights.unsqueeze(-1)).sum(2).contiguous())
        valid = torch.arange(keys.shape[1], device=x.device) < ((pos + 1) // 4).unsqueeze(-1)
        scores = scores.masked_fill(~valid, float("-inf"))
        return stable_topk_mask(scores, min(a.index_topk, keys.shape[1]))

    def moe(self, prefix: str, x: torch.Tensor, input_ids: torch.Tensor, hashed: bool) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(f"{prefix}ffn.", x, input_ids.reshape(-1), hashed)
        y = torch.zeros(x.shape, dtype=wide(x).dtype, device=x.device)
        for e in experts.unique().tolist():
            if e % self.world != self.rank:
                continue
            token, k = torch.where(experts == e)
            y.index_add_(0, token, self.expert(x[token], f"{prefix}ffn.experts.{e}.",
                                               weights[token, k, None], clamp=True).to(y.dtype))
        if self.rank == 0:
            y += self.expert(x, f"{prefix}ffn.shared_experts.", None, clamp=False).to(y.dtype)
        return self.all_reduce(y).to(x.dtype).view(shape)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.w["embed.weight"]
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < table.shape[0])
        h = table[local.clamp(0, table.shape[0] - 1)] * inside.unsqueeze(-1)
        return self.all_reduce(h.to(self.dtype).contiguous())

    def logits(self, h: torch.Tensor, prefix: str = "") -> torch.Tensor:
        local = super().logits(h, prefix).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)
