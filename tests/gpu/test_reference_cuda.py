"""The reference model and the engine on a CUDA device (marker gpu): same results as on the CPU."""
import pytest
import torch

from backend.checkpoint import load_checkpoint
from backend.engine import EngineConfig, LLMEngine, SamplingParams
from backend.model import DeepseekV4

pytestmark = pytest.mark.gpu


def test_reference_model_on_cuda_matches_cpu(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    ids = torch.randint(2, ck.args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    outs = []
    for device in ("cpu", "cuda"):
        model = DeepseekV4(ck.args, ck.weights, simulate_qat=False, device=device)
        state = model.new_state(1, 64)
        logits, _ = model.forward(ids, 0, [0], state, all_logits=True)
        steps = [model.forward(torch.tensor([[5 + i]]), 40 + i, [0], state)[0] for i in range(8)]
        outs.append(torch.cat([logits[0], *steps]).cpu())
    cpu, gpu = outs
    assert ((gpu - cpu).abs().max() / cpu.abs().max()) <= 1e-4


def test_engine_on_cuda_generates_the_cpu_tokens(make_checkpoint):
    path = str(make_checkpoint("nvidia-nvfp4"))
    results = []
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(checkpoint=path, device=device, max_num_seqs=4, max_model_len=128,
                                        kernels=False))  # the reference model on both devices
        engine.start()
        try:
            results.append([engine.generate("The quick brown fox " * n, SamplingParams(max_tokens=12))["token_ids"]
                            for n in (1, 3)])
        finally:
            engine.shutdown()
    assert results[0] == results[1]
