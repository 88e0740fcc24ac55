"""Causal self-consistency of the reference model (no outside reference needed).

Logits at position p must not depend on how the tokens got there: one prefill of p+1 tokens, a
prefill of a longer sequence, or a shorter prefill followed by decode steps (fp32, simulate_qat
off: <= 1e-5 relative). With simulate_qat on, fp32 GEMMs differ by ~1e-7 between batch shapes, so
an element on a rounding midpoint may quantize one step apart: in float64 the paths must agree
exactly, and in fp32 such flips must stay rare, isolated events."""
import pytest
import torch

from backend.checkpoint import load_checkpoint
from backend.model import DeepseekV4
from backend.synthetic import FLAVORS

MIXES = {
    "swa": dict(num_hidden_layers=2, compress_ratios=[0, 0, 0], num_hash_layers=1),
    "csa": dict(num_hidden_layers=2, compress_ratios=[4, 4, 0], num_hash_layers=1),
    "hca": dict(num_hidden_layers=2, compress_ratios=[16, 16, 0], num_hash_layers=1),
    "mixed": dict(),
}
TOTAL = 48
BOUND = 1e-5


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _tokens(vocab, n=TOTAL, seed=1):
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _decode_path(model, ids, prefill_len, slot=0, state=None):
    """Prefill `prefill_len` tokens, then decode the rest one by one: logits per position."""
    state = state or model.new_state(2, 128)
    state.reset([slot])
    out = [model.forward(ids[:, :prefill_len], 0, [slot], state)[0][0]]
    for p in range(prefill_len, ids.shape[1]):
        out.append(model.forward(ids[:, p:p + 1], p, [slot], state)[0][0])
    return torch.stack(out), state


@pytest.mark.parametrize("prefill_len", [16, 21])  # aligned with ratios 4 and 16, and not
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_prefill_and_decode_agree_without_qat(make_checkpoint, flavor, mix, prefill_len):
    ck = load_checkpoint(make_checkpoint(flavor, **MIXES[mix]))
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=False)
    ids = _tokens(ck.args.vocab_size)
    full = model.forward(ids, 0, [0], model.new_state(1, 128), all_logits=True)[0][0]
    decoded, _ = _decode_path(model, ids, prefill_len)
    for i, p in enumerate(range(prefill_len - 1, TOTAL)):
        assert rel(decoded[i], full[p]) <= BOUND, f"position {p}: decode path vs long prefill"
    for p in (prefill_len - 1, 30, TOTAL - 1):  # a prefill ending exactly at p
        short = model.forward(ids[:, :p + 1], 0, [1], model.new_state(2, 128))[0][0]
        assert rel(short, full[p]) <= BOUND, f"position {p}: short prefill vs long prefill"


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_qat_paths_agree_exactly_in_float64(make_checkpoint, flavor, mix):
    """With QAT on, prefill and decode are the same function: in float64 (where batch shape cannot
    move a value across a rounding midpoint) they agree to rounding error."""
    ck = load_checkpoint(make_checkpoint(flavor, **MIXES[mix]))
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=True, dtype=torch.float64)
    ids = _tokens(ck.args.vocab_size)
    full = model.forward(ids, 0, [0], model.new_state(1, 128), all_logits=True)[0][0]
    decoded, _ = _decode_path(model, ids, 16)
    for i, p in enumerate(range(15, TOTAL)):
        assert rel(decoded[i], full[p]) <= 1e-10, f"position {p}"


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_qat_fp32_midpoint_flips_stay_isolated(make_checkpoint, flavor, mix):
    """In fp32 a midpoint flip is a rare event (an onset). Without compressed layers its effect
    leaves with the sliding window; a flip that reaches a compressed entry stays with it (entries
    are kept for the whole sequence), so there only the number of onsets is bounded."""
    ck = load_checkpoint(make_checkpoint(flavor, **MIXES[mix]))
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=True)
    ids = _tokens(ck.args.vocab_size)
    full = model.forward(ids, 0, [0], model.new_state(1, 128), all_logits=True)[0][0]
    decoded, _ = _decode_path(model, ids, 16)
    jumped = [rel(decoded[i], full[p]) > BOUND for i, p in enumerate(range(15, TOTAL))]
    onsets = sum(j and (i == 0 or not jumped[i - 1]) for i, j in enumerate(jumped))
    assert onsets <= 3, f"{onsets} separate jumps in {len(jumped)} positions"
    if all(r == 0 for r in ck.args.compress_ratios):
        assert sum(jumped) <= onsets * ck.args.sliding_window
    assert max(rel(decoded[i], full[p]) for i, p in enumerate(range(15, TOTAL))) < 0.25


def test_new_sequence_in_a_used_slot_starts_clean(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=False)
    first, second = _tokens(ck.args.vocab_size, 30, seed=2), _tokens(ck.args.vocab_size, 23, seed=3)
    state = model.new_state(2, 128)
    _decode_path(model, first, 10, slot=1, state=state)          # leaves windows half full
    reused, _ = _decode_path(model, second, 3, slot=1, state=state)  # a 1-3 token prompt pools leftovers if not reset
    fresh, _ = _decode_path(model, second, 3, slot=1, state=model.new_state(2, 128))
    assert torch.equal(reused, fresh)


def test_slots_do_not_interfere(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=True)
    ids = _tokens(ck.args.vocab_size, 24, seed=4)
    alone, _ = _decode_path(model, ids, 5, slot=0)
    state = model.new_state(2, 128)
    other = _tokens(ck.args.vocab_size, 24, seed=5)
    _decode_path(model, other, 20, slot=1, state=state)
    beside, _ = _decode_path(model, ids, 5, slot=0, state=state)
    assert torch.equal(alone, beside)


def test_a_batched_prefill_takes_one_start_for_all_rows_or_one_per_row(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=False)
    ids = torch.cat([_tokens(ck.args.vocab_size, 9, seed=s) for s in (6, 7)])
    shared, _ = model.forward(ids, 0, [0, 1], model.new_state(2, 64))
    per_row, _ = model.forward(ids, [0, 0], [0, 1], model.new_state(2, 64))
    assert torch.equal(shared, per_row)
    with pytest.raises(ValueError, match="start_pos has 3 entries for 2 sequences"):
        model.forward(ids, [0, 0, 0], [0, 1], model.new_state(2, 64))
