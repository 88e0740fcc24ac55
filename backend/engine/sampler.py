"""Sampling on the device: greedy, temperature, top-k, top-p, with a generator per sequence so a
seeded request draws the same tokens whatever else is in the batch. Nothing here waits for the
device: the tokens stay there until the engine reads them (`SampledTokens`)."""
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


def host_to_device(values: list, device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values` on `device`, copied without waiting for the device's queued work
    (a copy from pageable memory would synchronize the stream)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


class SampledTokens:
    """A step's sampled tokens on the device, with their copy to the host under way. `result()`
    waits for that copy only, so the host can launch the next step before reading these."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = tokens, None

    def result(self) -> list[int]:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list, banned: list[list[int]]) -> torch.Tensor:
    """logits: [B, V] -> B token ids on the device. `banned[b]`: ids masked out of row b
    (min_tokens). Greedy rows take one batched argmax; only sampled rows run one by one (each on
    its own generator, so a seed gives the same tokens in any batch)."""
    logits = logits.float()
    masked = [(b, t) for b, ids in enumerate(banned) for t in ids]
    if masked:  # one host-to-device copy for the whole batch
        rows, cols = host_to_device(masked, logits.device).T
        logits = logits.index_put((rows, cols), torch.full((), float("-inf"), device=logits.device))
    tokens = logits.argmax(-1)
    sampled = [b for b, p in enumerate(params) if p.temperature != 0]
    if sampled:
        tokens = tokens.clone()
        for b in sampled:
            tokens[b] = sample_row(logits[b], params[b], generators[b])
    return tokens
