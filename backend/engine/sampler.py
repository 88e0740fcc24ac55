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


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One sampled sequence's next token (a 0-dim device tensor); logits [V] fp32, banned ids masked."""
    logits = _filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    # Exponential race: argmax(p / E), E ~ Exp(1), draws from p (the Gumbel-max trick).
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list, banned: list[list[int]]) -> list[int]:
    """logits: [B, V] -> B token ids; one host sync for the whole batch. `banned[b]`: ids masked out
    of row b (min_tokens). Greedy rows take one batched argmax; only sampled rows run one by one
    (each on its own generator, so a seed gives the same tokens in any batch)."""
    logits = logits.float()
    masked = [(b, t) for b, ids in enumerate(banned) for t in ids]
    if masked:  # one host-to-device copy for the whole batch
        rows, cols = torch.tensor(masked, device=logits.device).T
        logits = logits.index_put((rows, cols), torch.tensor(float("-inf"), device=logits.device))
    tokens = logits.argmax(-1)
    sampled = [b for b, p in enumerate(params) if p.temperature != 0]
    if sampled:
        tokens = tokens.clone()
        for b in sampled:
            tokens[b] = sample_row(logits[b], params[b], generators[b])
    return tokens.tolist()
