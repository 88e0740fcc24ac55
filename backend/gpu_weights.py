"""Weight preparation for the GPU model (backend.gpu_model), in the checkpoint's formats: routed
experts stacked per layer, and linears that read the same input stacked into one weight."""
from __future__ import annotations

import re

import torch

from kernels.formats import FP8_BLOCK, Fp8BlockWeight
from kernels.moe import stack_experts

_EXPERT = re.compile(r"^(.*ffn\.)experts\.(\d+)\.(w[123])$")
# Linears that read the same input, run as one GEMM on their stacked rows (names under a layer's
# prefix): a small FP8 GEMM costs ~5 us of launch and ramp-up beyond its bytes, and its input
# quantization another launch (bench/NOTES.md), so one GEMM of both is cheaper than two.
SAME_INPUT_LINEARS = (("attn.wq_a", "attn.wkv"), ("ffn.shared_experts.w1", "ffn.shared_experts.w3"))


def stack_rows(weights: list):
    """One weight with the rows of `weights` in order (a bit-preserving copy), or None where the
    format cannot stack them: FP8 block-128 with whole 128-row blocks and one scale dtype (other
    formats carry a per-tensor scale or are not stacked)."""
    if not all(isinstance(w, Fp8BlockWeight) for w in weights):
        return None
    if any(w.weight.shape[0] % FP8_BLOCK or w.scale.dtype != weights[0].scale.dtype or
           w.weight.shape[1] != weights[0].weight.shape[1] for w in weights):
        return None
    return Fp8BlockWeight(torch.cat([w.weight for w in weights]), torch.cat([w.scale for w in weights]))


def split_experts(weights: dict) -> tuple[dict, dict]:
    """-> (weights without routed experts, {"layers.L.ffn.": StackedExperts})."""
    rest, per_layer = {}, {}
    for name, w in weights.items():
        m = _EXPERT.match(name)
        if m:
            per_layer.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = w
        else:
            rest[name] = w
    stacks = {prefix: stack_experts([(e[i]["w1"], e[i]["w2"], e[i]["w3"]) for i in sorted(e)], f"{prefix}experts")
              for prefix, e in per_layer.items()}
    return rest, stacks
