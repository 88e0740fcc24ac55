"""HF transformers' DeepseekV4ForCausalLM built from one of our checkpoints (test helper).

The HF model gets the same weights, dequantized to fp32 through kernels.linear's twins
(independently checked against hand-computed blocks in tests/test_formats.py), under HF names.
"""
from __future__ import annotations

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from backend.config import ModelArgs
from kernels.linear import dequantize_weight

_ATTN = {"wq_a": "q_a_proj", "q_norm": "q_a_norm", "wq_b": "q_b_proj", "wkv": "kv_proj",
         "kv_norm": "kv_norm", "wo_a": "o_a_proj", "wo_b": "o_b_proj"}
_COMPRESSOR = {"wkv": "kv_proj", "wgate": "gate_proj", "norm": "kv_norm"}
_SHARED = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def hf_name(name: str) -> str | None:
    """Native name (linears with .weight) -> HF parameter name; None for what HF does not have."""
    if name.startswith("mtp."):
        return None
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
           "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
           "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)
    p = f"model.layers.{layer}."
    if rest in ("attn_norm.weight", "ffn_norm.weight"):
        return p + ("input_layernorm.weight" if rest.startswith("attn") else "post_attention_layernorm.weight")
    if rest.startswith("hc_"):
        _, which, part = rest.split("_")
        return f"{p}{which}_hc.{part}"
    if rest == "attn.attn_sink":
        return p + "self_attn.sinks"
    if rest.startswith("attn.indexer.compressor."):
        sub = rest.removeprefix("attn.indexer.compressor.")
        if sub == "ape":
            return p + "self_attn.compressor.indexer.position_bias"
        mod, leaf = sub.split(".")
        return f"{p}self_attn.compressor.indexer.{_COMPRESSOR[mod]}.{leaf}"
    if rest.startswith("attn.indexer."):
        sub = rest.removeprefix("attn.indexer.")
        return p + ("self_attn.compressor.indexer.q_b_proj.weight" if sub.startswith("wq_b")
                    else "self_attn.compressor.indexer.scorer.weights_proj.weight")
    if rest.startswith("attn.compressor."):
        sub = rest.removeprefix("attn.compressor.")
        if sub == "ape":
            return p + "self_attn.compressor.position_bias"
        mod, leaf = sub.split(".")
        return f"{p}self_attn.compressor.{_COMPRESSOR[mod]}.{leaf}"
    if rest.startswith("attn."):
        mod, leaf = rest.removeprefix("attn.").split(".")
        return f"{p}self_attn.{_ATTN[mod]}.{leaf}"
    if rest == "ffn.gate.weight":
        return p + "mlp.gate.weight"
    if rest == "ffn.gate.bias":
        return p + "mlp.gate.e_score_correction_bias"
    if rest == "ffn.gate.tid2eid":
        return p + "mlp.gate.tid2eid"
    if rest.startswith("ffn.shared_experts."):
        mod, leaf = rest.removeprefix("ffn.shared_experts.").split(".")
        return f"{p}mlp.shared_experts.{_SHARED[mod]}.{leaf}"
    raise KeyError(name)


def build_hf_model(args: ModelArgs, weights: dict) -> DeepseekV4ForCausalLM:
    """An fp32 eager HF model holding exactly our checkpoint's (dequantized) weights."""
    config = DeepseekV4Config(**args.to_hf_dict())
    config._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(config).float().eval()
    state = {}
    for name, w in weights.items():
        key = name if name.endswith(("_fn", "_base", "_scale", "ape", "attn_sink", "tid2eid")) or \
            name.endswith(".weight") or name.endswith(".bias") else name + ".weight"
        if ".ffn.experts." in name:
            continue
        target = hf_name(key)
        if target is not None:
            state[target] = w.long() if name.endswith("tid2eid") else dequantize_weight(w, torch.float32)
    for layer in range(args.num_hidden_layers):
        p = f"layers.{layer}.ffn.experts."
        up = [torch.cat([dequantize_weight(weights[f"{p}{e}.w1"]), dequantize_weight(weights[f"{p}{e}.w3"])])
              for e in range(args.n_routed_experts)]
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(up)
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [dequantize_weight(weights[f"{p}{e}.w2"]) for e in range(args.n_routed_experts)])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise AssertionError(f"HF mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
