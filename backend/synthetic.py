"""Synthetic DeepSeek-V4 checkpoints in the exact on-disk formats of the real releases.

    python -m backend.synthetic OUT_DIR [--flavor nvidia-nvfp4|deepseek-native|all-nvfp4]
                                [--size tiny|flash-shaped] [--layers N] [--seed S] [--fp8-scale e8m0|fp32]

Flavors (which format each linear ships in):
- nvidia-nvfp4: NVIDIA's release. Routed experts NVFP4 (cast losslessly from the MXFP4 source, as
  NVIDIA did), attention / shared experts / indexer wq_b / MTP projections FP8 block-128, MTP experts
  MXFP4, gate / compressor / weights_proj / embed / head BF16, mHC / sinks / ape / gate bias fp32.
- deepseek-native: DeepSeek's release. Routed and MTP experts MXFP4, the rest as above.
- all-nvfp4: every quantizable linear NVFP4 (ModelOpt recipe; experts cast from the MXFP4 source).

Every tensor is drawn from a generator seeded by (seed, tensor name), so the same source weights
appear in every flavor: nvidia-nvfp4 and deepseek-native experts dequantize to identical values.
Weights are scaled so activations stay finite and O(1) through all layers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.formats import mxfp4_to_nvfp4, quantize_fp8_block, quantize_mxfp4, quantize_nvfp4

from .checkpoint import INDEX_FILE
from .config import ModelArgs, RopeScaling
from .params import ParamSpec, model_params

FLAVORS = ("nvidia-nvfp4", "deepseek-native", "all-nvfp4")
SIZES = ("tiny", "flash-shaped")
# Plausible activation calibration for NVFP4 W4A4 (amax ~ 8): unused by W4A16.
SYNTHETIC_INPUT_SCALE = 8.0 / (6 * 448)


def tiny_args(**overrides) -> ModelArgs:
    """Small enough for CPU tests, yet every layer kind appears: SWA, CSA (ratio 4, indexer),
    HCA (ratio 16 here), hash and score routing, MTP; 80 tokens cross several window wraps and
    compressions. Widths respect DeepSeek's shape rules (NoPE % 64, FP8 K % 128, index_head_dim >
    rope dims, >= 16 indexer heads so top-k has no ties)."""
    base = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
                qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=8,
                compress_ratios=[0, 4, 16, 4, 0], n_routed_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=128, routed_scaling_factor=1.5, num_hash_layers=2, index_n_heads=16,
                index_head_dim=128, index_topk=8, num_nextn_predict_layers=1, max_position_embeddings=1048576,
                rope_scaling=RopeScaling(factor=16.0, original_max_position_embeddings=65536))
    base.update(overrides)
    return ModelArgs(**base)


def flash_shaped_args(layers: int = 4, **overrides) -> ModelArgs:
    """Real V4-Flash widths with `layers` main layers (the real schedule's first ones) + MTP."""
    ratios = ([0, 0] + [4, 128] * 21)[:layers] + [0]
    return ModelArgs(**{**dict(num_hidden_layers=layers, compress_ratios=ratios), **overrides})


def _generator(seed: int, name: str, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def source_tensor(spec: ParamSpec, args: ModelArgs, seed: int, device="cpu") -> torch.Tensor:
    """The float values (or integer table) of one parameter, independent of the flavor (and
    deterministic per device: a CUDA generator draws other numbers than the CPU one)."""
    g = _generator(seed, spec.name, device)
    r = torch.randn(spec.shape, generator=g, device=device) if spec.role != "tid2eid" else None
    match spec.role:
        case "norm":
            return 1.0 + 0.1 * r
        case "hc":
            if spec.name.endswith("_fn"):
                return r * 0.5 / spec.shape[1] ** 0.5
            return 0.5 * r if spec.name.endswith("_base") else 0.75 + 0.25 * r.abs()
        case "sink" | "ape":
            return 0.5 * r
        case "bias":
            return 0.1 * r
        case "tid2eid":
            keys = torch.rand(spec.shape[0], args.n_routed_experts, generator=g, device=device)
            return keys.argsort(dim=-1)[:, : spec.shape[1]].to(torch.int32)
        case "embed":
            return r if spec.name.startswith("embed") else r * spec.shape[1] ** -0.5
        case _:  # linears, BF16 linears: unit-variance outputs
            return r * spec.shape[-1] ** -0.5


def _format_for(spec: ParamSpec, flavor: str) -> str:
    if spec.role in ("routed_expert", "mtp_expert"):
        if flavor == "deepseek-native" or spec.role == "mtp_expert" and flavor == "nvidia-nvfp4":
            return "mxfp4"
        return "nvfp4"
    return "nvfp4" if flavor == "all-nvfp4" else "fp8_block"


def encode_linear(spec: ParamSpec, value: torch.Tensor, fmt: str, fp8_scale: torch.dtype,
                  pair_max: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one linear in format `fmt` (pair_max: shared NVFP4 global scale)."""
    base = spec.name
    if fmt == "fp8_block":
        q = quantize_fp8_block(value, fp8_scale)
        return {f"{base}.weight": q.weight, f"{base}.scale": q.scale}
    if fmt == "nvfp4":
        if spec.role in ("routed_expert", "mtp_expert"):  # cast from the MXFP4 source
            q = mxfp4_to_nvfp4(quantize_mxfp4(value), pair_max, SYNTHETIC_INPUT_SCALE)
        else:
            q = quantize_nvfp4(value, pair_max, SYNTHETIC_INPUT_SCALE)
        return {f"{base}.weight": q.weight, f"{base}.weight_scale": q.weight_scale,
                f"{base}.weight_scale_2": q.weight_scale_2.reshape(()),
                f"{base}.input_scale": q.input_scale.reshape(())}
    q = quantize_mxfp4(value)
    return {f"{base}.weight": q.weight, f"{base}.scale": q.scale}


def _shard_group(name: str) -> str:
    """Shards hold one block each (`layers.3`, `mtp.0`), or one top-level tensor."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else parts[0]


def _checkpoint_tensors(args: ModelArgs, flavor: str, seed: int, fp8_scale: torch.dtype, device="cpu"):
    """Yields (layer group, {name: tensor}) one group at a time, to bound memory."""
    groups: dict[str, list[ParamSpec]] = {}
    for spec in model_params(args):
        groups.setdefault(_shard_group(spec.name), []).append(spec)
    for key, specs in groups.items():
        out, values = {}, {s.name: source_tensor(s, args, seed, device) for s in specs}
        pair_scales = {}
        for s in specs:
            if s.kind != "linear":
                v = values[s.name]
                out[s.name] = v if s.role in ("hc", "sink", "ape", "bias", "tid2eid") else v.to(torch.bfloat16)
                continue
            fmt = _format_for(s, flavor)
            pair = None
            if s.name.endswith((".w1", ".w3")):
                base = s.name[:-3]
                if base not in pair_scales:
                    pair_scales[base] = _shared_scale(fmt, s.role, values[f"{base}.w1"], values[f"{base}.w3"])
                pair = pair_scales[base]
            out.update(encode_linear(s, values[s.name], fmt, fp8_scale, pair))
        yield key, {k: v.cpu() for k, v in out.items()}


def _shared_scale(fmt: str, role: str, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor | None:
    """The weight_scale_2 shared by an expert's w1 and w3 in NVFP4 (None for other formats)."""
    if fmt != "nvfp4":
        return None
    if role in ("routed_expert", "mtp_expert"):  # power of two: the largest E8M0 scale maps to 256
        return torch.stack([quantize_mxfp4(w).scale.float().amax() for w in (w1, w3)]).amax() / 256.0
    return torch.stack([w1.abs().amax(), w3.abs().amax()]).amax() / (6 * 448)


def quant_json(flavor: str) -> tuple[dict, dict | None]:
    """config.json's quantization_config and hf_quant_config.json for a flavor."""
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "scale_fmt": "ue8m0",
           "weight_block_size": [128, 128]}
    if flavor == "deepseek-native":
        return fp8, None
    if flavor == "nvidia-nvfp4":
        ignore = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]
        qc = {**fp8, "moe_quant_algo": "NVFP4", "quant_algo": "MIXED_PRECISION", "group_size": 16, "ignore": ignore}
        return qc, {"producer": {"name": "modelopt"},
                    "quantization": {"quant_algo": "MIXED_PRECISION", "group_size": 16, "exclude_modules": ignore}}
    qc = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["head", "embed"]}
    return qc, {"producer": {"name": "modelopt"}, "quant_algo": "NVFP4", "group_size": 16,
                "exclude_modules": ["head", "embed"]}


def generate(out_dir: str | Path, flavor: str = "nvidia-nvfp4", size: str = "tiny", seed: int = 0,
             layers: int = 4, fp8_scale: str = "e8m0", args: ModelArgs | None = None, device="cpu") -> Path:
    """Write a synthetic checkpoint (config, hf_quant_config, sharded safetensors + index,
    tokenizer) to out_dir and return the path. `device="cuda"` draws and quantizes on the GPU
    (a flash-shaped layer holds ~3.6 GB of experts)."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if args is None:
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        args = tiny_args() if size == "tiny" else flash_shaped_args(layers)
    scale_dtype = {"e8m0": torch.float8_e8m0fnu, "fp32": torch.float32}[fp8_scale]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    n_groups = len({_shard_group(s.name) for s in model_params(args)})
    for i, (_, tensors) in enumerate(_checkpoint_tensors(args, flavor, seed, scale_dtype, device)):
        fname = f"model-{i + 1:05d}-of-{n_groups:05d}.safetensors"  # one group in memory at a time
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    qc, hf_quant = quant_json(flavor)
    config = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **args.to_dict(),
              "torch_dtype": "bfloat16", "quantization_config": qc}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if hf_quant is not None:
        (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=1))
    from .tokenizer import build_tokenizer
    build_tokenizer(args.vocab_size).save(str(out / "tokenizer.json"))
    return out


def default_checkpoint(cache_dir: str | Path | None = None, flavor: str = "nvidia-nvfp4") -> Path:
    """The tiny synthetic checkpoint in a cache directory, generated on first use.
    Cache: $DSV4_CACHE_DIR, else ~/.cache/deepseek-v4-triton."""
    root = Path(cache_dir or os.environ.get("DSV4_CACHE_DIR") or Path.home() / ".cache" / "deepseek-v4-triton")
    path = root / f"tiny-{flavor}"
    if not (path / "config.json").exists():
        tmp = root / f".tiny-{flavor}.{os.getpid()}"  # atomic: concurrent first uses do not collide
        generate(tmp, flavor=flavor)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--flavor", choices=FLAVORS, default="nvidia-nvfp4")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--layers", type=int, default=4, help="main layers of a flash-shaped checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8-scale", choices=("e8m0", "fp32"), default="e8m0",
                   help="FP8 block scale dtype (fp32 as in the -Base releases)")
    p.add_argument("--device", default="cpu", help="where to draw and quantize (cuda: fast for flash-shaped)")
    a = p.parse_args(argv)
    path = generate(a.out_dir, a.flavor, a.size, a.seed, a.layers, a.fp8_scale, device=a.device)
    print(f"wrote {a.size} {a.flavor} checkpoint to {path}")


if __name__ == "__main__":
    main()
