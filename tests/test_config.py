"""Config: native, HF and DeepSeek-inference forms give the same model; quantization JSON, both schemas."""
import json

import pytest
from transformers import DeepseekV4Config

from backend.config import ModelArgs, read_quant_info
from backend.synthetic import flash_shaped_args, tiny_args

NATIVE_FLASH = {  # the released V4-Flash config.json, abridged to the model's fields
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_hash_layers": 3, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
    "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True, "swiglu_limit": 10.0, "sliding_window": 128, "rope_theta": 10000,
    "compress_rope_theta": 160000, "rope_scaling": {"type": "yarn", "factor": 16,
                                                    "original_max_position_embeddings": 65536,
                                                    "beta_fast": 32, "beta_slow": 1},
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1, "eos_token_id": 1, "bos_token_id": 0, "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
}


def test_native_flash_config():
    args = ModelArgs.from_dict(NATIVE_FLASH)
    assert args.num_hidden_layers == 43 and args.compress_ratio(2) == 4 and args.compress_ratio(3) == 128
    assert args.compress_ratio(43) == 0 and args.is_hash_layer(2) and not args.is_hash_layer(3)
    assert args.rope_scaling.factor == 16 and args.nope_head_dim == 448 and args.hc_mix_dim == 24


@pytest.mark.parametrize("args", [tiny_args(), flash_shaped_args(6), ModelArgs.from_dict(NATIVE_FLASH)])
def test_hf_form_round_trips_and_hf_accepts_it(args):
    hf = args.to_hf_dict()
    assert ModelArgs.from_dict(hf) == args
    cfg = DeepseekV4Config(**hf)  # HF transformers reads our HF form
    assert cfg.layer_types[: args.num_hidden_layers] == hf["layer_types"]
    assert cfg.qk_rope_head_dim == args.qk_rope_head_dim


def test_deepseek_inference_form():
    inference = {"vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
                 "n_heads": 64, "n_routed_experts": 256, "n_activated_experts": 6, "score_func": "sqrtsoftplus",
                 "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64,
                 "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "rope_theta": 10000,
                 "rope_factor": 16, "compress_rope_theta": 160000, "compress_ratios": NATIVE_FLASH["compress_ratios"]}
    assert ModelArgs.from_dict(inference) == ModelArgs.from_dict(NATIVE_FLASH)


@pytest.mark.parametrize("change, field", [
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"qk_rope_head_dim": 600}, "qk_rope_head_dim"),
    ({"o_groups": 7}, "o_groups"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"index_head_dim": 96}, "index_head_dim"),
])
def test_invalid_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelArgs.from_dict({**NATIVE_FLASH, **change})


def test_quant_info_both_schema_revisions(tmp_path):
    ignore = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]
    qc = {"quant_method": "fp8", "moe_quant_algo": "NVFP4", "quant_algo": "MIXED_PRECISION", "group_size": 16}
    (tmp_path / "config.json").write_text(json.dumps({**NATIVE_FLASH, "quantization_config": qc}))
    old = {"producer": {"name": "modelopt", "version": "0.37"},
           "quantization": {"quant_algo": "MIXED_PRECISION", "group_size": 16, "exclude_modules": ignore}}
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(old))
    a = read_quant_info(tmp_path)
    new = {"producer": {"name": "modelopt"}, "quant_algo": "MIXED_PRECISION", "group_size": 16,
           "exclude_modules": ignore}
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(new))
    b = read_quant_info(tmp_path)
    assert a == b and a.moe_quant_algo == "NVFP4" and a.excluded == ignore and a.producer == "modelopt"
