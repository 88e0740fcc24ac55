"""backend.inductor_check on hand-written kernels:
the read-backs of the H200's two routing kernels are found; loads before a store, and a read-back
after a barrier, are not."""
from unittest import mock

import pytest
import torch
from torch._inductor.graph import GraphLowering

from backend.inductor_check import (KernelReadsBackError, collected_output_code, install_check, kernels_reading_back,
                                    read_backs, triton_kernels)

# The two loops of the hash-routing kernel an H200 compiled (abridged): loop 1 stores the experts
# to out_ptr0, loop 2 loads them back to gather the scores.
HASH_ROUTING = """
    tmp0 = tl.load(in_ptr0 + (x0), xmask, eviction_policy='evict_last')
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        tmp6 = tl.load(in_ptr1 + (r0_1 + ks1*tmp4), r0_mask & xmask, eviction_policy='evict_first', other=0.0)
        tmp7 = tmp6.to(tl.int64)
        tl.store(out_ptr0 + (r0_1 + ks1*x0), tmp7, r0_mask & xmask)
    tmp21 = tl.sum(_tmp21, 1)[:, None]
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        tmp23 = tl.load(out_ptr0 + (r0_1 + ks1*x0), r0_mask & xmask, eviction_policy='evict_first', other=0.0)
        tl.store(out_ptr2 + (r0_1 + ks1*x0), tmp39, r0_mask & xmask)
"""

# The top-k's loops 4 and 5 of the routing kernel an H200 compiled at 256 experts, batch 1 (abridged,
# the masking argmaxes of the twentieth session's top_k_by_argmax): loop 4 stores its masked scores
# (a pointer broadcast to the block), loop 5 loads them back.
TOP_K_ROUTING = """
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        tmp59 = tl.where(tmp44, tmp56, tmp58)
        tl.store(out_ptr3 + (tl.broadcast_to(r0_0, [XBLOCK, R0_BLOCK])), tmp59, r0_mask)
    tmp61_val, tmp61_idx = triton_helpers.max_with_index(_tmp61, _tmp61_index, 1)
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        tmp64 = tl.load(out_ptr3 + (r0_0), r0_mask, eviction_policy='evict_last', other=0.0)
"""

# The same with a barrier between the loops: no race.
HASH_ROUTING_BARRIER = HASH_ROUTING.replace("    tmp21 = tl.sum", "    tl.debug_barrier()\n    tmp21 = tl.sum")

IN_PLACE = """
    tmp0 = tl.load(in_out_ptr0 + (x0), xmask)
    tmp1 = tl.load(in_ptr0 + (x0), xmask)
    tl.debug_barrier()
    tl.store(in_out_ptr0 + (x0), tmp2, xmask)
"""


def output_code(name: str, body: str) -> str:
    """One kernel as Inductor's output code declares it."""
    return f"{name} = async_compile.triton('{name}', '''\n@triton.jit\ndef {name}():\n{body}''', device_str='cuda')\n"


def test_the_routing_kernels_read_backs_are_found():
    found = read_backs(HASH_ROUTING)
    assert len(found) == 1 and found[0].startswith("out_ptr0: tmp23 = tl.load(out_ptr0 +")
    found = read_backs(TOP_K_ROUTING)
    assert len(found) == 1 and found[0].startswith("out_ptr3: tmp64 = tl.load(out_ptr3 +")


def test_loads_before_the_store_and_read_backs_after_a_barrier_pass():
    assert read_backs(IN_PLACE) == []
    assert read_backs(HASH_ROUTING_BARRIER) == []


def test_kernels_are_taken_from_the_output_code_by_name():
    code = output_code("k_a", HASH_ROUTING) + output_code("k_b", IN_PLACE)
    assert sorted(triton_kernels(code)) == ["k_a", "k_b"]
    assert list(kernels_reading_back([code])) == ["k_a"]


def test_the_check_raises_naming_the_kernel_and_keeps_a_hook_already_there():
    racy, clean = output_code("k_a", HASH_ROUTING), output_code("k_b", HASH_ROUTING_BARRIER)
    saved = []
    with mock.patch.object(GraphLowering, "save_output_code", saved.append):
        install_check()
        install_check()  # once is enough: not wrapped twice
        GraphLowering.save_output_code(clean)
        with pytest.raises(KernelReadsBackError, match=r"k_a.*out_ptr0: tmp23 = tl.load"):
            GraphLowering.save_output_code(racy)
        assert saved == [clean]
        assert GraphLowering.save_output_code.checks_read_backs


def test_inductor_hands_its_output_code_to_the_hook():
    """The hook the check uses is the one this torch calls (a CPU compile here: C++ kernels, no Triton)."""
    with collected_output_code() as codes:
        torch.compile(lambda x: x.sin() + 1)(torch.randn(8))
    assert codes and "def call" in codes[0]
