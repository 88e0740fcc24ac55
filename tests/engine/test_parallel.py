"""Expert-parallel MoE, head-parallel attention and vocab-parallel embedding/head over
torch.distributed with gloo on the CPU: 2 and 4 ranks give the single-process model's tokens."""
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backend.checkpoint import load_checkpoint
from backend.model import DeepseekV4
from backend.parallel import DeepseekV4Parallel, shard_weights

STEPS = 12


def _generate(model, prompt):
    state = model.new_state(1, 64, with_mtp=False)
    logits, _ = model.forward(prompt, 0, [0], state)
    tokens, all_logits = [], [logits]
    for step in range(STEPS):
        tokens.append(int(logits.argmax(-1)))
        logits, _ = model.forward(torch.tensor([[tokens[-1]]]), prompt.shape[1] + step, [0], state)
        all_logits.append(logits)
    return tokens, torch.cat(all_logits)


def _rank(rank, world, path, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ck = load_checkpoint(path)
        model = DeepseekV4Parallel(ck.args, ck.weights, rank, world)
        prompt = torch.randint(2, ck.args.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
        tokens, logits = _generate(model, prompt)
        if rank == 0:
            torch.save((tokens, logits), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_generate_the_single_process_tokens(world, make_checkpoint, tmp_path):
    path = make_checkpoint("nvidia-nvfp4", o_groups=4)  # every split of heads, groups, index heads, vocab
    ck = load_checkpoint(path)
    prompt = torch.randint(2, ck.args.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_logits = _generate(DeepseekV4(ck.args, ck.weights, simulate_qat=False), prompt)
    out = tmp_path / "rank0.pt"
    init = f"file://{tempfile.mktemp(dir=tmp_path)}"
    mp.start_processes(_rank, args=(world, str(path), init, str(out)), nprocs=world, join=True, start_method="spawn")
    tokens, logits = torch.load(out)
    assert tokens == ref_tokens
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() < 1e-5


def test_each_rank_holds_only_its_share(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4", o_groups=4))
    a = ck.args
    shards = [shard_weights(a, ck.weights, r, 4) for r in range(4)]
    experts = [sorted({int(n.split(".")[4]) for n in s if ".experts." in n and n.startswith("layers.0.")}) for s in shards]
    assert experts == [list(range(r, a.n_routed_experts, 4)) for r in range(4)]
    assert sum(s["head.weight"].shape[0] for s in shards) == a.vocab_size
    assert all(s["layers.0.attn.wo_b"].shape == (a.hidden_size, a.o_groups * a.o_lora_rank // 4) for s in shards)
    assert all(s["layers.0.attn.wq_b"].shape[0] == a.num_attention_heads * a.head_dim // 4 for s in shards)
    with pytest.raises(ValueError, match="num_attention_heads = 4 is not divisible by the 3 ranks"):
        shard_weights(a, ck.weights, 0, 3)
