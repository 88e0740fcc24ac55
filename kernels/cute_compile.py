"""What every CuTe DSL runner shares to compile: the disk cache, the target architecture, fake
tensors describing the arguments, and the TVM-FFI compile (torch tensors in, current stream).

Kernels compile once per static configuration with every size symbolic, into
$CUTE_DSL_CACHE_DIR (default: $DSV4_CACHE_DIR/cute-dsl or ~/.cache/deepseek-v4-triton/cute-dsl).
Compile before any CUDA-graph capture: compiling cannot happen inside one.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def target_arch(device=None) -> str:
    """sm_XYa of a CUDA device; without one, $CUTE_DSL_ARCH (the CPU-only compile target), else sm_90a."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}a"
    return os.environ.get("CUTE_DSL_ARCH", "sm_90a")


def fake(dtype, *dims, order: tuple | None = None):
    """A compact fake tensor for compiling; None dims are symbolic (any size at run time). `order`
    ranks the modes from contiguous (0) up; default row-major."""
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor
    shape = tuple(cute.sym_int() if d is None else d for d in dims)
    order = order if order is not None else tuple(range(len(shape)))[::-1]
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=16)


def compile_tvm_ffi(entry, args: tuple, constants: tuple = ()):
    """cute.compile of `entry(*args, stream, *constants)` taking torch tensors (TVM-FFI) and launching on
    the current torch stream."""
    if "CUTE_DSL_CACHE_DIR" not in os.environ:
        root = os.environ.get("DSV4_CACHE_DIR") or Path.home() / ".cache" / "deepseek-v4-triton"
        os.environ["CUTE_DSL_CACHE_DIR"] = str(Path(root) / "cute-dsl")
    import cutlass.cute as cute
    from cutlass.runtime import make_fake_stream
    return cute.compile(entry, *args, make_fake_stream(use_tvm_ffi_env_stream=True), *constants,
                        options="--enable-tvm-ffi")
