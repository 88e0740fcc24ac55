"""Routed-expert MoE in W4A16 (NVFP4 or MXFP4 weights, BF16 activations).

    moe_w4a16(x, weights, experts, stacked, swiglu_limit)      CuTe DSL runner (sm_90a and newer)
    moe_w4a16_ref(x, weights, experts, stacked, swiglu_limit)  the pure-torch twin (the spec)

Both return fp32 [T, D]. The runner groups slots by expert on the device in one kernel
(`dispatch_fused`, the same result as the twin's `routing.dispatch` up to the order of slots within
an expert, which no output depends on). It runs the L1 kernel (w1||w3, clamped SwiGLU, routing
weight) into an FP16 intermediate per (token, k) slot, then the L2 kernel (w2), and sums each
token's k slots in order. Two kernels compute L1/L2, chosen by the expected tokens per expert
(`gemm_config`): a SIMT grouped GEMV (`w4a16_sm90`) up to 1.25, the tensor-core grouped GEMM
(`w4a16_mma_sm90`, mma.sync on exactly scaled f16 weights) above. No host syncs and static
launch shapes, so it captures into CUDA graphs.
Kernels compile once per static configuration (format, top-k, limit, experts) for any token
count, and are cached in memory and on disk (kernels.cute_compile, CUTE_DSL_CACHE_DIR). Call
`compile_kernels` (or run once eagerly) before capturing a graph: compiling cannot happen inside
a capture.
"""
from __future__ import annotations

import functools
import itertools

import torch

from ..cute_compile import compile_tvm_ffi, fake, target_arch
from .experts import StackedExperts, moe_w4a16_ref, slot_outputs, stack_experts, unstack
from .routing import Dispatch, dispatch, route_hash, route_topk

__all__ = ["moe_w4a16", "moe_w4a16_ref", "StackedExperts", "stack_experts", "unstack", "dispatch", "Dispatch",
           "route_topk", "route_hash", "compile_kernels", "dispatch_fused", "pair_order", "pair_order_ref"]


def _compiled(gated: bool, group: int, arch: str, kind: str = "mma", n_tiles: int = 1, k_unroll: int = 2,
              warps_k: int = 1, top_k: int = 1, swiglu_limit: float = 0.0, warps_m: int = 4,
              min_ctas: int = 0, split_halves: bool = False, rows: int = 0, x_kind: int = 0,
              pipelined: bool = False, prefetch_rounds: int = 1):
    """One compiled grouped GEMM per static configuration; every size is a runtime value.
    kind "gemv": the SIMT kernel (kernels.moe.w4a16_sm90), for about one token per expert; its
    knobs: `rows` per warp (0: GEMV_L1's / GEMV_L2's), `n_tiles` tokens per pass over the weights,
    `k_unroll` 16-byte vectors per row and lane loaded per round, `warps_k` and `warps_m`,
    `pipelined`: the next round's loads issued before a round's products, and for the ungated
    kernel `prefetch_rounds`: each warp's first rounds of weights hinted into L2 before it waits
    for the kernel before.
    kind "mma": the tensor-core kernel (kernels.moe.w4a16_mma_sm90); its knobs: token tiles of 8
    per pass over the weights, 128-wide K blocks per load round, warps splitting K and warps
    splitting rows per CTA, a register bound of `min_ctas` CTAs per SM (0: none; `register_bound`
    gives the default), and for L1 whether w1 and w3 rows go to separate warps (`split_halves`, not
    with K splitting). top_k and swiglu_limit matter to L1 (gated) only. x_kind: the activations'
    format (w4a16_sm90.X_ORDERED: pair_order's, which the MoE uses; X_BF16: a dense layer's bf16 rows)."""
    if not gated:
        top_k, swiglu_limit, split_halves = 1, 0.0, False  # one compiled L2 serves every MoE and dense layer
    else:
        prefetch_rounds = 0  # L1 prefetches nothing (its input comes from the kernel just before)
    if split_halves and warps_k != 1:
        raise ValueError("split_halves and K splitting (warps_k > 1) do not combine")
    if kind == "gemv":
        rows = rows or (GEMV_L1 if gated else GEMV_L2)["rows"]
        knobs = (warps_m, warps_k, rows, n_tiles, k_unroll, x_kind, pipelined, prefetch_rounds)
    elif pipelined:
        raise ValueError("pipelined is a knob of the GEMV (kind 'gemv') only")
    else:
        knobs = (warps_m, warps_k, n_tiles, k_unroll, min_ctas, split_halves, x_kind)
    return _compile_variant(kind, (top_k, group, gated, float(swiglu_limit)), knobs, arch)


@functools.cache
def _compile_variant(kind: str, common: tuple, knobs: tuple, arch: str):
    """Cached per variant however the caller spelled its arguments (arch keys the cache only)."""
    import cutlass

    from . import w4a16_mma_sm90, w4a16_sm90

    gated = common[2]
    args = (fake(cutlass.Int32, None, None, 4), fake(cutlass.Int32, None, None, None, 4), fake(cutlass.Uint8, None, None, None),
            fake(cutlass.Float32, None, 2 if gated else 1), fake(cutlass.Float32, None), fake(cutlass.Int32, None),
            fake(cutlass.Int32, None), fake(cutlass.Int32, None), fake(cutlass.Int32, 1),
            fake(cutlass.Float16 if gated else cutlass.Float32, None, None))
    entry = w4a16_sm90.grouped_gemv if kind == "gemv" else w4a16_mma_sm90.grouped_mma
    return compile_tvm_ffi(entry, args, (*common, *knobs))


GEMV_MAX_TOKENS = 1.25  # per expert: up to here the SIMT kernel is faster (H200 sweep, bench/NOTES.md)
# The GEMV's tiling (rows per warp: L1's are w1/w3 pairs; 16-byte vectors per row and lane loaded
# per round; L1 loads a round ahead: 14% less at one token, within 2% at 4-16), from
# `python -m bench.moe_tiles --gemv` on an H200 (bench/NOTES.md).
GEMV_L1 = dict(rows=2, k_unroll=1, pipelined=True)
GEMV_L2 = dict(rows=4, k_unroll=1)
MEMORY_WARPS = 132 * 16  # a streaming launch with fewer warps leaves an H100/H200's memory idle
N_TILE_CHOICES = (1, 2, 4)
K_UNROLL_CHOICES = (1, 2)
SPLIT_K_WARPS = 4
# The ungated (L2, dense) kernel needs 62 registers; bounded to 6 CTAs of 4 warps per SM (85), ptxas
# keeps more loads in flight: -9% / -10% at T = 32 / 128 on an H200 (bench/NOTES.md). The gated
# L1 kernel (116 registers) spills under any bound, more token tiles need more registers, and
# K-split CTAs (16 warps) fit only 2 per SM.
L2_MIN_CTAS = 6
# The gated L1 kernel with both halves (w1, w3) of a 16-row group in one warp needs 116 registers
# and spills under any bound. With the halves in two warps of an 8-warp CTA (the w3 warp hands its
# sums over in shared memory) and a bound of 3 CTAs per SM (80 registers), L1 takes 19% less at
# T = 128 and the whole MoE 11-17% less at T = 32 / 128 on an H200 (bench/NOTES.md). Only with one
# token tile: with 2 or 4 the bound spills (40 / 64 bytes of stack) and the MoE was 10-18% slower
# at T = 512 / 2048. Not with K splitting. bench.moe_w4a16 --l1-halves joined measures the other way.
L1_SPLIT_HALVES = True
L1_MIN_CTAS = 3
FEW_ROW_TILES = 132 * 4  # fewer (expert, 16-row) tiles than this leave an H100/H200's memory idle


def expected_active_experts(tokens: int, top_k: int, num_experts: int) -> float:
    """Distinct experts a batch picks under uniform routing: E (1 - (1 - k/E)^T). The kernel
    variant is chosen from it on the host (the real count lives on the device)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def gemm_config(tokens_per_group: float, groups: int, rows: int, k: int, gated: bool = False) -> dict:
    """The compiled variant for one launch: `groups` (expert) GEMMs of [rows, k] weights, each
    with about `tokens_per_group` tokens (static per CUDA graph: it follows from the batch size);
    gated: the L1 kernel (w1||w3 and the SwiGLU)."""
    if tokens_per_group <= GEMV_MAX_TOKENS:
        return gemv_knobs(groups * rows, k, gated)
    # enough token tiles of 8 for the expected tokens (more passes re-read the weights; more
    # tiles spend registers and MMAs on absent tokens)
    n_tiles = next((n for n in N_TILE_CHOICES if 8 * n >= tokens_per_group), N_TILE_CHOICES[-1])
    # split K between warps only when the launch has too few row tiles to fill the GPU
    warps_k = SPLIT_K_WARPS if groups * rows / 16 < FEW_ROW_TILES else 1
    return dict(kind="mma", **_mma_knobs(n_tiles, 2 if k % 256 == 0 else 1, warps_k, gated))


def split_k_warps(row_warps: float, rounds: int) -> int:
    """How many warps (1 to 8, a power of two) should split each row's K in a streaming launch of
    `row_warps` warps' worth of rows with `rounds` rounds of 32 vectors per row: enough for
    MEMORY_WARPS warps in all, each keeping at least one round. The SIMT GEMV and linear_f32 use it."""
    warps_k = 1
    while row_warps * warps_k < MEMORY_WARPS and 2 * warps_k <= min(rounds, 8):
        warps_k *= 2
    return warps_k


def gemv_knobs(rows: int, k: int, gated: bool = False) -> dict:
    """The GEMV variant for `rows` weight rows (all groups) of K = k: the default tiling, and with
    too few rows to fill the memory (a small dense weight) K split between warps of a CTA
    (split_k_warps), one round of 32 vectors per row each."""
    knobs = dict(kind="gemv", **(GEMV_L1 if gated else GEMV_L2))
    warps_k = split_k_warps(rows // knobs["rows"], k // (32 * 32))
    if warps_k > 1:
        knobs.update(warps_k=warps_k, k_unroll=1)
    return knobs


def gemv_variants(gated: bool = False):
    """Every GEMV variant gemv_knobs can return (K splitting: ungated only)."""
    base = dict(kind="gemv", **(GEMV_L1 if gated else GEMV_L2))
    if gated:
        return [base]
    return [base] + [dict(base, warps_k=w, k_unroll=1) for w in (2, 4, 8)]


def register_bound(gated: bool, n_tiles: int, warps_k: int, split_halves: bool) -> int:
    """The CTAs per SM ptxas is told to fit (0: no bound) for a tensor-core variant: L2 and L1 with
    split halves, one token tile and no K splitting (see L2_MIN_CTAS, L1_MIN_CTAS)."""
    if n_tiles != 1 or warps_k != 1:
        return 0
    if gated:
        return L1_MIN_CTAS if split_halves else 0
    return L2_MIN_CTAS


def _mma_knobs(n_tiles: int, k_unroll: int, warps_k: int, gated: bool) -> dict:
    split = gated and L1_SPLIT_HALVES and warps_k == 1 and n_tiles == 1
    knobs = dict(n_tiles=n_tiles, k_unroll=k_unroll, warps_k=warps_k)
    if split:
        knobs.update(split_halves=True)
    bound = register_bound(gated, n_tiles, warps_k, split)
    if bound:
        knobs.update(min_ctas=bound)
    return knobs


def mma_variants(gated: bool = False):
    """Every tensor-core variant gemm_config can return."""
    return [_mma_knobs(n, u, w, gated)
            for n, u, w in itertools.product(N_TILE_CHOICES, K_UNROLL_CHOICES, (1, SPLIT_K_WARPS))]


def moe_kernels(stacked: StackedExperts, tokens: int, top_k: int, swiglu_limit: float, arch: str):
    """The compiled (L1, L2) kernels moe_w4a16 runs for a batch of `tokens` on these experts."""
    active = expected_active_experts(tokens, top_k, stacked.num_experts)
    per_expert = tokens * top_k / active
    l1 = _compiled(True, stacked.group, arch, **gemm_config(per_expert, active, stacked.inter, stacked.hidden, gated=True),
                   top_k=top_k, swiglu_limit=swiglu_limit)
    l2 = _compiled(False, stacked.group, arch, **gemm_config(per_expert, active, stacked.hidden, stacked.inter))
    return l1, l2


@functools.cache
def _compiled_dispatch(num_experts: int, arch: str):
    import cutlass

    from .dispatch_sm90 import THREADS, dispatch_launch
    if num_experts > THREADS:
        raise ValueError(f"dispatch: at most {THREADS} experts (one thread each), got {num_experts}")
    args = (fake(cutlass.Int64, None), fake(cutlass.Int32, None), fake(cutlass.Int32, None),
            fake(cutlass.Int32, None), fake(cutlass.Int32, 1))
    return compile_tvm_ffi(dispatch_launch, args, (num_experts,))


def dispatch_fused(experts: torch.Tensor, num_experts: int) -> Dispatch:
    """kernels.moe.routing.dispatch in one kernel launch (slot order within an expert is arbitrary)."""
    t, k = experts.shape
    n, a = t * k, min(num_experts, t * k)
    dev = experts.device
    d = Dispatch(torch.empty(n, dtype=torch.int32, device=dev), torch.empty(a, dtype=torch.int32, device=dev),
                 torch.empty(a + 1, dtype=torch.int32, device=dev), torch.empty(1, dtype=torch.int32, device=dev))
    _compiled_dispatch(num_experts, target_arch(dev))(experts.reshape(-1).to(torch.int64), d.sorted_slots,
                                                d.active_experts, d.active_start, d.num_active)
    return d


def compile_kernels(fmt: str, top_k: int, swiglu_limit: float, device=None, num_experts: int | None = None) -> None:
    """Warm-up: compile (or load from the disk cache) every kernel variant a call may pick, before
    any CUDA-graph capture."""
    group = 16 if fmt == "nvfp4" else 32
    arch = target_arch(device or ("cuda" if torch.cuda.is_available() else None))
    for gated in (True, False):
        for knobs in gemv_variants(gated):
            _compiled(gated, group, arch, top_k=top_k, swiglu_limit=swiglu_limit, **knobs)
        for knobs in mma_variants(gated):
            _compiled(gated, group, arch, "mma", top_k=top_k, swiglu_limit=swiglu_limit, **knobs)
    compile_layout_kernels(arch)
    if num_experts is not None:
        _compiled_dispatch(num_experts, arch)


def compile_layout_kernels(arch: str) -> None:
    """pair_order's kernel for bf16 and fp32 activations."""
    from .w4a16_sm90 import X_BF16, X_F32
    for x_kind in (X_BF16, X_F32):
        _compiled_layout(x_kind, arch)


def pair_order_ref(x: torch.Tensor) -> torch.Tensor:
    """Activations [T, D] (bf16 or fp32, D % 128 == 0) as f16 in the W4A16 kernels' activation
    order. Within each 8: pairs (0,4),(1,5),(2,6),(3,7), which the E2M1 pair decode produces. Within
    each 128-wide K block, whose four 32-wide chunks t go to the lanes t = lane % 4, vector w of
    chunk t sits at 4w + t, so the four lanes of a token read 64 contiguous bytes per load."""
    t, d = x.shape
    out = torch.empty(t, d, dtype=torch.float16, device=x.device)
    # logical (block, chunk t, vector w, half h, j) -> physical (block, w, t, j, h): one permute + convert
    out.view(t, d // 128, 4, 4, 4, 2).copy_(x.view(t, d // 128, 4, 4, 2, 4).permute(0, 1, 3, 2, 5, 4))
    return out


@functools.cache
def _compiled_layout(x_kind: int, arch: str):
    import cutlass

    from .layout_sm90 import layout_launch
    return compile_tvm_ffi(layout_launch, (fake(cutlass.Int32, None, None, 4), fake(cutlass.Int32, None, None, 4)),
                           (x_kind,))


def pair_order(x: torch.Tensor) -> torch.Tensor:
    """pair_order_ref's layout (its twin, bit for bit): on a Hopper or newer GPU one kernel
    (kernels.moe.layout_sm90) for bf16 or fp32 x, a programmatic dependent launch; else torch.
    Graph safe; compile first outside any capture (compile_kernels, or one eager call)."""
    from .w4a16_sm90 import X_BF16, X_F32
    if not (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9 and x.dtype in (torch.bfloat16, torch.float32)
            and x.is_contiguous() and x.data_ptr() % 16 == 0 and x.dim() == 2 and x.shape[1] % 128 == 0):
        return pair_order_ref(x)
    out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    kernel = _compiled_layout(X_BF16 if x.dtype == torch.bfloat16 else X_F32, target_arch(x.device))
    kernel(_vecs(x), _vecs(out))
    return out


def activation_position(n):
    """Where logical K index n >= 0 sits in the activation order of `pair_order` (L1's epilogue
    writes h there for L2). Branch-free integer ops, so it runs on ints, torch tensors and CuTe DSL
    Int32 alike: chunk t (bits 5-6) and vector w (bits 3-4) trade places; element e of an 8 goes to
    2e for e < 4, 2e - 7 above."""
    e = n & 7
    return (n & -128) | (((n >> 3) & 3) << 5) | (((n >> 5) & 3) << 3) | (2 * e - 7 * (e >> 2))


def _vecs(t: torch.Tensor) -> torch.Tensor:
    """[..., K] bf16 or packed-FP4 bytes -> int32 [..., K', 4]: 16-byte vectors for the kernels."""
    words = t.view(torch.int32)
    return words.view(*words.shape[:-1], words.shape[-1] // 4, 4)


def moe_w4a16(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, stacked: StackedExperts,
              swiglu_limit: float, sum_slots: bool = True, x_ordered: torch.Tensor | None = None) -> torch.Tensor:
    """x: bf16 or fp32 [T, D]; weights: fp32 [T, k]; experts: int [T, k] -> fp32 [T, D] (see moe_w4a16_ref;
    sum_slots False: [T, k, D], each slot's output, for a caller that fuses their sum with its own work).
    Activations are converted to f16 (which holds BF16 activations exactly within +-65504) in the
    kernels' order: x_ordered, if the caller made pair_order(x) already (beside the routing, on
    another stream), else here. Both kernels (see `moe_kernels`) take inner products in f16 and
    accumulate in fp32."""
    t, k = experts.shape
    if x.dtype not in (torch.bfloat16, torch.float32) or not x.is_contiguous():
        raise ValueError(f"moe_w4a16: x must be a contiguous bfloat16 or float32 tensor [T, D], got {x.dtype}")
    if x_ordered is not None and (x_ordered.dtype != torch.float16 or x_ordered.shape != x.shape):
        raise ValueError(f"moe_w4a16: x_ordered must be pair_order(x), float16 {tuple(x.shape)}, got "
                         f"{x_ordered.dtype} {tuple(x_ordered.shape)}")
    if stacked.hidden % 128 or stacked.inter % 128:
        raise ValueError("moe_w4a16: hidden and intermediate sizes must be multiples of 128")
    arch = target_arch(x.device)
    d = dispatch_fused(experts, stacked.num_experts)
    route_w = weights.reshape(-1).float().contiguous()
    h = torch.empty(t * k, stacked.inter, dtype=torch.float16, device=x.device)
    y = torch.empty(t * k, stacked.hidden, dtype=torch.float32, device=x.device)
    common = (d.sorted_slots, d.active_experts, d.active_start, d.num_active)
    l1, l2 = moe_kernels(stacked, t, k, swiglu_limit, arch)
    x_ordered = pair_order(x) if x_ordered is None else x_ordered
    l1(_vecs(x_ordered), _vecs(stacked.w13), stacked.s13, stacked.g13, route_w, *common, h)
    l2(_vecs(h), _vecs(stacked.w2), stacked.s2, stacked.g2.view(-1, 1), route_w, *common, y)
    return slot_outputs(y, t, k, sum_slots)
