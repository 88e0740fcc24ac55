"""The batched sampler: greedy and banned ids, the same tokens for a seeded row in any batch, and
the distribution it draws from against a hand-written reference (temperature, top-k, top-p)."""
import math

import pytest
import torch

from backend.engine import SamplingParams
from backend.engine.sampler import race_argmax_ref, race_key, race_uniforms, sample


def test_greedy_rows_banned_ids_and_a_seeded_row_draws_the_same_in_any_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    logits[:, 7] = 10.0  # every row's best, banned in rows 0 and 2
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.0, top_p=0.9)]
    banned = [[7, 3], [], [7], []]
    batch = sample(logits, params, [0, 0, 1, 2], [0, 0, 3, 4], banned).tolist()
    assert batch[0] == int(logits[0].index_fill(0, torch.tensor([7, 3]), float("-inf")).argmax())
    assert batch[1] == 7 and batch[2] != 7
    for b, seed, counter in ((2, 1, 3), (3, 2, 4)):  # alone, and at another row of another batch
        assert sample(logits[b:b + 1], [params[b]], [seed], [counter], [banned[b]]).tolist() == [batch[b]]
        other = torch.cat([logits[b:b + 1], torch.randn(2, 50, generator=g)]).flip(0)
        rows = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0.0), params[b]]
        assert sample(other, rows, [9, 0, seed], [0, 0, counter], [[], [], banned[b]]).tolist()[2] == batch[b]


def test_race_uniforms_depend_on_seed_counter_and_token_only():
    ids = torch.arange(1000).expand(3, 1000)
    keys = torch.tensor([race_key(5, 0), race_key(5, 1), race_key(2**62 + 5, 0)])
    u = race_uniforms(keys, ids)
    assert u.dtype == torch.float32 and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.005
    for a, b in ((0, 1), (0, 2)):  # another counter, another seed (its high bits only): other draws
        assert (u[a] == u[b]).float().mean() < 0.01
    assert torch.equal(race_uniforms(keys[1:2], ids[:1, 500:]), u[1:2, 500:])
    assert race_key(5, 1) == race_key(5, 1) != race_key(5, 2)


def test_race_picks_the_best_score_hand_computed():
    """The race worked out by hand from the uniforms: token v scores logit_v - log(-log(u_v)) and
    the larger wins; columns hold any token ids (sorted rows), or column v is token v (None)."""
    key = torch.tensor([race_key(7, 3)])
    logits = torch.tensor([[0.3, -0.4]])
    for ids in (torch.tensor([[41, 9]]), None):
        tokens = torch.tensor([[0, 1]]) if ids is None else ids
        u = race_uniforms(key, tokens)[0].tolist()
        scores = [0.3 - math.log(-math.log(u[0])), -0.4 - math.log(-math.log(u[1]))]
        winner = tokens[0, 0 if scores[0] > scores[1] else 1].item()
        assert race_argmax_ref(logits, ids, key).tolist() == [winner]


def _reference_probs(logits, temperature, top_k, top_p):
    """By hand: softmax(logits / t); keep the top_k most likely; then the smallest prefix (most
    likely first) of the renormalised top-k distribution whose mass reaches top_p."""
    scaled = [v / temperature for v in logits]
    order = sorted(range(len(logits)), key=lambda i: -scaled[i])
    keep = order[:top_k] if top_k > 0 else order
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = {i: math.exp(scaled[i]) / z for i in keep}
    kept, mass = [], 0.0
    for i in keep:
        if mass >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    z = sum(probs[i] for i in kept)
    return [probs[i] / z if i in kept else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0),
                                                       (1.0, 0, 0.8), (0.9, 5, 0.7), (1.0, 1, 1.0)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
    logits = [2.0, 1.5, 1.4, 0.3, -0.2, 0.9, -1.0, 0.0]
    expected = _reference_probs(logits, temperature, top_k, top_p)
    draws = 40_000  # one sequence's first 40k draws, as rows of one batch
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * draws
    tokens = sample(torch.tensor([logits]).expand(draws, -1), params, [1234] * draws, list(range(draws)),
                    [[]] * draws)
    freq = torch.bincount(tokens, minlength=len(logits)).double() / draws
    for v, p in enumerate(expected):
        if p == 0.0:
            assert freq[v] == 0, (v, freq.tolist())
        else:  # 5 standard deviations of a binomial proportion
            assert abs(freq[v] - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-9, (v, freq[v].item(), p)
