"""DeepSeek-V4 on the kernel runners: the reference model (backend.model) with every quantized
linear, the grouped wo_a and the routed experts running on the device's runners
(kernels.dispatch: sm_90a CuTe DSL kernels on Hopper), and a decode step without host syncs, so
it captures into a CUDA graph (backend.engine.cuda_graphs).

What stays as in the reference (torch ops, fp32 math, all capturable): mHC, norms, RoPE, the
compressors, the indexer, sparse attention over the ring and the compressed entries, routing and
the small BF16 linears. The head stays BF16 (cuBLAS). Activations stay fp32 into the runners: the
FP8 quantizer reads them directly, the W4A16 kernels round them once to f16.

Weights keep their checkpoint formats on the GPU. Routed experts are stacked once per layer
(kernels.moe.stack_experts, a bit-preserving copy made on the host before upload), so the GPU
holds one copy.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from kernels import dispatch
from kernels.mhc import mhc_coefficients
from kernels.formats import Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight
from kernels.moe import stack_experts

from .config import ModelArgs
from .model import CompressorState, DeepseekV4, ModelState, rms_norm

_EXPERT = re.compile(r"^(.*ffn\.)experts\.(\d+)\.(w[123])$")


def split_experts(weights: dict) -> tuple[dict, dict]:
    """-> (weights without routed experts, {"layers.L.ffn.": StackedExperts})."""
    rest, per_layer = {}, {}
    for name, w in weights.items():
        m = _EXPERT.match(name)
        if m:
            per_layer.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = w
        else:
            rest[name] = w
    stacks = {prefix: stack_experts([(e[i]["w1"], e[i]["w2"], e[i]["w3"]) for i in sorted(e)])
              for prefix, e in per_layer.items()}
    return rest, stacks


def _rows(w, start: int, stop: int):
    """Rows start:stop of a quantized weight (a view; block scales follow)."""
    if isinstance(w, Fp8BlockWeight):
        return Fp8BlockWeight(w.weight[start:stop], w.scale[start // 128:-(-stop // 128)])
    if isinstance(w, Nvfp4Weight):
        return Nvfp4Weight(w.weight[start:stop], w.weight_scale[start:stop], w.weight_scale_2, w.input_scale)
    if isinstance(w, Mxfp4Weight):
        return Mxfp4Weight(w.weight[start:stop], w.scale[start:stop])
    return w[start:stop]


class DeepseekV4Gpu(DeepseekV4):
    def __init__(self, args: ModelArgs, weights: dict, simulate_qat: bool = True, device="cuda"):
        rest, stacks = split_experts(weights)
        head = rest.pop("head.weight")
        super().__init__(args, rest, simulate_qat=simulate_qat, dtype=torch.float32, device=device)
        self.stacks = {prefix: s.to(self.device) for prefix, s in stacks.items()}
        self.w["head.weight"] = head.to(self.device, torch.bfloat16)  # 1 GB in BF16 for V4: not widened

    def logits(self, h: torch.Tensor, prefix: str = "") -> torch.Tensor:
        x = rms_norm(self.hc_head(h, prefix), self.w[f"{prefix}norm.weight"], self.args.rms_norm_eps)
        return F.linear(x.to(torch.bfloat16), self.w["head.weight"]).float()

    def hc_pre(self, x: torch.Tensor, prefix: str, which: str):
        if self.device.type != "cuda":
            return super().hc_pre(x, prefix, which)
        a = self.args
        flat = x.flatten(2).float()
        mixes = F.linear(flat, self.w[f"{prefix}hc_{which}_fn"])
        mixes = mixes * torch.rsqrt(flat.square().mean(-1, keepdim=True) + a.rms_norm_eps)
        pre, post, comb = mhc_coefficients(mixes, self.w[f"{prefix}hc_{which}_scale"],
                                           self.w[f"{prefix}hc_{which}_base"], a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps)
        return (pre.unsqueeze(-1) * x.float()).sum(2).to(x.dtype), post, comb

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        shape = x.shape
        y = dispatch.linear(x.reshape(-1, shape[-1]), self.w[name])
        return y.view(*shape[:-1], -1)

    def grouped_linear(self, o: torch.Tensor, name: str) -> torch.Tensor:
        b, s, g, k = o.shape
        w = self.w[name]
        x = o.reshape(b * s, g * k).contiguous()
        if isinstance(w, Fp8BlockWeight) and dispatch.backend(self.device) == "sm90":
            from kernels.linear import linear_fp8
            y = linear_fp8(x, w, groups=g, out_dtype=x.dtype)  # one launch for all groups
        else:
            r = w.shape[0] // g
            y = torch.cat([dispatch.linear(x[:, i * k:(i + 1) * k], _rows(w, i * r, (i + 1) * r)) for i in range(g)], -1)
        return y.view(b, s, g, -1).to(o.dtype)

    def moe(self, prefix: str, x: torch.Tensor, input_ids: torch.Tensor, hashed: bool) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.route(f"{prefix}ffn.", flat, input_ids.reshape(-1), hashed)
        y = dispatch.moe(flat.contiguous(), weights, experts, self.stacks[f"{prefix}ffn."], self.args.swiglu_limit)
        y = y + self.expert(flat, f"{prefix}ffn.shared_experts.", None, clamp=False).float()
        return y.to(x.dtype).view(shape)

    def write_entries(self, st: CompressorState, slots, pos, entry, ratio: int) -> None:
        if pos.shape[1] > 1:  # prefill (eager): the reference's data-dependent write
            return super().write_entries(st, slots, pos, entry, ratio)
        # Decode: every sequence writes its current entry index; those whose window did not
        # close write the old value back. No data-dependent shapes, no host sync.
        index = pos[:, 0] // ratio
        emit = ((pos[:, 0] + 1) % ratio == 0).view(-1, 1)
        st.entries[slots, index] = torch.where(emit, entry[:, 0], st.entries[slots, index])

    @staticmethod
    def check_positions(pos: torch.Tensor, state: ModelState) -> None:
        if pos.shape[1] > 1:  # decode positions are checked by the engine, on the host
            DeepseekV4.check_positions(pos, state)
