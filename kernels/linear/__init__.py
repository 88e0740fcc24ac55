"""Dense linear layers per weight format: the pure-torch twins that define the GPU runners.

`linear_ref(x, weight)` computes y = x @ W^T for a weight in the format it ships in. It dequantizes
on the fly, one call at a time, and never stores the dequantized weight. The twin mirrors what the
runners compute:
- FP8 block-128 weights (FP8 GEMM): when `quantize_input` is set, activations are quantized per
  token per 128 along K to E4M3 with power-of-two scales (DeepSeek's act_quant) before the GEMM.
- NVFP4 / MXFP4 weights (Hopper W4A16): activations stay in their own precision (the runner
  rounds them to f16; its twin `linear_w4a16_ref` does too).
- Plain tensors (BF16/fp32): F.linear in the activation's dtype.

GPU runners (CuTe DSL), each with its twin; the checkpoint's bytes are used in place (no copy):
- `linear_fp8(x, weight, groups)`: FP8 block-128 GEMM (wgmma, sm_90a) after an on-device activation
  quantizer (`quantize_rows_fp8`); `groups` > 1 is the block-diagonal wo_a as one batched GEMM.
  Twin: `linear_fp8_ref`.
- `linear_w4a16(x, weight, groups)`: dense NVFP4/MXFP4 on the MoE's grouped kernels (kernels.moe), one
  group per dense layer, or the wo_a groups as experts in one launch, tiled for a dense weight
  (`dense_plan`; kernels.linear.w4a16). Twin: `linear_w4a16_ref`.
- `linear_w4a4(x, weight)`: Blackwell NVFP4 x NVFP4 (activations quantized on the fly with the
  weight's `input_scale`), COMPILE-VERIFIED ONLY (kernels.w4a4). Twin: `linear_w4a4_ref`.
- `linear_f32(x, weight)`: fp32 math on a BF16 or fp32 weight (the gate, the compressors, the
  indexer's weights_proj), a CuTe DSL kernel for up to 16 tokens (kernels.linear.small_f32_sm90),
  F.linear above; also `torch.ops.dsv4.linear_f32`, which compiled pieces call. Twin:
  `linear_f32_ref`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..cute_compile import compile_tvm_ffi, fake, target_arch
from ..formats import (FP8_BLOCK, Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight, dequantize_activation_fp8, fp8_qdq,
                       nvfp4_qdq)
from .w4a16 import dense_plan, dense_variants, linear_w4a16, linear_w4a16_ref, w4a16_launch_args

__all__ = ["linear_ref", "dequantize_weight", "linear_w4a16", "linear_w4a16_ref", "w4a16_launch_args", "dense_plan",
           "dense_variants", "linear_fp8", "linear_fp8_ref",
           "quantize_rows_fp8", "fp8_plan", "compile_fp8_kernels", "linear_w4a4", "linear_w4a4_ref", "linear_f32",
           "linear_f32_ref"]


def dequantize_weight(weight, dtype=torch.float32) -> torch.Tensor:
    """Any weight container (or a plain tensor) -> a float tensor [out, in] of `dtype`."""
    if isinstance(weight, (Fp8BlockWeight, Nvfp4Weight, Mxfp4Weight)):
        return weight.dequantize().to(dtype)
    return weight.to(dtype)


def linear_ref(x: torch.Tensor, weight, quantize_input: bool = False) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype. `quantize_input` applies only to FP8 block weights."""
    if isinstance(weight, Fp8BlockWeight) and quantize_input:
        x = fp8_qdq(x)
    return F.linear(x, dequantize_weight(weight, x.dtype))


# ---------------------------------------------------------------------------------------------
# fp32 math for a few tokens
# ---------------------------------------------------------------------------------------------

SMALL_LINEAR_TOKENS = (1, 2, 4, 8, 16)  # compiled variants' static token counts; above: F.linear


def linear_f32_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The twin of linear_f32: x [T, K] @ W^T in fp32 math -> fp32 [T, N]."""
    return F.linear(x.float(), weight.float())


def small_linear_plan(tokens: int, n: int, k: int, bf16: bool) -> tuple[int, int]:
    """(static token count, warps splitting K) of the kernel for `tokens` x [n, k]: enough warps
    for the memory, each with at least one round of 32 vectors (kernels.moe.split_k_warps)."""
    from ..moe import split_k_warps
    from .small_f32_sm90 import ROWS
    max_tokens = next(t for t in SMALL_LINEAR_TOKENS if t >= tokens)
    return max_tokens, split_k_warps(n // ROWS, k // (8 if bf16 else 4) // 32)


@functools.cache
def _compiled_small_linear(bf16: bool, warps_k: int, max_tokens: int, arch: str):
    import cutlass

    from .small_f32_sm90 import small_linear
    args = (fake(cutlass.Int32, None, None, 4), fake(cutlass.Int32, None, None, 4), fake(cutlass.Float32, None, None))
    return compile_tvm_ffi(small_linear, args, (bf16, warps_k, max_tokens))


def _small_linear_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this call: a Hopper or newer GPU, up to 16 tokens, shapes it tiles."""
    from .small_f32_sm90 import ROWS
    return (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9 and x.shape[0] <= SMALL_LINEAR_TOKENS[-1]
            and weight.dtype in (torch.bfloat16, torch.float32) and weight.shape[0] % ROWS == 0
            and weight.shape[1] % 8 == 0)


@torch.library.custom_op("dsv4::linear_f32", mutates_args=())
def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T in fp32 math: x [..., K] (any float dtype, widened), W BF16 or fp32 [N, K] ->
    fp32 [..., N]. Graph safe; compile first outside any capture (one eager call per token count)."""
    rows = x.reshape(-1, x.shape[-1])
    if not _small_linear_runs(rows, weight):
        return linear_f32_ref(x, weight)
    rows = rows.float().contiguous()
    w = weight.contiguous()
    bf16 = w.dtype == torch.bfloat16
    out = torch.empty(rows.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    max_tokens, warps_k = small_linear_plan(rows.shape[0], *w.shape, bf16)
    kernel = _compiled_small_linear(bf16, warps_k, max_tokens, target_arch(x.device))
    kernel(rows.view(torch.int32).view(rows.shape[0], -1, 4), w.view(torch.int32).view(w.shape[0], -1, 4), out)
    return out.view(*x.shape[:-1], w.shape[0])


@linear_f32.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# FP8 block-128
# ---------------------------------------------------------------------------------------------

def linear_fp8_ref(x, weight: Fp8BlockWeight, groups: int = 1) -> torch.Tensor:
    """The twin of linear_fp8, in fp32: x [T, groups*K] quantized per token per 128 (power-of-two
    scales), or the pair quantize_activation_fp8 gives for it, times the dequantized weight
    [groups*M, K] group by group -> [T, groups*M]."""
    if not isinstance(weight, Fp8BlockWeight):
        raise TypeError(f"linear_fp8 takes FP8 block-128 weights, got {type(weight).__name__}")
    xq = dequantize_activation_fp8(*x) if isinstance(x, tuple) else fp8_qdq(x.float())
    w = weight.dequantize()
    if groups == 1:
        return F.linear(xq, w)
    t = xq.shape[0]
    return torch.einsum("tgk,gmk->tgm", xq.view(t, groups, -1), w.view(groups, -1, w.shape[1])).reshape(t, -1)


TOKEN_TILES = (8, 16, 32, 64, 128)
STAGES = {8: 8, 16: 8, 32: 8, 64: 4, 128: 4}  # smem ring depth per token tile
CONSUMERS = 2
# Up to 32 tokens, a weight of few 64-row tiles runs in narrower token tiles: each weight tile's
# token tiles are CTAs side by side that read its bytes from HBM once (L2 serves the rest), and a
# narrower tile waits less for its wgmmas per K block. An H200 sweep at 16 and 32 tokens
# (bench/NOTES.md) found 8-token tiles best up to 32 weight tiles and 16-token tiles up to 128.
NARROW_TILE_TOKENS = 32
NARROW_TILES = ((32, 8), (128, 16))  # (at most this many weight tiles, widest token tile)


def fp8_plan(tokens: int, rows: int, k: int, groups: int = 1, sms: int = 132) -> tuple[int, int, int, int]:
    """(token tile, stages, K splits, consumer warpgroups) for `tokens` x `rows` (per group) x `k`.
    Consumer warpgroups share a CTA's K blocks. Splits cost a tail (partials, a fence, a second
    pass), which an H100 sweep (bench/NOTES.md) found worth paying only for the smallest weights:
    up to about half an SM-count of CTAs (of weight tiles, up to 32 tokens), with two K blocks per
    warpgroup per split and the fp32 partials under the weight's bytes."""
    weight_tiles = -(-rows // 64) * groups
    tile_n = next((t for t in TOKEN_TILES if t >= tokens), TOKEN_TILES[-1])
    if tokens <= NARROW_TILE_TOKENS:
        tile_n = min(tile_n, next((w for most, w in NARROW_TILES if weight_tiles <= most), tile_n))
    # Narrow token tiles share their weight tile's bytes, so only weight tiles count toward splitting.
    ctas = weight_tiles * (1 if tokens <= NARROW_TILE_TOKENS else -(-tokens // tile_n))
    consumers = CONSUMERS
    k_blocks = k // FP8_BLOCK
    splits = 1
    while 4 * ctas * splits <= sms and k_blocks // (2 * splits) >= 2 * consumers and 2 * splits * tokens * 8 <= k:
        splits *= 2
    return tile_n, STAGES[tile_n], splits, consumers


_CUTE_DTYPES = {torch.bfloat16: "BFloat16", torch.float32: "Float32"}


@functools.cache
def _compiled_fp8_gemm(tile_n: int, stages: int, splits: int, consumers: int, e8m0: bool, arch: str,
                       out_dtype: torch.dtype = torch.bfloat16):
    import cutlass

    from .fp8_block_sm90 import fp8_block_gemm
    args = (fake(cutlass.Float8E4M3FN, None, None, None, order=(1, 0, 2)),   # weights (M, K, L)
            fake(cutlass.Float8E4M3FN, None, None, None, order=(2, 0, 1)),   # tokens (N, K, L)
            fake(cutlass.Uint8 if e8m0 else cutlass.Float32, None, None),
            fake(cutlass.Float32, None, None, None, order=(2, 0, 1)),
            fake(getattr(cutlass, _CUTE_DTYPES[out_dtype]), None, None), fake(cutlass.Float32, None, None, None),
            fake(cutlass.Int32, None))
    return compile_tvm_ffi(fp8_block_gemm, args, (tile_n, stages, splits, consumers, e8m0))


@functools.cache
def _compiled_quant(arch: str, x_dtype: torch.dtype = torch.bfloat16):
    import cutlass

    from .fp8_block_sm90 import quantize_rows
    args = (fake(getattr(cutlass, _CUTE_DTYPES[x_dtype]), None, None), fake(cutlass.Int32, None, None),
            fake(cutlass.Float32, None, None))
    return compile_tvm_ffi(quantize_rows, args)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU activation quantizer, one kernel: bf16 or fp32 [T, K] -> (E4M3 [T, K], fp32 scales
    [T, K/128]), bit-identical to kernels.formats.quantize_activation_fp8 (its twin). fp32 input
    avoids a double rounding (to bf16, then to E4M3) that flips a few percent of the E4M3 values."""
    t, k = x.shape
    if x.dtype not in _CUTE_DTYPES or not x.is_contiguous() or k % FP8_BLOCK:
        raise ValueError(f"quantize_rows_fp8: x must be contiguous bfloat16 or float32 [T, K] with K % 128 == 0, "
                         f"got {x.dtype} {tuple(x.shape)}")
    q = torch.empty(t, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(t, k // FP8_BLOCK, dtype=torch.float32, device=x.device)
    _compiled_quant(target_arch(x.device), x.dtype)(x, q.view(torch.int32), scale)
    return q, scale


def _batched(t: torch.Tensor, groups: int, outer_first: bool) -> torch.Tensor:
    """[R, groups*C] -> (R, C, groups) for the weights' (M, K, L) when outer_first is False (rows
    of one group are contiguous blocks), or the tokens' (N, K, L) with the group inside a row."""
    r, c = t.shape
    if outer_first:  # tokens: row t holds group g at columns g*C..
        return t.view(r, groups, c // groups).permute(0, 2, 1)
    return t.view(groups, r // groups, c).permute(1, 2, 0)  # weights: rows g*M.. belong to group g


# Split-K arrival counters: one set per device, shared by the GEMMs of every stream, and one per
# stream that reserve_split_counters gave its own (keyed by its handle).
_split_counters: dict = {}
_COUNTERS = 1 << 14


def reserve_split_counters(stream: torch.cuda.Stream) -> None:
    """Give `stream` split-K counters of its own, for GEMMs that may run at the same time as another
    stream's (a model's side stream). Call outside any capture; other streams share one set."""
    with torch.cuda.stream(stream):
        _split_counters[stream.cuda_stream] = torch.zeros(_COUNTERS, dtype=torch.int32, device=stream.device)


def split_k_workspace(splits: int, tokens: int, tile_n: int, rows: int, groups: int, device: torch.device):
    """What a swapped-operand GEMM (kernels.linear.swapped_gemm_sm90) of `groups` x `rows` weight rows
    needs for K splits: fp32 partials [splits, T, groups * rows] (empty without splits) and the
    per-output-tile arrival counters."""
    partials = torch.empty(splits if splits > 1 else 0, tokens, groups * rows, dtype=torch.float32, device=device)
    return partials, _counters(device, rows // 64 * -(-tokens // tile_n) * groups)


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-tile arrival counters for split-K, zeroed once; every launch leaves them at zero."""
    stream = torch.cuda.current_stream(device).cuda_stream
    key = stream if stream in _split_counters else device
    buf = _split_counters.get(key)
    if buf is None or buf.numel() < tiles:
        buf = _split_counters[key] = torch.zeros(max(tiles, _COUNTERS), dtype=torch.int32, device=device)
    return buf


def linear_fp8(x, weight: Fp8BlockWeight, groups: int = 1, plan: tuple | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 block-128 linear on the GPU: x [T, groups*K] -> [T, groups*M] (bf16 or fp32), weight
    [groups*M, K]. x is bf16/fp32 (quantized here) or an already quantized pair from quantize_rows_fp8, so layers that
    read the same input quantize it once. groups > 1 is the block-diagonal projection (wo_a):
    group g reads x[:, g*K:(g+1)*K]. Graph safe (static shapes, no host syncs); compile first,
    outside any capture (one eager call or compile_fp8_kernels)."""
    if not isinstance(weight, Fp8BlockWeight):
        raise TypeError(f"linear_fp8 takes FP8 block-128 weights, got {type(weight).__name__}")
    n_total, k = weight.shape
    t, x_width = (x[0] if isinstance(x, tuple) else x).shape
    if k % FP8_BLOCK or n_total % (64 * groups) or x_width != groups * k:
        raise ValueError(f"linear_fp8: weight {tuple(weight.shape)} (groups={groups}) and x [{t}, {x_width}] do not "
                         f"fit: K must be a multiple of 128, rows per group of 64, x [T, groups*K]")
    xq, xs = x if isinstance(x, tuple) else quantize_rows_fp8(x)
    rows = n_total // groups
    tile_n, stages, splits, consumers = plan or fp8_plan(t, rows, k, groups)
    e8m0 = weight.scale.dtype == torch.float8_e8m0fnu
    kernel = _compiled_fp8_gemm(tile_n, stages, splits, consumers, e8m0, target_arch(xq.device), out_dtype)
    out = torch.empty(t, n_total, dtype=out_dtype, device=xq.device)
    partials, counters = split_k_workspace(splits, t, tile_n, rows, groups, xq.device)
    kernel(_batched(weight.weight, groups, False), _batched(xq, groups, True),
           weight.scale.view(torch.uint8) if e8m0 else weight.scale, _batched(xs, groups, True), out, partials,
           counters)
    return out


def compile_fp8_kernels(max_tokens: int, shapes, device=None) -> None:
    """Warm-up: compile (or load from the disk cache) what linear_fp8 will run for up to `max_tokens`
    tokens on `shapes` ((rows, k, groups, e8m0) per layer), so that CUDA-graph capture compiles nothing."""
    arch = target_arch(device or ("cuda" if torch.cuda.is_available() else None))
    _compiled_quant(arch)
    for rows, k, groups, e8m0 in shapes:
        for t in range(1, max_tokens + 1):
            _compiled_fp8_gemm(*fp8_plan(t, rows // groups, k, groups), e8m0, arch)


# ---------------------------------------------------------------------------------------------
# NVFP4 x NVFP4 (Blackwell)
# ---------------------------------------------------------------------------------------------

def linear_w4a4_ref(x: torch.Tensor, weight: Nvfp4Weight) -> torch.Tensor:
    """The twin of linear_w4a4: x quantized to NVFP4 with the weight's input_scale, fp32 out."""
    if not isinstance(weight, Nvfp4Weight):
        raise TypeError(f"linear_w4a4 takes NVFP4 weights, got {type(weight).__name__}")
    return F.linear(nvfp4_qdq(x.float(), weight.input_scale), weight.dequantize())


def linear_w4a4(x: torch.Tensor, weight: Nvfp4Weight, tile_n: int = 128) -> torch.Tensor:
    """Blackwell runner (COMPILE-VERIFIED ONLY): x bf16 [T, K] -> bf16 [T, N]."""
    from ..w4a4 import blockscaled_matmul, quantize_rows_nvfp4, swizzled
    if not isinstance(weight, Nvfp4Weight):
        raise TypeError(f"linear_w4a4 takes NVFP4 weights, got {type(weight).__name__}")
    n, k = weight.shape
    t, dev = x.shape[0], x.device
    rows = -(-t // tile_n) * tile_n
    row_source = torch.arange(rows, dtype=torch.int32, device=dev)
    row_source = torch.where(row_source < t, row_source, -1)
    tile_group = torch.zeros(rows // tile_n, dtype=torch.int32, device=dev)
    gs = weight.input_scale.float().reshape(1)
    xq, xs = quantize_rows_nvfp4(x, row_source, torch.zeros(rows, device=dev), tile_group, gs, k, tile_n)
    alpha = (gs * weight.weight_scale_2.float()).reshape(1, 1).expand(1, 2).contiguous()
    out = blockscaled_matmul(weight.weight.view(torch.uint8), swizzled(weight.weight_scale), xq, xs,
                             alpha, tile_group, n, k, 1, n, tile_n, out_dtype=torch.bfloat16)
    return out[:t]
