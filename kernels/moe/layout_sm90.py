"""The W4A16 kernels' activation layout (kernels.moe.pair_order) as a CuTe DSL kernel, sm_90a and newer.

One thread per 8 activations of a row: it reads them in K order (bf16 or fp32), rounds them to f16
in the pairs the E2M1 decode meets (`activation_pairs`) and stores the 16 bytes at their place in
the activation order. A programmatic dependent launch (kernels.dependent_launch): it starts beside
the kernel before it, and the W4A16 kernel after it starts beside it (the ungated GEMV hints its
first weights into L2 meanwhile). torch's copy kernel, which did this before, overlapped with neither
(2.5-3 us per call in a CUDA graph on an H200).
"""
import cutlass
import cutlass.cute as cute
from cutlass import Int32

from ..dependent_launch import wait_for_previous_kernel
from .w4a16_sm90 import activation_pairs, ordered_position

THREADS = 128


@cute.kernel
def _layout_kernel(x_vecs: cute.Tensor, out_vecs: cute.Tensor, x_kind: cutlass.Constexpr):
    wait_for_previous_kernel()
    tidx, _, _ = cute.arch.thread_idx()
    bidx, _, _ = cute.arch.block_idx()
    per_row = out_vecs.shape[1]  # K / 8
    i = bidx * THREADS + tidx
    if i < out_vecs.shape[0] * per_row:
        row = i // per_row
        k8 = i % per_row
        pairs = activation_pairs(x_vecs, row, k8, x_kind)
        vec = cute.make_rmem_tensor((4,), Int32)
        for q in cutlass.range_constexpr(4):
            vec[q] = pairs[q]
        out_vecs[row, ordered_position(k8), None].store(vec.load())


@cute.jit
def layout_launch(x_vecs, out_vecs, stream, x_kind: cutlass.Constexpr):
    """x_vecs: int32 [rows, K/8 (fp32: K/4), 4], out_vecs: int32 [rows, K/8, 4] (f16 in activation order)."""
    n = out_vecs.shape[0] * out_vecs.shape[1]
    _layout_kernel(x_vecs, out_vecs, x_kind).launch(grid=[(n + THREADS - 1) // THREADS, 1, 1], block=[THREADS, 1, 1],
                                                   stream=stream, use_pdl=True)
