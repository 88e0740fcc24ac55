"""The engine on the kernel runners with decode graphs (marker gpu): steps queued before the
previous step's tokens are read give the tokens of the same graphs replayed one step at a time."""
import threading

import pytest
import torch

from backend.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.gpu


def test_overlapped_engine_steps_give_the_tokens_of_one_step_at_a_time(make_checkpoint):
    """Three greedy requests of different prompt lengths (their prompts ride in the decode steps)
    through the engine, which feeds each step the tokens the previous one sampled on the device;
    then the same steps replayed here one at a time, reading every token back before the next:
    the same tokens, bit for bit (the same graphs, rows and slots)."""
    engine = LLMEngine(EngineConfig(checkpoint=str(make_checkpoint("nvidia-nvfp4")), device="cuda", max_num_seqs=4,
                                    max_model_len=128, compile_attention=False))
    vocab, n_out = engine.runner.args.vocab_size, 12
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (3, 9, 17)]
    results, done = [[] for _ in prompts], threading.Semaphore(0)

    def collect(i):
        def on_output(out):
            results[i] += out.token_ids
            if out.finished:
                done.release()
        return on_output
    for i, prompt in enumerate(prompts):  # queued before the loop starts: they all join the first step
        engine.add_request(prompt, SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True), collect(i))
    engine.start()
    try:
        for _ in prompts:
            assert done.acquire(timeout=600)
    finally:
        engine.shutdown()

    runner = engine.runner
    runner.state.reset(torch.tensor([0, 1, 2], device="cuda"))
    expected = [[] for _ in prompts]
    for step in range(max(len(p) for p in prompts) + n_out - 1):
        rows = [i for i, p in enumerate(prompts) if step <= len(p) + n_out - 2]
        tokens = [prompts[i][step] if step < len(prompts[i]) else expected[i][-1] for i in rows]
        logits = runner.graphs.run(tokens, [step] * len(rows), rows)
        for row, i in enumerate(rows):
            if step >= len(prompts[i]) - 1:
                expected[i].append(int(logits[row].float().argmax()))
    assert results == expected
