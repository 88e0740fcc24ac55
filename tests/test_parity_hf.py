"""Parity with HF transformers' DeepseekV4ForCausalLM (simulate_qat off, fp32, same weights).

Two sequences of different lengths are prefilled into their own slots, then decoded together in
one batch for 40 steps; each is compared with HF running that sequence alone. Prompts of 40+
tokens with decode to 85+ cross many sliding-window wraps (window 8), CSA compressions (ratio 4)
and HCA compressions (ratio 16 in the tiny configs)."""
import pytest
import torch
import transformers

from backend.checkpoint import load_checkpoint
from backend.model import DeepseekV4
from backend.synthetic import FLAVORS
from tests.hf_reference import build_hf_model

transformers.logging.set_verbosity_error()

CONFIGS = {
    "mixed-topk-below": dict(),                 # [SWA, CSA, HCA, CSA]; index_topk 8 < entries (up to 21)
    "mixed-topk-above": dict(index_topk=64),    # every compressed entry selected
    "swa-only": dict(num_hidden_layers=2, compress_ratios=[0, 0, 0], num_hash_layers=1),
    "csa-only": dict(num_hidden_layers=2, compress_ratios=[4, 4, 0], num_hash_layers=1),
    "hca-only": dict(num_hidden_layers=2, compress_ratios=[16, 16, 0], num_hash_layers=1),
}
PROMPT_LENS = (40, 45)
DECODE_STEPS = 40
BOUND = 1e-4  # max|ours - HF| / max|HF| on logits


def rel(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_matches_hf(make_checkpoint, flavor, config):
    ck = load_checkpoint(make_checkpoint(flavor, **CONFIGS[config]))
    hf = build_hf_model(ck.args, ck.weights)
    ours = DeepseekV4(ck.args, ck.weights, simulate_qat=False)
    state = ours.new_state(num_slots=3, max_len=128)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, ck.args.vocab_size, (1, n), generator=gen) for n in PROMPT_LENS]
    slots = [2, 0]  # not 0..B-1 on purpose

    hf_caches, next_tokens = [], []
    for prompt, slot in zip(prompts, slots):
        with torch.no_grad():
            out = hf(prompt, use_cache=True)
        logits, _ = ours.forward(prompt, 0, [slot], state, all_logits=True)
        assert rel(logits[0], out.logits[0]) <= BOUND, "prefill"
        assert torch.equal(logits[0].argmax(-1), out.logits[0].argmax(-1))
        hf_caches.append(out.past_key_values)
        next_tokens.append(out.logits[0, -1].argmax())

    positions = torch.tensor(PROMPT_LENS)
    for step in range(DECODE_STEPS):
        tokens = torch.stack(next_tokens).view(-1, 1)
        logits, _ = ours.forward(tokens, positions + step, slots, state)
        for b in range(len(prompts)):
            with torch.no_grad():
                out = hf(tokens[b:b + 1], past_key_values=hf_caches[b], use_cache=True)
            hf_caches[b] = out.past_key_values
            ref = out.logits[0, -1]
            assert rel(logits[b], ref) <= BOUND, f"decode step {step}, sequence {b}"
            assert logits[b].argmax() == ref.argmax(), f"greedy token, step {step}, sequence {b}"
            next_tokens[b] = ref.argmax()


def test_rope_frequencies_match_hf(make_checkpoint):
    from backend.model import rope_inv_freq
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    rotary = build_hf_model(ck.args, ck.weights).model.rotary_emb
    assert torch.equal(rotary.main_inv_freq, rope_inv_freq(ck.args, compressed=False))
    assert torch.allclose(rotary.compress_inv_freq, rope_inv_freq(ck.args, compressed=True), rtol=1e-6)
    assert rotary.compress_attention_scaling == 1.0
