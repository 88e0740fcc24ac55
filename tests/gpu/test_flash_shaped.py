"""A flash-shaped checkpoint (real V4-Flash widths, one layer + MTP), generated on the GPU, loads
and runs through the reference model (marker gpu)."""
import time

import pytest
import torch

from backend.checkpoint import load_checkpoint
from backend.model import DeepseekV4
from backend.synthetic import generate

pytestmark = pytest.mark.gpu


def test_flash_shaped_generates_loads_and_runs(tmp_path):
    start = time.perf_counter()
    path = generate(tmp_path / "flash", flavor="nvidia-nvfp4", size="flash-shaped", layers=1, device="cuda")
    generated = time.perf_counter() - start
    ck = load_checkpoint(path)
    assert ck.args.hidden_size == 4096 and ck.args.n_routed_experts == 256
    assert ck.formats["nvfp4"] == 256 * 3 and ck.formats["mxfp4"] == 256 * 3  # main experts, MTP experts
    model = DeepseekV4(ck.args, ck.weights, simulate_qat=True, dtype=torch.bfloat16, device="cuda")
    state = model.new_state(1, 64, with_mtp=False)
    ids = torch.randint(2, 4000, (1, 12))
    logits, _ = model.forward(ids, 0, [0], state)
    step, _ = model.forward(torch.tensor([[7]]), 12, [0], state)
    assert logits.shape == (1, 129280) and torch.isfinite(logits).all() and torch.isfinite(step).all()
    print(f"flash-shaped 1-layer checkpoint generated on the GPU in {generated:.1f} s")
