"""Loader: every flavor loads with bytes untouched; every corruption fails naming the tensor."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backend.checkpoint import INDEX_FILE, CheckpointError, load_checkpoint
from backend.synthetic import FLAVORS
from kernels.formats import Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight


def _file_tensors(path):
    """Every tensor of the checkpoint as read by safetensors itself (an independent reader)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _fields(weight):
    if isinstance(weight, Nvfp4Weight):
        return {"weight": weight.weight, "weight_scale": weight.weight_scale,
                "weight_scale_2": weight.weight_scale_2, "input_scale": weight.input_scale}
    return {"weight": weight.weight, "scale": weight.scale}


@pytest.mark.parametrize("flavor", FLAVORS)
def test_flavor_loads_byte_identical(make_checkpoint, flavor):
    path = make_checkpoint(flavor)
    ck = load_checkpoint(path)
    on_disk = _file_tensors(path)
    expected = {"nvidia-nvfp4": {"nvfp4", "mxfp4", "fp8_block"}, "deepseek-native": {"mxfp4", "fp8_block"},
                "all-nvfp4": {"nvfp4"}}[flavor]
    assert set(ck.formats) == expected
    n_checked = 0
    for name, w in ck.weights.items():
        if isinstance(w, torch.Tensor):
            assert w.dtype == on_disk[name].dtype and torch.equal(w.view(torch.uint8), on_disk[name].view(torch.uint8))
            continue
        for field, tensor in _fields(w).items():
            disk = on_disk[f"{name}.{field}"]
            assert tensor.dtype == disk.dtype, f"{name}.{field}"
            assert torch.equal(tensor.reshape(-1).view(torch.uint8), disk.reshape(-1).view(torch.uint8)), f"{name}.{field}"
            n_checked += 1
    assert n_checked > 100


def test_tensors_are_views_of_the_memory_map(make_checkpoint):
    path = make_checkpoint("nvidia-nvfp4")
    ck = load_checkpoint(path)
    w = ck.weights["layers.2.ffn.experts.3.w1"]
    # The storage behind a tensor is its whole shard file, mapped: no per-tensor copy was made.
    shard_sizes = {f.stat().st_size for f in path.glob("*.safetensors")}
    assert w.weight.untyped_storage().nbytes() in shard_sizes
    assert ck.weights["embed.weight"].untyped_storage().nbytes() in shard_sizes


def test_nvidia_and_native_experts_dequantize_identically(make_checkpoint):
    nv = load_checkpoint(make_checkpoint("nvidia-nvfp4")).weights
    ds = load_checkpoint(make_checkpoint("deepseek-native")).weights
    n = 0
    for name, w in nv.items():
        if ".experts." in name:
            assert isinstance(ds[name], Mxfp4Weight)
            assert torch.equal(w.dequantize(), ds[name].dequantize()), name
            n += isinstance(w, Nvfp4Weight)
    assert n == 3 * 16 * 4  # every routed expert of the main layers was NVFP4


def test_fp32_block_scales_load(make_checkpoint):
    ck = load_checkpoint(make_checkpoint("deepseek-native", fp8_scale="fp32"))
    w = ck.weights["layers.0.attn.wq_a"]
    assert isinstance(w, Fp8BlockWeight) and w.scale.dtype == torch.float32


# --- corruptions -------------------------------------------------------------------------------

def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _shard_of(path, name):
    return path / json.loads((path / INDEX_FILE).read_text())["weight_map"][name]


def _edit(path, name, change):
    """Rewrite the shard holding `name` with change(tensors) applied (and the index kept in step)."""
    shard = _shard_of(path, name)
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index["weight_map"].update({k: shard.name for k in tensors})
    (path / INDEX_FILE).write_text(json.dumps(index))


EXPERT = "layers.1.ffn.experts.5.w1"


@pytest.mark.parametrize("name, change, message", [
    ("layers.0.attn.wkv.scale", lambda t: t.pop("layers.0.attn.wkv.scale"), "missing tensor 'layers.0.attn.wkv.scale'"),
    ("norm.weight", lambda t: t.update({"layers.0.attn.bogus": torch.zeros(2)}), "unexpected tensor 'layers.0.attn.bogus'"),
    ("layers.0.attn.wq_a.weight", lambda t: t.update({"layers.0.attn.wq_a.weight": t["layers.0.attn.wq_a.weight"][:64]}),
     "tensor 'layers.0.attn.wq_a.weight': shape"),
    ("layers.2.attn.attn_sink", lambda t: t.update({"layers.2.attn.attn_sink": torch.zeros(4, dtype=torch.int32)}),
     "tensor 'layers.2.attn.attn_sink': dtype int32"),
    ("layers.0.ffn.gate.tid2eid", lambda t: t.update({"layers.0.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].float()}),
     "tensor 'layers.0.ffn.gate.tid2eid': dtype float32"),
    (f"{EXPERT}.weight_scale", lambda t: t.update({f"{EXPERT}.weight_scale": t[f"{EXPERT}.weight_scale"].float()}),
     f"tensor '{EXPERT}.weight_scale': dtype float32"),
    (f"{EXPERT}.weight_scale_2", lambda t: t.update({f"{EXPERT}.weight_scale_2": torch.tensor(0.0)}),
     f"tensor '{EXPERT}.weight_scale_2' = 0:"),
    (f"{EXPERT}.weight_scale_2", lambda t: t.update({f"{EXPERT}.weight_scale_2": torch.tensor(-1.0)}),
     f"tensor '{EXPERT}.weight_scale_2' = -1:"),
    (f"{EXPERT}.weight_scale_2", lambda t: t.update({f"{EXPERT}.weight_scale_2": torch.tensor(float("inf"))}),
     f"tensor '{EXPERT}.weight_scale_2' = inf"),
    (f"{EXPERT}.input_scale", lambda t: t.update({f"{EXPERT}.input_scale": torch.tensor(float("nan"))}),
     f"tensor '{EXPERT}.input_scale' = nan"),
    (f"{EXPERT}.input_scale", lambda t: t.update({f"{EXPERT}.input_scale": torch.tensor(1e-13)}),
     f"tensor '{EXPERT}.input_scale' = 1e-13"),
    (f"{EXPERT}.input_scale", lambda t: t.pop(f"{EXPERT}.input_scale"), f"missing tensor '{EXPERT}.input_scale'"),
    ("layers.0.attn.wo_b.weight", lambda t: t.update({"layers.0.attn.wo_b.weight": t["layers.0.attn.wo_b.weight"].to(torch.float8_e5m2)}),
     "tensor 'layers.0.attn.wo_b.weight': dtype float8_e5m2"),
])
def test_corruption_fails_with_tensor_name(make_checkpoint, tmp_path, name, change, message):
    path = _copy(make_checkpoint("nvidia-nvfp4"), tmp_path)
    _edit(path, name, change)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert message in str(err.value)


def test_truncated_shard_names_a_tensor(make_checkpoint, tmp_path):
    path = _copy(make_checkpoint("nvidia-nvfp4"), tmp_path)
    shard = _shard_of(path, EXPERT + ".weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"tensor '.*' in model-.*truncated shard"):
        load_checkpoint(path)


def test_missing_shard_file_names_a_tensor(make_checkpoint, tmp_path):
    path = _copy(make_checkpoint("nvidia-nvfp4"), tmp_path)
    _shard_of(path, "embed.weight").unlink()
    with pytest.raises(CheckpointError, match="tensor 'embed.weight': its shard"):
        load_checkpoint(path)
