"""The runner model's pieces that run anywhere: expert stacking from a checkpoint, the graph-safe
entry write, and the model itself on the CPU (where kernels.dispatch falls back to the twins)."""
import torch

from backend.checkpoint import load_checkpoint
from backend.gpu_model import DeepseekV4Gpu, split_experts
from backend.model import CompressorState, write_entries_decode, write_entries_emitting
from kernels.moe import unstack


def test_split_experts_stacks_every_layer_bit_for_bit(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    rest, stacks = split_experts(ck.weights)
    a = ck.args
    assert sorted(stacks) == sorted([f"layers.{i}.ffn." for i in range(a.num_hidden_layers)] +
                                    [f"mtp.{i}.ffn." for i in range(a.num_nextn_predict_layers)])
    assert not any(".experts." in n for n in rest)
    w1, w2, w3 = unstack(stacks["layers.1.ffn."], 5)
    assert torch.equal(w2.weight, ck.weights["layers.1.ffn.experts.5.w2"].weight.view(torch.uint8))
    assert torch.equal(w3.weight_scale.view(torch.uint8), ck.weights["layers.1.ffn.experts.5.w3"].weight_scale.view(torch.uint8))


def test_decode_entry_write_equals_the_emitting_tokens_write():
    """The graph-safe decode write (masked, every sequence writes) stores what the prefill write
    (only the tokens that close a window) does."""
    g = torch.Generator().manual_seed(0)
    for ratio in (4, 16):
        st = CompressorState.allocate(6, ratio, 8, 64, "cpu", torch.float32)
        st.entries.copy_(torch.randn(st.entries.shape, generator=g))
        ref = CompressorState(st.kv, st.score, st.entries.clone())
        slots = torch.tensor([4, 0, 2, 5])
        pos = torch.tensor([[3], [15], [30], [2]])  # emits for (p + 1) % ratio == 0 only
        entry = torch.randn(4, 1, 8, generator=g)
        write_entries_emitting(ref, slots, pos, entry, ratio)
        write_entries_decode(st, slots, pos, entry, ratio)
        assert torch.equal(st.entries, ref.entries)


def test_runner_model_runs_on_the_cpu_twins(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    model = DeepseekV4Gpu(ck.args, ck.weights, simulate_qat=True, device="cpu")
    state = model.new_state(2, 64, with_mtp=False)
    logits, _ = model.forward(torch.randint(2, 500, (1, 9), generator=torch.Generator().manual_seed(1)), 0, [1], state)
    for step in range(3):
        logits, _ = model.forward(logits.argmax(-1, keepdim=True), torch.tensor([9 + step]), torch.tensor([1]), state)
    assert logits.shape == (1, ck.args.vocab_size) and torch.isfinite(logits).all()


def test_reference_wo_a_quantizes_its_input_only_where_the_runner_does(make_checkpoint):
    """Under simulate_qat the reference FP8-rounds wo_a's input for an FP8 weight (the FP8 runner
    quantizes activations) and not for an NVFP4 one (the W4A16 runner takes them as they are)."""
    from backend.model import DeepseekV4
    from kernels.formats import Fp8BlockWeight, Nvfp4Weight, fp8_qdq
    for flavor, kind, rounding in (("nvidia-nvfp4", Fp8BlockWeight, fp8_qdq), ("all-nvfp4", Nvfp4Weight, lambda o: o)):
        ck = load_checkpoint(make_checkpoint(flavor))
        model = DeepseekV4(ck.args, ck.weights, simulate_qat=True)
        w = ck.weights["layers.0.attn.wo_a"]
        assert isinstance(w, kind)
        g = ck.args.o_groups
        o = torch.randn(2, 3, g, w.shape[1], generator=torch.Generator().manual_seed(5))
        expected = torch.einsum("bsgd,grd->bsgr", rounding(o), w.dequantize().unflatten(0, (g, -1)))
        assert torch.equal(model.grouped_linear(o, "layers.0.attn.wo_a"), expected)
