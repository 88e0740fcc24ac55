"""The MTP block: causally consistent, and its logits are finite and use its own state."""
import torch

from backend.checkpoint import load_checkpoint
from backend.model import DeepseekV4


def test_mtp_prefill_and_decode_agree(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("nvidia-nvfp4"))
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=False)
    ids = torch.randint(2, ck.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(9))
    state = model.new_state(1, 64)
    _, h = model.forward(ids[:, :-1], 0, [0], state, all_logits=True)
    full = model.mtp_forward(h, ids[:, 1:], 0, [0], state)          # [1, 29, V]
    assert full.shape == (1, 29, ck.args.vocab_size) and torch.isfinite(full).all()

    state = model.new_state(1, 64)
    _, h = model.forward(ids[:, :10], 0, [0], state, all_logits=True)
    step_logits = [model.mtp_forward(h, ids[:, 1:11], 0, [0], state)[0, -1]]
    for p in range(10, 29):
        _, h = model.forward(ids[:, p:p + 1], p, [0], state)
        step_logits.append(model.mtp_forward(h, ids[:, p + 1:p + 2], p, [0], state)[0, -1])
    for i, p in enumerate(range(9, 29)):
        ref = full[0, p]
        assert ((step_logits[i] - ref).abs().max() / ref.abs().max()) <= 1e-5, f"position {p}"
