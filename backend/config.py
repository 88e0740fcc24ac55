"""DeepSeek-V4 model configuration.

`ModelArgs` field names are the keys of the released checkpoints' config.json (DeepSeek's native
form: `compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, ...). `ModelArgs.from_dict` also
reads HF transformers' form (`layer_types`, `compress_rates`, `mlp_layer_types`,
`partial_rotary_factor`, nested `rope_parameters`) and DeepSeek's inference form (`dim`,
`n_layers`, ...). The quantization JSON (`quantization_config`, `hf_quant_config.json`) is kept
for information only: each tensor's format is decided from its name and dtype at load.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

_HF_LAYER_TYPE_TO_RATIO_KEY = {"sliding_attention": None, "compressed_sparse_attention": "csa",
                               "heavily_compressed_attention": "hca"}

# DeepSeek's inference/config.json names -> native names.
_INFERENCE_ALIASES = {
    "dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers", "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok", "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor", "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window", "norm_eps": "rms_norm_eps", "n_mtp_layers": "num_nextn_predict_layers",
}


@dataclass
class RopeScaling:
    """YaRN on the compressed (CSA/HCA) layers; sliding-only layers use plain RoPE."""
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass
class ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # One ratio per main layer, then one per MTP layer (0 = sliding only, 4 = CSA, else HCA).
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    num_hash_layers: int = 3
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _rope_scaling_from_dict(self.rope_scaling)
        self.validate()

    # --- derived -------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def hc_mix_dim(self) -> int:
        """Width of the mHC projection: pre (hc) + post (hc) + comb (hc*hc)."""
        return (2 + self.hc_mult) * self.hc_mult

    def compress_ratio(self, layer: int) -> int:
        """Compress ratio of main layer `layer`, or of MTP layer `layer - num_hidden_layers`."""
        return self.compress_ratios[layer] if layer < len(self.compress_ratios) else 0

    def is_hash_layer(self, layer: int) -> bool:
        return layer < min(self.num_hash_layers, self.num_hidden_layers)

    # --- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, field_name: str, why: str):
            if not cond:
                raise ValueError(f"config field '{field_name}': {why}")
        need(len(self.compress_ratios) >= self.num_hidden_layers, "compress_ratios",
             f"needs one entry per layer ({self.num_hidden_layers}), got {len(self.compress_ratios)}")
        need(all(r == 0 or r >= 2 for r in self.compress_ratios), "compress_ratios",
             "entries must be 0 (sliding only) or a ratio >= 2")
        need(0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0,
             "qk_rope_head_dim", "must be even and smaller than head_dim")
        need(self.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek-V4 has one shared K=V head")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups", "must divide num_attention_heads")
        need(self.n_shared_experts == 1, "n_shared_experts", "DeepSeek-V4 has exactly one shared expert")
        need(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             "must be in 1..n_routed_experts")
        need(self.scoring_func == "sqrtsoftplus", "scoring_func", "only 'sqrtsoftplus' is supported")
        if any(r == 4 for r in self.compress_ratios):
            need(self.index_head_dim > self.qk_rope_head_dim, "index_head_dim", "must exceed qk_rope_head_dim")
            d = self.index_head_dim
            need(d & (d - 1) == 0, "index_head_dim", "must be a power of two (Hadamard rotation)")

    # --- (de)serialization ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "ModelArgs":
        raw = dict(raw)
        for old, new in _INFERENCE_ALIASES.items():
            if old in raw and new not in raw:
                raw[new] = raw.pop(old)
        if "layer_types" in raw and "compress_ratios" not in raw:
            _fold_hf_form(raw)
        if isinstance(raw.get("eos_token_id"), list):
            raw["eos_token_id"] = raw["eos_token_id"][0]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"type": "yarn", **asdict(self.rope_scaling)}
        return out

    def to_hf_dict(self) -> dict:
        """The same model in HF transformers' DeepseekV4Config form."""
        ratios = self.compress_ratios[: self.num_hidden_layers]
        csa = next((r for r in ratios if r == 4), 4)
        hca = next((r for r in ratios if r not in (0, 4)), 128)
        names = {0: "sliding_attention", csa: "compressed_sparse_attention", hca: "heavily_compressed_attention"}
        compress = {"rope_type": "default"}
        if self.rope_scaling is not None:
            compress = {"rope_type": "yarn", "factor": self.rope_scaling.factor,
                        "original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings,
                        "beta_fast": self.rope_scaling.beta_fast, "beta_slow": self.rope_scaling.beta_slow,
                        "attention_factor": 1.0}  # DeepSeek applies no YaRN mscale
        n_hash = min(self.num_hash_layers, self.num_hidden_layers)
        return {
            "model_type": "deepseek_v4", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "moe_intermediate_size": self.moe_intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": 1,
            "head_dim": self.head_dim, "q_lora_rank": self.q_lora_rank,
            "partial_rotary_factor": self.qk_rope_head_dim / self.head_dim,
            "num_experts_per_tok": self.num_experts_per_tok, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": 1, "scoring_func": self.scoring_func, "norm_topk_prob": True,
            "routed_scaling_factor": self.routed_scaling_factor,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "layer_types": [names[r] for r in ratios],
            "compress_rates": {"compressed_sparse_attention": csa, "heavily_compressed_attention": hca},
            "mlp_layer_types": ["hash_moe"] * n_hash + ["moe"] * (self.num_hidden_layers - n_hash),
            "rope_parameters": {"main": {"rope_type": "default", "rope_theta": self.rope_theta},
                                "compress": {**compress, "rope_theta": self.compress_rope_theta}},
            "hc_mult": self.hc_mult, "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "hc_eps": self.hc_eps,
            "swiglu_limit": self.swiglu_limit, "sliding_window": self.sliding_window,
            "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
            "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk, "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "rms_norm_eps": self.rms_norm_eps, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "tie_word_embeddings": False,
        }


def _rope_scaling_from_dict(d: dict) -> RopeScaling | None:
    kind = d.get("type", d.get("rope_type", "yarn"))
    if kind in ("default", None):
        return None
    if kind != "yarn":
        raise ValueError(f"config field 'rope_scaling': only YaRN is supported, got {kind!r}")
    return RopeScaling(factor=float(d.get("factor", 16.0)),
                       original_max_position_embeddings=int(d.get("original_max_position_embeddings", 65536)),
                       beta_fast=float(d.get("beta_fast", 32.0)), beta_slow=float(d.get("beta_slow", 1.0)))


def _fold_hf_form(raw: dict) -> None:
    """HF transformers' config keys -> native keys, in place."""
    rates = {"csa": 4, "hca": 128}
    for name, rate in (raw.get("compress_rates") or {}).items():
        rates["csa" if name == "compressed_sparse_attention" else "hca"] = int(rate)
    raw["compress_ratios"] = [0 if _HF_LAYER_TYPE_TO_RATIO_KEY[t] is None else rates[_HF_LAYER_TYPE_TO_RATIO_KEY[t]]
                              for t in raw["layer_types"]]
    if raw.get("num_nextn_predict_layers", 1):
        raw["compress_ratios"].append(0)
    if "mlp_layer_types" in raw:
        raw["num_hash_layers"] = sum(t == "hash_moe" for t in raw["mlp_layer_types"])
    if "partial_rotary_factor" in raw and "qk_rope_head_dim" not in raw:
        raw["qk_rope_head_dim"] = int(raw.get("head_dim", 512) * raw["partial_rotary_factor"])
    rope = raw.get("rope_parameters") or {}
    compress = rope.get("compress") if isinstance(rope.get("compress"), dict) else None
    if compress is not None:
        raw.setdefault("compress_rope_theta", compress.get("rope_theta", 160000.0))
        raw["rope_scaling"] = compress if compress.get("rope_type") == "yarn" else None
    if isinstance(rope.get("main"), dict):
        raw.setdefault("rope_theta", rope["main"].get("rope_theta", 10000.0))


# ---------------------------------------------------------------------------------------------
# Quantization JSON: informational (the loader decides formats from tensors)
# ---------------------------------------------------------------------------------------------

@dataclass
class QuantInfo:
    """What the checkpoint's JSON says about quantization, normalized over schema revisions."""
    quant_method: str | None = None          # config.json quantization_config.quant_method ("fp8")
    moe_quant_algo: str | None = None        # "NVFP4" in NVIDIA's release
    quant_algo: str | None = None            # "MIXED_PRECISION" / "NVFP4" / "FP8"
    group_size: int | None = None
    excluded: list[str] = field(default_factory=list)
    producer: str | None = None


def read_quant_info(checkpoint_dir: str | Path) -> QuantInfo:
    """Reads `quantization_config` in config.json and `hf_quant_config.json`, either schema."""
    root = Path(checkpoint_dir)
    info = QuantInfo()
    cfg_path = root / "config.json"
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {} if cfg_path.exists() else {}
    info.quant_method = qc.get("quant_method")
    info.moe_quant_algo = qc.get("moe_quant_algo")
    info.quant_algo = qc.get("quant_algo")
    info.group_size = qc.get("group_size")
    info.excluded = list(qc.get("ignore") or qc.get("exclude_modules") or [])
    hf_path = root / "hf_quant_config.json"
    if hf_path.exists():
        hq = json.loads(hf_path.read_text())
        # Older revision: {"producer": {...}, "quantization": {...}}; newer: the same keys flat.
        body = hq.get("quantization", hq)
        info.producer = (hq.get("producer") or {}).get("name", info.producer)
        info.quant_algo = body.get("quant_algo", info.quant_algo)
        info.group_size = body.get("group_size", info.group_size)
        info.excluded = list(body.get("exclude_modules") or body.get("ignore") or info.excluded)
        info.moe_quant_algo = body.get("moe_quant_algo", info.moe_quant_algo)
    return info
