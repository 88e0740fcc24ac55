"""The batched sampler on the GPU (marker gpu): the same uniforms and tokens as on the CPU for a
seeded batch, and no wait for the device's queued work."""
import time

import pytest
import torch

from backend.engine import SamplingParams
from backend.engine.sampler import race_argmax, race_argmax_ref, race_key, race_uniforms, sample

pytestmark = pytest.mark.gpu


def test_race_kernel_matches_its_twin():
    g = torch.Generator().manual_seed(1)
    keys = torch.tensor([race_key(3, 0), race_key(2**62 + 1, 77), race_key(5, 5)])
    ids = torch.arange(129280).expand(3, -1)
    assert torch.equal(race_uniforms(keys.cuda(), ids.cuda()).cpu(), race_uniforms(keys, ids))
    logits = torch.randn(3, 129280, generator=g) * 3
    logits[1, ::2] = float("-inf")  # excluded ids
    for token_ids in (None, torch.randperm(129280, generator=g).expand(3, -1).contiguous()):
        ref = race_argmax_ref(logits, token_ids, keys)
        out = race_argmax(logits.cuda(), None if token_ids is None else token_ids.cuda(), keys.cuda())
        assert out.tolist() == ref.tolist()
        if token_ids is None:
            assert out[1].item() % 2 == 1  # never an excluded id


def test_seeded_draws_match_the_cpu():
    logits = torch.randn(6, 129280, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.2, top_k=40),
              SamplingParams(temperature=0.7, top_k=100, top_p=0.8), SamplingParams(temperature=1.0)]
    args = ([11, 12, 13, 14, 15, 16], [0, 1, 2, 3, 4, 5], [[], [5], [], [], [9], []])
    assert sample(logits.cuda(), params, *args).tolist() == sample(logits, params, *args).tolist()


def test_sampling_does_not_wait_for_queued_work():
    logits = torch.randn(8, 129280, device="cuda")
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * 8
    sample(logits, params, list(range(8)), [0] * 8, [[1]] * 8)  # warm up
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of queued GPU work
    start = time.perf_counter()
    tokens = sample(logits, params, list(range(8)), [0] * 8, [[1]] * 8)
    assert time.perf_counter() - start < 0.1  # queued behind the sleep, not waiting for it
    torch.cuda.synchronize()
    assert tokens.shape == (8,) and 1 not in tokens.tolist()
