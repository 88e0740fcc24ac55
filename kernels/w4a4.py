"""W4A4 (NVFP4 x NVFP4) building blocks for Blackwell, shared by the dense and MoE runners.
COMPILE-VERIFIED ONLY: the sm_100a kernels (kernels/blockscaled_sm100.py) compile and assemble
here, but no Blackwell GPU has run them. Their twins (`nvfp4_qdq` + matmul) run anywhere.

- `quantize_rows_nvfp4`: bf16 rows (or L1's gate||up, through the clamped SwiGLU and the routing
  weight) -> NVFP4 E2M1 + E4M3 scales in the tensor-core 128x4 layout, with a fixed global scale
  per row group (the checkpoint's calibrated `input_scale`): no reduction over the batch, graph safe.
- `blockscaled_matmul`: the block-scaled GEMM over token tiles, each tiled to a weight group.
- `swizzled`: weight scales re-laid out once (at first use, the warm-up) into the 128x4 layout, a
  bit-preserving permutation (kernels.formats.swizzle_scales_128x4); the packed E2M1 bytes are used
  as shipped.
"""
from __future__ import annotations

import functools

import torch

from .cute_compile import compile_tvm_ffi, fake, target_arch
from .formats import swizzle_scales_128x4

TOKEN_TILES = (128, 256)
STAGES = {128: 5, 256: 4}  # smem ring depth: 36 KB / 54 KB per stage


@functools.cache
def compiled_gemm(tile_n: int, out_dtype: str, arch: str):
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    from .blockscaled_sm100 import E2M1, E4M3, blockscaled_gemm
    ptr = lambda dt: make_ptr(dt, 0, cute.AddressSpace.gmem, assumed_align=32)
    out = cutlass.Float32 if out_dtype == "float32" else cutlass.BFloat16
    size = cutlass.Int32(1)
    args = (ptr(E2M1), ptr(E2M1), ptr(E4M3), ptr(E4M3), fake(out, None, None), fake(cutlass.Float32, None, 2),
            fake(cutlass.Int32, None), size, size, size, size, size)
    return compile_tvm_ffi(blockscaled_gemm, args, (tile_n, STAGES[tile_n]))


@functools.cache
def compiled_quant(gated: bool, swiglu_limit: float, tile_n: int, arch: str):
    import cutlass

    from .blockscaled_sm100 import quantize_rows
    args = (fake(cutlass.Float32 if gated else cutlass.BFloat16, None, None), fake(cutlass.Int32, None),
            fake(cutlass.Float32, None), fake(cutlass.Int32, None), fake(cutlass.Float32, None),
            fake(cutlass.Int32, None, None), fake(cutlass.Uint8, None))
    return compile_tvm_ffi(quantize_rows, args, (tile_n, gated, swiglu_limit))


def scale_bytes(rows: int, k: int) -> int:
    """Bytes of the 128x4 scale layout for [rows, k/16] scales."""
    return -(-rows // 128) * 128 * -(-(k // 16) // 4) * 4


def quantize_rows_nvfp4(src, row_source, row_weight, tile_group, global_scale, width: int, tile_n: int,
                        gated: bool = False, swiglu_limit: float = 0.0):
    """-> (packed E2M1 uint8 [S, width/2], scales uint8 flat 128x4) for S = len(row_source) rows."""
    s = row_source.shape[0]
    q = torch.empty(s, width // 2, dtype=torch.uint8, device=src.device)
    scales = torch.zeros(scale_bytes(s, width), dtype=torch.uint8, device=src.device)
    compiled_quant(gated, float(swiglu_limit), tile_n, target_arch(src.device))(
        src, row_source, row_weight, tile_group, global_scale, q.view(torch.int32), scales)
    return q, scales


def blockscaled_matmul(weight_bytes, weight_scales, x_bytes, x_scales, alpha, tile_group, rows: int, k: int,
                       groups: int, alpha_split: int, tile_n: int, out_dtype=torch.float32) -> torch.Tensor:
    """out [S, groups*rows] = alpha * (NVFP4 x rows) @ (NVFP4 weight group of the row's tile)^T."""
    from cutlass.cute.runtime import make_ptr
    import cutlass.cute as cute
    from .blockscaled_sm100 import E2M1, E4M3
    s = x_bytes.shape[0]
    out = torch.empty(s, groups * rows, dtype=out_dtype, device=x_bytes.device)
    ptr = lambda dt, t: make_ptr(dt, t.data_ptr(), cute.AddressSpace.gmem, assumed_align=32)
    compiled_gemm(tile_n, "float32" if out_dtype == torch.float32 else "bfloat16", target_arch(x_bytes.device))(
        ptr(E2M1, weight_bytes), ptr(E2M1, x_bytes), ptr(E4M3, weight_scales), ptr(E4M3, x_scales), out, alpha,
        tile_group, rows, s, k, groups, alpha_split)
    return out


def compile_kernels(arch: str = "sm_100a", swiglu_limit: float = 10.0) -> int:
    """Every sm_100a variant the runners use; returns how many were compiled."""
    n = 0
    for tile_n in TOKEN_TILES:
        for out_dtype in ("float32", "bfloat16"):
            compiled_gemm(tile_n, out_dtype, arch)
            n += 1
        for gated, limit in ((False, 0.0), (True, float(swiglu_limit))):
            compiled_quant(gated, limit, tile_n, arch)
            n += 1
    return n


_swizzled: dict = {}


def swizzled(scales: torch.Tensor) -> torch.Tensor:
    """Block scale bytes [rows, k/16], or [L, rows, k/16] for a stack, in the 128x4 layout (one
    layout per group, L outermost). Made once per tensor, at its first use (the warm-up)."""
    key = (scales.data_ptr(), tuple(scales.shape))
    if key not in _swizzled:
        groups = scales.view(torch.uint8).reshape(-1, *scales.shape[-2:])
        _swizzled[key] = torch.cat([swizzle_scales_128x4(g) for g in groups])
    return _swizzled[key]
