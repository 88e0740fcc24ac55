"""The decode attention kernels (kernels.attention) against their twin,
backend.model.sparse_mqa_decode_reference (marker gpu)."""
import pytest
import torch

from backend.model import sparse_mqa_decode_reference
from kernels.attention import sparse_mqa_decode
from kernels.formats import quantize_activation_fp8

pytestmark = pytest.mark.gpu


def _inputs(batch: int, heads: int, dim: int, window: int, capacity: int | None, picked: float, seed: int):
    """Random decode inputs: more slots than sequences (in shuffled order), positions before and
    past the ring's first wrap (one at 0), entries picked at random (one row picks none), queries
    and sinks on scales that make some softmaxes peaked and some flat."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    slots = torch.randperm(batch + 3, device="cuda", generator=g)[:batch]
    ring = torch.randn(batch + 3, window, dim, device="cuda", generator=g)
    pos = torch.randint(0, 3 * window, (batch,), device="cuda", generator=g)
    pos[0] = 0
    entries = mask = None
    if capacity is not None:
        entries = torch.randn(batch + 3, capacity, dim, device="cuda", generator=g)
        mask = torch.rand(batch, capacity, device="cuda", generator=g) < picked
        mask[-1] = False
    q = torch.randn(batch, heads, dim, device="cuda", generator=g) * torch.rand(batch, heads, 1, device="cuda", generator=g) * 4
    sink = torch.randn(heads, device="cuda", generator=g) * 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, device="cuda", dtype=torch.float32) / 64))
    return q, ring, entries, mask, slots, pos, sink, inv_freq, dim ** -0.5


@pytest.mark.parametrize("batch,heads,dim,window,capacity,picked", [
    (1, 64, 512, 128, 64, 0.5),      # V4-Flash, one sequence
    (8, 64, 512, 128, None, 0.0),    # a sliding-window layer
    (33, 128, 512, 128, 128, 0.3),   # V4-Pro
    (3, 64, 512, 128, 2048, 0.05),   # a long context: most entry chunks hold no picked entry
    (5, 4, 128, 8, 5, 0.7),          # tiny
])
def test_sparse_mqa_decode_matches_its_twin(batch, heads, dim, window, capacity, picked):
    """Output within 1e-5 of the twin; its FP8 quantization bit for bit the FP8 runner quantizer's on
    the kernel's own output; two calls identical."""
    args = _inputs(batch, heads, dim, window, capacity, picked, seed=batch * heads + dim)
    o, (q8, scale) = sparse_mqa_decode(*args, quantize=True)
    o_ref, _ = sparse_mqa_decode_reference(*args, quantize=False)
    err = ((o - o_ref).norm(dim=-1) / o_ref.norm(dim=-1)).max().item()  # every (sequence, head)
    assert err <= 1e-5, err
    q8_ref, scale_ref = quantize_activation_fp8(o.reshape(batch, -1))
    assert torch.equal(q8.view(torch.uint8), q8_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
    again, none = sparse_mqa_decode(*args, quantize=False)
    assert none is None and torch.equal(again, o)


def test_sparse_mqa_decode_graph_replay_recomputes():
    """Captured once, replayed on new queries, rings, entries, picks and positions written in place:
    the eager result on those inputs, bit for bit."""
    first = _inputs(6, 64, 512, 128, 96, 0.4, seed=1)
    second = _inputs(6, 64, 512, 128, 96, 0.4, seed=2)
    static = [a.clone() if isinstance(a, torch.Tensor) else a for a in first]
    sparse_mqa_decode(*static, quantize=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, (q8, scale) = sparse_mqa_decode(*static, quantize=True)
    for dst, src in zip(static, second):
        if isinstance(dst, torch.Tensor):
            dst.copy_(src)
    graph.replay()
    expected, (q8_e, scale_e) = sparse_mqa_decode(*second, quantize=True)
    assert torch.equal(out, expected) and torch.equal(q8.view(torch.uint8), q8_e.view(torch.uint8))
    assert torch.equal(scale, scale_e)
    assert not torch.equal(out, sparse_mqa_decode(*first, quantize=False)[0])
