"""The checkpoint's parameter table: every tensor DeepSeek-V4 expects, by native name.

One table serves the loader (what must be there, at what shape), the synthetic checkpoint
generator (what to write, in which format per flavor) and the HF parity tests (name mapping).

Two kinds of entry:
- `linear`: a quantizable weight [out, in]. On disk it is `<name>.weight` plus the companion
  tensors of its format (`.scale`, or NVFP4's `.weight_scale`/`.weight_scale_2`/`.input_scale`),
  or a plain BF16/FP32 `<name>.weight`.
- `tensor`: a plain tensor stored as `<name>` (float, or integer for `tid2eid`).

`role` says what the weight is, so a flavor can pick its format (see backend/synthetic.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelArgs


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "linear" | "tensor"
    role: str  # linear: attn, shared_expert, routed_expert, indexer, mtp_proj, mtp_expert;
    #            tensor: norm, hc, sink, ape, bias, bf16_linear, embed, tid2eid


def _linear(name, out_dim, in_dim, role):
    return ParamSpec(name, (out_dim, in_dim), "linear", role)


def _tensor(name, shape, role):
    return ParamSpec(name, tuple(shape), "tensor", role)


def _hc_params(prefix: str, args: ModelArgs, which: str) -> list[ParamSpec]:
    hc_dim = args.hc_mult * args.hidden_size
    if which == "head":
        return [_tensor(f"{prefix}hc_head_fn", (args.hc_mult, hc_dim), "hc"),
                _tensor(f"{prefix}hc_head_base", (args.hc_mult,), "hc"),
                _tensor(f"{prefix}hc_head_scale", (1,), "hc")]
    return [_tensor(f"{prefix}hc_{which}_fn", (args.hc_mix_dim, hc_dim), "hc"),
            _tensor(f"{prefix}hc_{which}_base", (args.hc_mix_dim,), "hc"),
            _tensor(f"{prefix}hc_{which}_scale", (3,), "hc")]


def _compressor_params(prefix: str, args: ModelArgs, ratio: int, head_dim: int) -> list[ParamSpec]:
    coff = 2 if ratio == 4 else 1  # ratio-4 windows overlap: two series per token
    return [_tensor(f"{prefix}wkv.weight", (coff * head_dim, args.hidden_size), "bf16_linear"),
            _tensor(f"{prefix}wgate.weight", (coff * head_dim, args.hidden_size), "bf16_linear"),
            _tensor(f"{prefix}ape", (ratio, coff * head_dim), "ape"),
            _tensor(f"{prefix}norm.weight", (head_dim,), "norm")]


def block_params(prefix: str, args: ModelArgs, layer: int, is_mtp: bool = False) -> list[ParamSpec]:
    """One transformer block (main layer `layer`, or the MTP block with layer = n_layers + i)."""
    d, hd, h = args.hidden_size, args.head_dim, args.num_attention_heads
    ratio = args.compress_ratio(layer)
    out = [_tensor(f"{prefix}attn_norm.weight", (d,), "norm"), _tensor(f"{prefix}ffn_norm.weight", (d,), "norm")]
    out += _hc_params(prefix, args, "attn") + _hc_params(prefix, args, "ffn")
    a = f"{prefix}attn."
    out += [_linear(f"{a}wq_a", args.q_lora_rank, d, "attn"),
            _tensor(f"{a}q_norm.weight", (args.q_lora_rank,), "norm"),
            _linear(f"{a}wq_b", h * hd, args.q_lora_rank, "attn"),
            _linear(f"{a}wkv", hd, d, "attn"),
            _tensor(f"{a}kv_norm.weight", (hd,), "norm"),
            _linear(f"{a}wo_a", args.o_groups * args.o_lora_rank, h * hd // args.o_groups, "attn"),
            _linear(f"{a}wo_b", d, args.o_groups * args.o_lora_rank, "attn"),
            _tensor(f"{a}attn_sink", (h,), "sink")]
    if ratio:
        out += _compressor_params(f"{a}compressor.", args, ratio, hd)
    if ratio == 4:
        ih, idim = args.index_n_heads, args.index_head_dim
        out += [_linear(f"{a}indexer.wq_b", ih * idim, args.q_lora_rank, "indexer"),
                _tensor(f"{a}indexer.weights_proj.weight", (ih, d), "bf16_linear")]
        out += _compressor_params(f"{a}indexer.compressor.", args, ratio, idim)
    f = f"{prefix}ffn."
    e, inter = args.n_routed_experts, args.moe_intermediate_size
    out.append(_tensor(f"{f}gate.weight", (e, d), "bf16_linear"))
    if not is_mtp and args.is_hash_layer(layer):
        out.append(_tensor(f"{f}gate.tid2eid", (args.vocab_size, args.num_experts_per_tok), "tid2eid"))
    else:
        out.append(_tensor(f"{f}gate.bias", (e,), "bias"))
    expert_role = "mtp_expert" if is_mtp else "routed_expert"
    for i in range(e):
        out += [_linear(f"{f}experts.{i}.w1", inter, d, expert_role),
                _linear(f"{f}experts.{i}.w2", d, inter, expert_role),
                _linear(f"{f}experts.{i}.w3", inter, d, expert_role)]
    out += [_linear(f"{f}shared_experts.w1", inter, d, "shared_expert"),
            _linear(f"{f}shared_experts.w2", d, inter, "shared_expert"),
            _linear(f"{f}shared_experts.w3", inter, d, "shared_expert")]
    return out


def model_params(args: ModelArgs) -> list[ParamSpec]:
    """Every parameter of the checkpoint, main layers then MTP blocks."""
    d = args.hidden_size
    out = [_tensor("embed.weight", (args.vocab_size, d), "embed"),
           _tensor("head.weight", (args.vocab_size, d), "embed"),
           _tensor("norm.weight", (d,), "norm")]
    out += _hc_params("", args, "head")
    for layer in range(args.num_hidden_layers):
        out += block_params(f"layers.{layer}.", args, layer)
    for i in range(args.num_nextn_predict_layers):
        p = f"mtp.{i}."
        out += [_linear(f"{p}e_proj", d, d, "mtp_proj"), _linear(f"{p}h_proj", d, d, "mtp_proj"),
                _tensor(f"{p}enorm.weight", (d,), "norm"), _tensor(f"{p}hnorm.weight", (d,), "norm"),
                _tensor(f"{p}norm.weight", (d,), "norm")]
        out += _hc_params(p, args, "head")
        out += block_params(p, args, args.num_hidden_layers + i, is_mtp=True)
    return out
