"""Routed experts stacked for the grouped runners, and the MoE torch twin (the spec).

`stack_experts` is the one-time, bit-preserving re-layout allowed at load: per-expert tensors are
copied into [E, ...] stacks, w1 and w3 concatenated along N (w1 rows first). Bytes and scales are
copied unchanged; each half keeps its own global scale (NVIDIA's release shares one per expert).
`unstack` gives the per-expert containers back, byte for byte (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import MXFP4_BLOCK, NVFP4_BLOCK, Mxfp4Weight, Nvfp4Weight
from .routing import dispatch


@dataclass
class StackedExperts:
    fmt: str            # "nvfp4" | "mxfp4"
    w13: torch.Tensor   # uint8 [E, 2I, D/2]  packed E2M1, w1 rows then w3 rows
    s13: torch.Tensor   # uint8 [E, 2I, D/G]  block scale bytes (E4M3 for NVFP4, E8M0 for MXFP4)
    g13: torch.Tensor   # fp32  [E, 2]        global scale of the w1 half and of the w3 half
    w2: torch.Tensor    # uint8 [E, D, I/2]
    s2: torch.Tensor    # uint8 [E, D, I/G]
    g2: torch.Tensor    # fp32  [E]
    # NVFP4 `input_scale`s (W4A4 activation calibration; ones for MXFP4): of x (w1/w3, the larger
    # if they differ, so neither saturates earlier than calibrated) and of h (w2).
    a13: torch.Tensor | None = None  # fp32 [E]
    a2: torch.Tensor | None = None   # fp32 [E]

    @property
    def group(self) -> int:
        return NVFP4_BLOCK if self.fmt == "nvfp4" else MXFP4_BLOCK

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden(self) -> int:
        return self.w13.shape[2] * 2

    @property
    def inter(self) -> int:
        return self.w13.shape[1] // 2

    def to(self, device) -> "StackedExperts":
        return StackedExperts(self.fmt, *(None if t is None else t.to(device)
                                          for t in (self.w13, self.s13, self.g13, self.w2, self.s2, self.g2, self.a13, self.a2)))


def w4_bytes(w) -> tuple[torch.Tensor, torch.Tensor]:
    """An NVFP4/MXFP4 weight's (packed bytes uint8, block scale bytes uint8), views of its tensors."""
    if isinstance(w, Nvfp4Weight):
        return w.weight.view(torch.uint8), w.weight_scale.view(torch.uint8)
    if isinstance(w, Mxfp4Weight):
        return w.weight.view(torch.uint8), w.scale.view(torch.uint8)
    raise TypeError(f"W4A16 weights must be NVFP4 or MXFP4, got {type(w).__name__}")


def w4_parts(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w4_bytes and the global scale, an fp32 scalar (MXFP4: a new 1, made by a fill kernel)."""
    packed, scales = w4_bytes(w)
    if isinstance(w, Nvfp4Weight):
        return packed, scales, w.weight_scale_2.float().reshape(())
    return packed, scales, torch.ones((), device=w.weight.device)


MXFP4_MAX_SCALE_BYTE = 128  # E8M0 2^1: the tensor-core runner folds scales into f16 weights exactly up to here


def check_mxfp4_scales(name: str, scale_bytes: torch.Tensor) -> None:
    """The Hopper W4A16 tensor-core runner multiplies E2M1 x E8M0 in f16, exact for scales up to
    2^1 (|weight| <= 12); real MXFP4 expert weights sit far below. Larger ones fail here, once at load."""
    top = int(scale_bytes.max())
    if top > MXFP4_MAX_SCALE_BYTE:
        raise ValueError(f"{name}: MXFP4 block scale 2^{top - 127} is above 2^1, outside the W4A16 runner's "
                         f"exact range")


def stack_experts(experts: list[tuple], name: str = "experts") -> StackedExperts:
    """experts: [(w1, w2, w3)] per expert, all NVFP4 or all MXFP4 containers; `name` prefixes
    tensor names in errors (e.g. "layers.3.ffn.experts")."""
    kinds = {type(w) for trio in experts for w in trio}
    if len(kinds) != 1:
        raise ValueError(f"all routed experts must share one format, got {sorted(k.__name__ for k in kinds)}")
    fmt = "nvfp4" if kinds == {Nvfp4Weight} else "mxfp4"
    w13, s13, g13, w2, s2, g2, a13, a2 = [], [], [], [], [], [], [], []
    input_scale = lambda w: w.input_scale.float().reshape(()) if fmt == "nvfp4" else torch.ones((), device=w.weight.device)
    for w1, w2_, w3 in experts:
        (a, sa, ga), (b, sb, gb), (c, sc, gc) = w4_parts(w1), w4_parts(w3), w4_parts(w2_)
        w13.append(torch.cat([a, b]))
        s13.append(torch.cat([sa, sb]))
        g13.append(torch.stack([ga, gb]))
        w2.append(c)
        s2.append(sc)
        g2.append(gc)
        a13.append(torch.maximum(input_scale(w1), input_scale(w3)))
        a2.append(input_scale(w2_))
    stacked = StackedExperts(fmt, torch.stack(w13), torch.stack(s13), torch.stack(g13), torch.stack(w2),
                             torch.stack(s2), torch.stack(g2), torch.stack(a13), torch.stack(a2))
    if fmt == "mxfp4":
        for e, trio in enumerate(experts):
            for w, q in zip(("w1", "w2", "w3"), trio):
                check_mxfp4_scales(f"{name}.{e}.{w}.scale", q.scale.view(torch.uint8))
    return stacked


def unstack(stacked: StackedExperts, e: int):
    """Expert e's (w1, w2, w3) containers, views of the stacks."""
    i = stacked.inter
    if stacked.fmt == "nvfp4":
        f8 = torch.float8_e4m3fn
        one = torch.ones((), device=stacked.g2.device)
        make = lambda w, s, g: Nvfp4Weight(w, s.view(f8), g, one)
        return (make(stacked.w13[e, :i], stacked.s13[e, :i], stacked.g13[e, 0]),
                make(stacked.w2[e], stacked.s2[e], stacked.g2[e]),
                make(stacked.w13[e, i:], stacked.s13[e, i:], stacked.g13[e, 1]))
    e8 = torch.float8_e8m0fnu
    make = lambda w, s: Mxfp4Weight(w.view(torch.int8), s.view(e8))
    return (make(stacked.w13[e, :i], stacked.s13[e, :i]), make(stacked.w2[e], stacked.s2[e]),
            make(stacked.w13[e, i:], stacked.s13[e, i:]))


def expert_runs(experts: torch.Tensor, stacked: StackedExperts):
    """For every expert some (token, k) slot picked: (expert, its slots, dequantized (w1, w2, w3))."""
    d = dispatch(experts, stacked.num_experts)
    for j in range(int(d.num_active)):
        e = int(d.active_experts[j])
        slots = d.sorted_slots[int(d.active_start[j]):int(d.active_start[j + 1])].long()
        yield e, slots, tuple(w.dequantize() for w in unstack(stacked, e))


def clamped_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, route_w: torch.Tensor,
                   limit: float) -> torch.Tensor:
    """route_w * silu(min(x W1^T, limit)) * clamp(x W3^T, +-limit): the routed expert's L1."""
    gate = (x @ w1.T).clamp(max=limit)
    up = (x @ w3.T).clamp(-limit, limit)
    return route_w * torch.nn.functional.silu(gate) * up


def slot_outputs(y: torch.Tensor, t: int, k: int, sum_slots: bool) -> torch.Tensor:
    """A MoE runner's result from its (token, k) slots' rows y [T*k, D]: each token's k slots
    summed in order k = 0..K-1 -> [T, D], or (sum_slots False) the slots themselves [T, k, D]."""
    return y.view(t, k, -1).sum(1) if sum_slots else y.view(t, k, -1)


def moe_w4a16_ref(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, stacked: StackedExperts,
                  swiglu_limit: float, sum_slots: bool = True) -> torch.Tensor:
    """The spec of the routed-expert MoE (W4A16). x: [T, D] (bf16 or fp32), rounded to fp16 (the
    runners' activation format); weights fp32 [T, k]; experts [T, k]. Per (token, k) slot:
    h = w * silu(min(x W1^T, limit)) * clamp(x W3^T, +-limit), rounded to fp16 (the runners keep h
    in fp16), y = h W2^T in fp32; the output sums a token's k slots in order k = 0..K-1.
    -> fp32 [T, D] (sum_slots False: [T, k, D], the slots' outputs before that sum)."""
    t, k = experts.shape
    y = torch.zeros(t * k, stacked.hidden, dtype=torch.float32, device=x.device)
    for _, slots, (w1, w2, w3) in expert_runs(experts, stacked):
        h = clamped_swiglu(x[slots // k].half().float(), w1, w3, weights.reshape(-1)[slots, None], swiglu_limit).half()
        y[slots] = h.float() @ w2.T
    return slot_outputs(y, t, k, sum_slots)
