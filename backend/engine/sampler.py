"""Sampling on the device: greedy, temperature, top-k, top-p, with a generator per sequence so a
seeded request draws the same tokens whatever else is in the batch."""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] (already divided by the temperature) -> logits with excluded tokens at -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               banned: list[int]) -> torch.Tensor:
    """One sequence's next token (a 0-dim device tensor). `banned`: ids masked out (min_tokens)."""
    logits = logits.float()
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
    if params.temperature == 0:
        return logits.argmax()
    logits = _filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    # Exponential race: argmax(p / E), E ~ Exp(1), draws from p (the Gumbel-max trick).
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list, banned: list[list[int]]) -> list[int]:
    """logits: [B, V] -> B token ids; one host sync for the whole batch."""
    tokens = [sample_row(logits[b], params[b], generators[b], banned[b]) for b in range(len(params))]
    return torch.stack(tokens).tolist()
