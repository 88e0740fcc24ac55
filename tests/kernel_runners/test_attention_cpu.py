"""The decode attention runner's host side (kernels.attention) on the CPU: how it splits the keys
over CTAs, and its refusals. The kernels compile in test_linear_cpu / test_blackwell_cpu and run
against their twin in tests/gpu/test_attention.py."""
import pytest
import torch

from kernels.attention import heads_per_cta, sparse_mqa_decode, split_plan


def test_split_plan_covers_every_chunk_with_no_split_empty():
    for batch in (1, 2, 8, 33, 128):
        for groups in (1, 4, 8):
            for chunks in (1, 2, 5, 6, 36, 1000):
                splits, per_split = split_plan(batch, groups, chunks, ctas=264)
                assert splits * per_split >= chunks > (splits - 1) * per_split, (batch, groups, chunks)
                assert batch * groups * splits <= max(264, batch * groups) + batch * groups * per_split
    assert split_plan(1, 4, 6, ctas=264) == (6, 1)    # one sequence: a chunk per CTA
    assert split_plan(128, 4, 6, ctas=264) == (1, 6)  # many: a sequence's chunks in one CTA


def test_heads_per_cta():
    assert [heads_per_cta(h) for h in (64, 128, 8, 4, 24, 12)] == [16, 16, 8, 4, 8, 4]
    with pytest.raises(ValueError, match="multiple of 4"):
        heads_per_cta(6)


def test_runner_rejects_shapes_naming_them():
    q, ring = torch.zeros(2, 4, 512), torch.zeros(3, 8, 512)
    slots, pos, sink, inv_freq = torch.arange(2), torch.zeros(2, dtype=torch.long), torch.zeros(4), torch.ones(32)
    with pytest.raises(ValueError, match="head dim"):
        sparse_mqa_decode(torch.zeros(2, 4, 100), torch.zeros(3, 8, 100), None, None, slots, pos, sink, inv_freq,
                          0.1, False)
    with pytest.raises(ValueError, match="comp_mask"):
        sparse_mqa_decode(q, ring, torch.zeros(3, 5, 512), torch.zeros(2, 4, dtype=torch.bool), slots, pos, sink,
                          inv_freq, 0.1, False)
