"""Routing dispatch in one launch (CuTe DSL): the same result as kernels.moe.routing.dispatch,
except that slots within an expert may come in any order (each slot is computed on its own, so
the MoE output does not depend on it). One CTA: shared-memory atomic counts per expert, a scan,
then every slot claims its place. Static launch shape, graph safe.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32

THREADS = 1024


@cute.kernel
def _dispatch_kernel(experts: cute.Tensor, sorted_slots: cute.Tensor, active_experts: cute.Tensor,
                     active_start: cute.Tensor, num_active: cute.Tensor, num_experts: cutlass.Constexpr):
    tid, _, _ = cute.arch.thread_idx()
    smem = cutlass.memory.SmemAllocator()
    counts = smem.allocate_tensor(Int32, cute.make_layout(num_experts), 16)
    start = smem.allocate_tensor(Int32, cute.make_layout(num_experts), 16)
    n_slots = experts.shape[0]
    n_active_max = active_experts.shape[0]
    for e in cutlass.range(tid, num_experts, THREADS):
        counts[e] = 0
    cute.arch.sync_threads()
    for s in cutlass.range(tid, n_slots, THREADS):
        cute.arch.atomic_add(counts.iterator + Int32(experts[s]), Int32(1), scope="cta")
    cute.arch.sync_threads()
    if tid == 0:
        run = Int32(0)
        act = Int32(0)
        for e in cutlass.range(num_experts):
            c = counts[e]
            start[e] = run
            if c > 0:
                active_experts[act] = e
                active_start[act] = run
                act = act + 1
            run = run + c
        num_active[0] = act
        for j in cutlass.range(act, n_active_max):
            active_experts[j] = -1
        for j in cutlass.range(act, n_active_max + 1):
            active_start[j] = n_slots
    cute.arch.sync_threads()
    for s in cutlass.range(tid, n_slots, THREADS):
        pos = cute.arch.atomic_add(start.iterator + Int32(experts[s]), Int32(1), scope="cta")
        sorted_slots[pos] = s


@cute.jit
def dispatch_launch(experts, sorted_slots, active_experts, active_start, num_active, stream,
                    num_experts: cutlass.Constexpr):
    _dispatch_kernel(experts, sorted_slots, active_experts, active_start, num_active, num_experts).launch(
        grid=[1, 1, 1], block=[THREADS, 1, 1], stream=stream)
