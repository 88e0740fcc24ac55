"""Programmatic dependent launch (Hopper and newer): how the CuTe DSL kernels chain on a stream.

A kernel launched with `use_pdl=True` may start while the kernel before it on the stream still
runs, once that one lets its dependents start: its launch and set-up then overlap the other's
tail, where a decode step at small batch otherwise loses about a microsecond per kernel. Every
such kernel keeps two rules:
- it touches no global memory that a kernel before it writes or reads until `griddepcontrol.wait`
  returns (the kernel before has finished and its writes are visible). Only data no kernel writes
  may be read earlier (the FP8 GEMM loads its first weight tiles, the fp32 small linear prefetches
  its weights into the L2 cache), or what only steers a prefetch (the MoE's L2 GEMV prefetches its
  experts' rows by the dispatch kernel's output, read again after the wait);
- it lets the kernel after it start (`griddepcontrol.launch_dependents`) only after that wait. So
  when any kernel starts, every kernel but the one just before it has finished: Inductor's Triton
  kernels (compiled with `triton.enable_pdl`, backend.gpu_model) wait only where they read what the
  kernel just before them wrote, and rely on that.
Where the kernel before is on another stream, or is not a kernel (a copy), or the launch has no
such attribute, the wait returns at once and the kernel runs as an ordinary launch.
"""
import cutlass.cute as cute


@cute.jit
def wait_for_previous_kernel():
    """The start of a dependently launched kernel, before any global memory access: wait for the
    kernel before, then let the kernel after start."""
    cute.arch.griddepcontrol_wait()
    cute.arch.griddepcontrol_launch_dependents()
