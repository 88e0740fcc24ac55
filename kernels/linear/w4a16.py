"""Dense NVFP4 / MXFP4 linear layers on Hopper (W4A16): a wgmma kernel of their own at 9-32 tokens
(kernels.linear.w4a16_wgmma_sm90), else the MoE's grouped kernels (kernels.moe) with one group per
dense layer, or the block-diagonal wo_a's groups as experts, tiled for a dense weight.

    linear_w4a16(x, weight, groups)      the runner (CuTe DSL, sm_90a and newer)
    linear_w4a16_ref(x, weight, groups)  its pure-torch twin
    dense_plan(tokens, groups, rows, k)  the kernel variant a call runs; dense_variants(): all of them

Activations: with one token tile per pass (the GEMV at one token, the tensor-core kernel at up to
8) the kernels read the layer's own bf16 rows and round them to f16 as they load them, which saves
the kernel that lays them out before each call (kernels.moe.pair_order, a programmatic dependent
launch: 0-1.3 us more per call on an H200). With more tokens per pass every warp would convert them
all for each K block it reads, more work than decoding its weights: there, and for fp32 rows (the
runner model's: twice the bytes for every warp of rows to re-read; 1.3-3.5x slower), pair_order
lays them out first, as it always does for the wgmma kernel (TMA copies them as they lie). H200
runs of both ways on every V4 projection are in bench/NOTES.md. Output: fp32.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..cute_compile import target_arch
from ..formats import MXFP4_BLOCK, NVFP4_BLOCK, Mxfp4Weight, Nvfp4Weight

DENSE_WARPS = {1: 4096, 2: 2048, 4: 2048}  # per token tiles of 8 per pass (more registers each: fewer warps)
MAX_SPLIT = 16         # warps splitting K in one CTA (with one warp of rows: 16 warps)
GEMV_TWO_TOKENS_ROWS = 4096  # up to here two tokens take the GEMV
GEMV_NARROW_ROWS = 3072      # up to here the GEMV takes 2 rows per warp (4 above)
WIDE_CTA_ROW_TILES = 384     # four warps of rows per CTA (sharing activations in L1) from here
MAX_DENSE_TOKENS = 32        # dense_plan's own tiling up to here
MMA_MAX_TOKENS = 8           # the mma.sync kernel up to here, the wgmma kernel above (K % 512 == 0)


def gemv_plan(tokens: int, rows: int, k: int) -> dict:
    """The SIMT GEMV for 1-2 tokens of `rows` (all groups) x k: K split while the launch stays
    within DENSE_WARPS[1] warps and each warp keeps a round of 32 vectors (1024 weights) per row."""
    per_warp = 2 if rows <= GEMV_NARROW_ROWS else 4
    row_warps, rounds = rows // per_warp, k // 1024
    warps_k = 1
    while 2 * warps_k <= min(rounds, 8) and row_warps * 2 * warps_k <= DENSE_WARPS[1]:
        warps_k *= 2
    return dict(kind="gemv", rows=per_warp, k_unroll=1, warps_k=warps_k, n_tiles=tokens)


def mma_plan(tokens: int, row_tiles: int, k: int) -> dict:
    """The tensor-core kernel for 2-32 tokens on `row_tiles` 16-row tiles (all groups) of K = k."""
    n_tiles = 1 if tokens <= 8 else 2 if tokens <= 16 else 4
    k_blocks = k // 128
    warps_k = 1
    while 2 * warps_k <= min(MAX_SPLIT, max(1, k_blocks // 2)) and row_tiles * 2 * warps_k <= DENSE_WARPS[n_tiles]:
        warps_k *= 2
    # Two K blocks per load round where a warp has them, except 4 token tiles over several rounds
    # (their activations' registers crowd out the loads in flight).
    k_unroll = 2 if 2 * warps_k <= k_blocks and (n_tiles < 4 or k_blocks <= 4 * warps_k) else 1
    # Four warps of rows per CTA (sharing activations in L1) where the grid still covers the GPU.
    wide = row_tiles >= WIDE_CTA_ROW_TILES and _four_row_warps_fit(n_tiles, warps_k)
    return dict(kind="mma", n_tiles=n_tiles, k_unroll=k_unroll, warps_k=warps_k, **({} if wide else {"warps_m": 1}))


def _four_row_warps_fit(n_tiles: int, warps_k: int) -> bool:
    """Whether a CTA may hold four warps of rows: it stays within 32 warps (16 with 4 token tiles:
    the K split's shared-memory partials), and not at one token tile with K split 2 or 4, which ran
    9-18% faster with one."""
    return 4 * warps_k <= (16 if n_tiles == 4 else 32) and not (n_tiles == 1 and warps_k in (2, 4))


def dense_plan(tokens: int, groups: int, rows: int, k: int) -> dict:
    """The kernel variant for `tokens` x a dense layer of `groups` of `rows` x `k` (each group seeing
    all tokens): the wgmma kernel's knobs (kind "wgmma"), or kernels.moe's without x_kind."""
    from ..moe import gemm_config
    if tokens == 1 or (tokens == 2 and groups * rows <= GEMV_TWO_TOKENS_ROWS):
        return gemv_plan(tokens, groups * rows, k)
    if tokens <= MMA_MAX_TOKENS or (tokens <= MAX_DENSE_TOKENS and k % 512):
        return mma_plan(tokens, groups * rows // 16, k)
    if tokens <= MAX_DENSE_TOKENS:
        return wgmma_plan(tokens, rows, k, groups)
    return gemm_config(tokens, groups, rows, k)


def dense_variants() -> list[dict]:
    """Every variant dense_plan can return (a superset: each knob's reachable values), for warm-up
    and the compile test."""
    from ..moe import mma_variants
    gemv = [dict(kind="gemv", rows=r, k_unroll=1, warps_k=w, n_tiles=n) for r in (2, 4) for w in (1, 2, 4, 8)
            for n in (1, 2)]
    mma = []
    for n_tiles in (1, 2, 4):
        for warps_k in (1, 2, 4, 8, 16):
            for k_unroll in (1, 2):
                if k_unroll == 1 and warps_k > 1 and n_tiles < 4:
                    continue  # warps_k <= k_blocks / 2: two K blocks per round fit
                for warps_m in (1, 4):
                    if warps_m == 4 and not _four_row_warps_fit(n_tiles, warps_k):
                        continue
                    knobs = dict(kind="mma", n_tiles=n_tiles, k_unroll=k_unroll, warps_k=warps_k)
                    mma.append(knobs if warps_m == 4 else dict(knobs, warps_m=1))  # 4: the kernel's default
    prefill = [dict(kind="mma", **knobs) for knobs in mma_variants()]
    return gemv + mma + [v for v in prefill if v not in mma] + wgmma_variants()


def reads_rows_as_they_are(plan: dict) -> bool:
    """Whether the variant reads x's bf16 rows itself rather than pair_order's f16 activations: with
    one token tile per pass of the MoE's kernels (see the module docstring); never the wgmma kernel."""
    return plan["kind"] != "wgmma" and plan["n_tiles"] == 1


def activation_kinds(plan: dict, x_dtype: torch.dtype | None = None) -> tuple[int, ...]:
    """The x_kind(s) a variant is compiled for: for x of x_dtype, or for every dtype linear_w4a16 takes."""
    from ..moe.w4a16_sm90 import X_BF16, X_ORDERED
    if not reads_rows_as_they_are(plan) or x_dtype == torch.float32:
        return (X_ORDERED,)
    return (X_BF16,) if x_dtype == torch.bfloat16 else (X_ORDERED, X_BF16)


def compile_w4a16_kernels(fmt: str, device=None) -> int:
    """Warm-up: compile (or load from the disk cache) every dense variant for the activation
    formats it reads -> how many."""
    from ..moe import _compiled, compile_layout_kernels
    arch = target_arch(device or ("cuda" if torch.cuda.is_available() else None))
    compile_layout_kernels(arch)
    count = 0
    for knobs in dense_variants():
        if knobs["kind"] == "wgmma":
            _compiled_wgmma(fmt == "nvfp4", arch, **knobs)
            count += 1
            continue
        for x_kind in activation_kinds(knobs):
            _compiled(False, NVFP4_BLOCK if fmt == "nvfp4" else MXFP4_BLOCK, arch, **knobs, x_kind=x_kind)
            count += 1
    return count


WGMMA_TOKEN_TILES = (16, 32)  # the wgmma's N (dense_plan gives it 9-32 tokens)
WGMMA_SPLITS = (1, 2, 4, 8)
WGMMA_ONE_CONSUMER_TILES = 512  # from here one consumer warpgroup per CTA, else two
WGMMA_STAGES = {1: 4, 2: 8}     # ring depth per consumer warpgroups
WGMMA_FEW_CTAS = 64             # K splits fill the GPU up to here, then only with 8+ stages per split


def wgmma_plan(tokens: int, rows: int, k: int, groups: int = 1, sms: int = 132) -> dict:
    """The wgmma kernel (kernels.linear.w4a16_wgmma_sm90) for 9-32 tokens x `groups` of `rows` x k,
    a rule fitted to an H200 sweep of every V4 projection at 8-32 tokens (bench/NOTES.md): K split
    over CTAs up to one wave, while the launch has fewer than WGMMA_FEW_CTAS CTAs (each consumer
    warpgroup keeping a stage per split) or each split keeps 8 stages; one consumer warpgroup per
    CTA on weights of many tiles (smaller CTAs, more of them per SM), two on the rest."""
    tile_n = next(t for t in WGMMA_TOKEN_TILES if t >= tokens)
    tiles, k_stages = rows // 64 * groups, k // 256
    consumers = 1 if tiles >= WGMMA_ONE_CONSUMER_TILES else 2
    splits = 1
    while 2 * splits <= WGMMA_SPLITS[-1] and 2 * splits * tiles <= sms:
        per_split = k_stages // (2 * splits)
        if per_split < 8 and not (tiles * splits < WGMMA_FEW_CTAS and per_split >= consumers):
            break
        splits *= 2
    return dict(kind="wgmma", tile_n=tile_n, stages=WGMMA_STAGES[consumers], splits=splits, consumers=consumers)


def wgmma_variants() -> list[dict]:
    """Every variant wgmma_plan can return."""
    return [dict(kind="wgmma", tile_n=t, stages=WGMMA_STAGES[c], splits=s, consumers=c)
            for t in WGMMA_TOKEN_TILES for s in WGMMA_SPLITS for c in WGMMA_STAGES]


@functools.cache
def _compiled_wgmma(nvfp4: bool, arch: str, *, tile_n: int, stages: int, splits: int, consumers: int,
                    kind: str = "wgmma"):
    """The wgmma kernel per static configuration: a wgmma_plan's knobs (its `kind` included)."""
    import cutlass

    from ..cute_compile import compile_tvm_ffi, fake
    from .w4a16_wgmma_sm90 import w4a16_wgmma
    args = (fake(cutlass.Uint8, None, None, None, order=(1, 0, 2)),    # packed weights (R, K/2, L)
            fake(cutlass.Float16, None, None, None, order=(2, 0, 1)),  # activations (T, K, L)
            fake(cutlass.Uint8, None, None, None, order=(1, 0, 2)),    # scale bytes (R, K/16 or K/32, L)
            fake(cutlass.Float32, None), fake(cutlass.Float32, None, None),
            fake(cutlass.Float32, None, None, None), fake(cutlass.Int32, None))
    return compile_tvm_ffi(w4a16_wgmma, args, (tile_n, stages, splits, consumers, nvfp4))


@functools.lru_cache(maxsize=64)
def _ones(groups: int, device: torch.device) -> torch.Tensor:
    """An MXFP4 weight's global scales, fp32 [groups, 1] (made once: a fill kernel per call would
    add a launch to every layer)."""
    return torch.ones(groups, 1, dtype=torch.float32, device=device)


def _linear_w4a16_wgmma(x: torch.Tensor, weight, groups: int, plan: dict) -> torch.Tensor:
    from ..moe import pair_order
    from ..moe.experts import w4_bytes
    from . import _batched, split_k_workspace
    packed, scales = w4_bytes(weight)
    nvfp4 = isinstance(weight, Nvfp4Weight)
    t = x.shape[0]
    out = torch.empty(t, weight.shape[0], dtype=torch.float32, device=x.device)
    partials, counters = split_k_workspace(plan["splits"], t, plan["tile_n"], weight.shape[0] // groups, groups,
                                           x.device)
    kernel = _compiled_wgmma(nvfp4, target_arch(x.device), **plan)
    kernel(_batched(packed, groups, False), _batched(pair_order(x), groups, True), _batched(scales, groups, False),
           _global_scales(weight, 1, x.device).view(1), out, partials, counters)
    return out


def linear_w4a16_ref(x: torch.Tensor, weight, groups: int = 1) -> torch.Tensor:
    """The twin of linear_w4a16: x rounded to f16 (the kernel's activation format) [T, K] @ dequant(W)^T
    in fp32 -> fp32 [T, N]; groups > 1: the block-diagonal weight, group by group (see linear_w4a16)."""
    if not isinstance(weight, (Nvfp4Weight, Mxfp4Weight)):
        raise TypeError(f"linear_w4a16 takes NVFP4 or MXFP4 weights, got {type(weight).__name__}")
    x, w = x.half().float(), weight.dequantize()
    k, r = w.shape[1], w.shape[0] // groups
    return torch.cat([F.linear(x[:, g * k:(g + 1) * k], w[g * r:(g + 1) * r]) for g in range(groups)], dim=-1)


@functools.lru_cache(maxsize=64)
def _groups_as_experts(tokens: int, groups: int, device: torch.device):
    """How the MoE kernels see a dense (grouped) layer: group g is "expert" g, holding every token;
    its input and output rows are t * groups + g of the [T * groups, K] view of x and of y. Built
    with fill kernels (no host copies, so a first call inside a capture works too) once per shape.
    -> (Dispatch, route weights (unused by the ungated kernel, read anyway))."""
    from ..moe.routing import Dispatch
    rows = torch.arange(tokens * groups, dtype=torch.int32, device=device)
    slots = rows.view(tokens, groups).t().contiguous().view(-1)  # group-major, token order within a group
    d = Dispatch(slots, torch.arange(groups, dtype=torch.int32, device=device),
                 torch.arange(0, (groups + 1) * tokens, tokens, dtype=torch.int32, device=device),
                 torch.full((1,), groups, dtype=torch.int32, device=device))
    return d, torch.ones(tokens * groups, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=256)
def _group_scales(weight_scale_2: torch.Tensor, groups: int) -> torch.Tensor:
    """An NVFP4 weight's global scale once per group, fp32 [groups, 1], made once per weight (a copy
    per call would add a kernel to every wo_a; weights do not change after loading)."""
    return weight_scale_2.float().reshape(1, 1).expand(groups, 1).contiguous()


def _global_scales(weight, groups: int, device: torch.device) -> torch.Tensor:
    """The kernels' global scale per group, fp32 [groups, 1]: NVFP4's weight_scale_2, MXFP4's 1."""
    return _group_scales(weight.weight_scale_2, groups) if isinstance(weight, Nvfp4Weight) else _ones(groups, device)


def _check_shapes(x: torch.Tensor, weight, groups: int) -> None:
    (n, k), t = weight.shape, x.shape[0]
    if x.shape[1] != groups * k or n % groups:
        raise ValueError(f"linear_w4a16: x [{t}, {x.shape[1]}] and weight [{n}, {k}] do not make {groups} groups")
    if k % 128 or n // groups % 64:
        raise ValueError(f"linear_w4a16: weight [{n}, {k}] in {groups} groups needs K % 128 == 0 and rows per "
                         "group % 64 == 0")


def w4a16_launch_args(x: torch.Tensor, weight, groups: int = 1):
    """The grouped kernels' operands for a dense layer (before the 16-byte vector views): x rows
    [T * G, K], packed weight [G, R, K/2], scale bytes [G, R, K/block], the groups' global scales
    [G, 1], route weights, Dispatch. Views of the checkpoint's bytes."""
    from ..moe.experts import w4_bytes
    _check_shapes(x, weight, groups)
    (n, k), t = weight.shape, x.shape[0]
    r = n // groups
    packed, scales = w4_bytes(weight)
    d, route_w = _groups_as_experts(t, groups, x.device)
    return (x.reshape(t * groups, k), packed.view(groups, r, -1), scales.view(groups, r, -1),
            _global_scales(weight, groups, x.device), route_w, d)


def linear_w4a16(x: torch.Tensor, weight, groups: int = 1, kernel: dict | None = None) -> torch.Tensor:
    """Dense W4A16 on the GPU: x bf16 or fp32 [T, G*K], weight NVFP4/MXFP4 [N, K] (groups == 1) or
    the block-diagonal [G*R, K] (wo_a: group g reads x[:, g*K:(g+1)*K] and writes y[:, g*R:(g+1)*R])
    -> fp32 [T, N]. One launch of the MoE's ungated kernel with the groups as experts (after
    pair_order's layout of x where the module docstring says); `kernel`: its variant (kernels.moe's
    knobs, as `dense_plan` returns them, which picks it by default). Graph safe (static shapes, no host syncs); compile first outside any capture (one
    eager call, or compile_w4a16_kernels)."""
    from ..moe import _compiled, _vecs, pair_order  # CuTe DSL is needed only here
    from ..moe.w4a16_sm90 import X_ORDERED
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"linear_w4a16: x must be bfloat16 or float32, got {x.dtype}")
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernels load 16-byte vectors
        x = x.clone()
    plan = kernel or dense_plan(x.shape[0], groups, weight.shape[0] // groups, weight.shape[1])
    if plan["kind"] == "wgmma":
        _check_shapes(x, weight, groups)
        return _linear_w4a16_wgmma(x, weight, groups, plan)
    x_rows, packed, scales, gscale, route_w, d = w4a16_launch_args(x, weight, groups)
    (rows_in, k), r = x_rows.shape, packed.shape[1]
    out = torch.empty(rows_in, r, dtype=torch.float32, device=x.device)  # rows t * G + g: [T, G * R]
    group = NVFP4_BLOCK if isinstance(weight, Nvfp4Weight) else MXFP4_BLOCK
    x_kind, = activation_kinds(plan, x.dtype)
    x_vecs = _vecs(pair_order(x_rows) if x_kind == X_ORDERED else x_rows)
    kernel = _compiled(False, group, target_arch(x.device), **plan, x_kind=x_kind)
    kernel(x_vecs, _vecs(packed), scales, gscale, route_w,
           d.sorted_slots, d.active_experts, d.active_start, d.num_active, out)
    return out.view(x.shape[0], groups * r)
