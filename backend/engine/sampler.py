"""Sampling on the device: greedy, temperature, top-k, top-p, for the whole batch at once (a fixed
number of kernels however many rows sample). Nothing here waits for the device: the tokens stay
there until the engine reads them (`SampledTokens`).

Randomness is counter-based: the race of token v in a sequence's n-th draw uses a hash of (the
sequence's seed, n, v), not a stateful generator, so a seeded request draws the same tokens in any
batch, at any row, on any device, and no per-row generator forces a loop over rows. (FlashInfer's
batched samplers mix the row index into their Philox streams, which loses exactly that property.)
"""
from __future__ import annotations

import functools

import torch

from .sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
_RACE_BLOCK = 4096


def _mix32(x):
    """A 32-bit integer hash (lowbias32: xorshift-multiply rounds) of a Python int or an int64
    tensor holding values in [0, 2^32); tensor products wrap in int64, whose low 32 bits are still
    the 32-bit products."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def race_key(seed: int, counter: int) -> int:
    """A sequence's key for its `counter`-th draw (seed in 0..2^63-1), computed on the host."""
    return _mix32(_mix32((seed & _MASK32) ^ _mix32(seed >> 32)) ^ (counter & _MASK32))


def race_uniforms(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), fp32, one per (row, token): keys int64 [R] (race_key), token_ids int64
    [R, V] -> [R, V]; a function of (seed, counter, token id) alone."""
    bits = _mix32(keys.unsqueeze(1) ^ token_ids) >> 8  # 24 bits: exact in fp32
    return (bits.float() + 0.5) * 2.0 ** -24


def race_argmax_ref(logits: torch.Tensor, token_ids: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """The exponential race, in torch (the twin of the GPU kernel): logits fp32 [R, V] (tempered,
    excluded ids at -inf; any per-row offset, as log-probabilities have, changes nothing), token ids
    of their columns [R, V] (None: column v is token v), keys [R] -> the R winning token ids:
    argmax(p_v / E_v), E_v = -log(u_v), draws v with probability p_v (the Gumbel-max trick)."""
    ids = torch.arange(logits.shape[1], device=logits.device).expand_as(logits) if token_ids is None else token_ids
    race = logits - torch.log(-torch.log(race_uniforms(keys, ids)))
    return ids.gather(1, race.argmax(-1, keepdim=True)).squeeze(1)


@functools.cache
def _race_kernel():
    import triton  # CUDA hosts only
    import triton.language as tl

    @triton.jit
    def mix32(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def race(logits, ids, keys, out, vocab, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        key = tl.load(keys + row)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_at = tl.full([BLOCK], 0, tl.int64)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            inside = cols < vocab
            x = tl.load(logits + row * vocab + cols, mask=inside, other=float("-inf"))
            if HAS_IDS:
                token = tl.load(ids + row * vocab + cols, mask=inside, other=0)
            else:
                token = cols
            u = ((mix32(key ^ token) >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
            score = tl.where(inside, x - tl.log(-tl.log(u)), float("-inf"))
            better = score > best  # strictly: each lane keeps its first best column
            best = tl.where(better, score, best)
            best_at = tl.where(better, cols, best_at)
        top = tl.max(best, 0)
        at = tl.min(tl.where(best == top, best_at, vocab), 0)  # the first column with the best score
        if HAS_IDS:
            at = tl.load(ids + row * vocab + at)
        tl.store(out + row, at)

    return race


def race_argmax(logits: torch.Tensor, token_ids: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """race_argmax_ref in one kernel launch on CUDA (a launch per tensor op made batch 1 cost
    ~1 ms of host time), the twin elsewhere."""
    if not logits.is_cuda:
        return race_argmax_ref(logits, token_ids, keys)
    logits = logits.contiguous()
    ids = logits if token_ids is None else token_ids.contiguous()  # unused when None
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    _race_kernel()[(logits.shape[0],)](logits, ids, keys, out, logits.shape[1], HAS_IDS=token_ids is not None,
                                       BLOCK=_RACE_BLOCK)
    return out


def _sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 keys: torch.Tensor, filtered: bool) -> torch.Tensor:
    """logits fp32 [R, V] (banned ids at -inf) -> R token ids drawn from each row's tempered
    distribution after top-k (the k best; ties at the k-th value in sort order; k = V: off) and
    then top-p (the smallest prefix of the top-k distribution reaching p). Per-row values are
    [R, 1] tensors; `filtered`: whether any row has top-k or top-p."""
    logits = logits / temperature
    if not filtered:
        return race_argmax(logits, None, keys)
    logits, token_ids = torch.sort(logits, dim=-1, descending=True)
    logits = logits.masked_fill(torch.arange(logits.shape[1], device=logits.device) >= top_k, float("-inf"))
    probs = logits.softmax(-1)
    logits = logits.masked_fill((probs.cumsum(-1) - probs > top_p) & (top_p < 1.0), float("-inf"))
    return race_argmax(logits, token_ids, keys)


def host_to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of `values` on `device`, copied without waiting for the device's queued work (a
    copy from pageable memory would synchronize the stream)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


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


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: list[int],
           banned: list[list[int]]) -> torch.Tensor:
    """logits: [B, V] -> B token ids on the device. Row b draws with `seeds[b]` (0..2^63-1) as its
    `counters[b]`-th draw (the number of tokens its sequence sampled before); `banned[b]`: ids masked
    out of row b (min_tokens). Greedy rows take one batched argmax; the sampled rows are drawn
    together."""
    logits = logits.float()
    masked = [(b, t) for b, ids in enumerate(banned) for t in ids]
    if masked:  # one host-to-device copy for the whole batch
        rows, cols = host_to_device(masked, logits.device).T
        logits = logits.index_put((rows, cols), torch.full((), float("-inf"), device=logits.device))
    tokens = logits.argmax(-1)
    sampled = [b for b, p in enumerate(params) if p.temperature != 0]
    if sampled:  # two host-to-device copies carry all sampled rows' values
        vocab = logits.shape[1]
        rows, keys, top_k = host_to_device(
            [sampled, [race_key(seeds[b], counters[b]) for b in sampled],
             [params[b].top_k if 0 < params[b].top_k < vocab else vocab for b in sampled]], logits.device)
        temperature, top_p = host_to_device([[params[b].temperature for b in sampled],
                                             [params[b].top_p for b in sampled]], logits.device, torch.float32)
        filtered = any(params[b].top_k > 0 or params[b].top_p < 1.0 for b in sampled)
        drawn = _sample_rows(logits[rows], temperature.unsqueeze(1), top_k.unsqueeze(1), top_p.unsqueeze(1), keys,
                             filtered)
        tokens = tokens.index_put((rows,), drawn)
    return tokens
