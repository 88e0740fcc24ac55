"""Checkpoint loading: sharded safetensors, DeepSeek native names, bytes exactly as shipped.

Each shard is memory-mapped once (copy-on-write, so nothing is read until used and nothing is
written back); every tensor is a view into that map with the file's dtype. Quantized linears are
assembled into their format's container (kernels.formats) without touching a byte. Each tensor's
format is decided from its companions and dtype:

  <name>.weight uint8  + .weight_scale E4M3 + .weight_scale_2 + .input_scale -> NVFP4
  <name>.weight int8   + .scale E8M0                                         -> MXFP4
  <name>.weight E4M3   + .scale E8M0 or fp32 (128x128 blocks)                -> FP8 block
  <name>.weight bf16/fp16/fp32                                               -> plain

Every problem raises CheckpointError naming the tensor and what was expected.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kernels.formats import (FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK, Fp8BlockWeight, Mxfp4Weight,
                             Nvfp4Weight)

from .config import ModelArgs, QuantInfo, read_quant_info
from .params import ParamSpec, model_params

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
           "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTEGERS = (torch.int32, torch.int64)
# Tensors real releases carry that the model does not use (MTP copies of the shared embed/head).
_IGNORED = re.compile(r"^mtp\.\d+\.(emb\w*|head)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor or file."""


@dataclass
class Checkpoint:
    args: ModelArgs
    weights: dict            # native name (linears without `.weight`) -> tensor or weight container
    formats: Counter         # format -> number of linears in it
    quant_info: QuantInfo
    path: Path
    tokenizer_file: Path | None = None
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------

@dataclass
class _Record:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """The shard's JSON header and the offset where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"shard {path.name}: truncated (no header)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"shard {path.name}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"shard {path.name}: unreadable header ({exc})") from exc
    return header, 8 + n


def _records(path: Path) -> dict[str, _Record]:
    header, start = read_header(path)
    size = path.stat().st_size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _DTYPES:
            raise CheckpointError(f"tensor '{name}' in {path.name}: unsupported dtype {meta.get('dtype')}")
        begin, end = (start + o for o in meta["data_offsets"])
        if end > size:
            raise CheckpointError(f"tensor '{name}' in {path.name}: truncated shard, the tensor needs bytes up to "
                                  f"{end} but the file has {size}")
        dtype, shape = _DTYPES[meta["dtype"]], tuple(meta["shape"])
        if (end - begin) != math.prod(shape) * torch.empty(0, dtype=dtype).element_size():
            raise CheckpointError(f"tensor '{name}' in {path.name}: byte range does not match shape {list(shape)}")
        out[name] = _Record(path, dtype, shape, begin, end)
    return out


class _ShardMaps:
    """One copy-on-write memory map per shard, opened on first use."""

    def __init__(self):
        self._maps: dict[Path, torch.Tensor] = {}

    def tensor(self, rec: _Record) -> torch.Tensor:
        if rec.file not in self._maps:
            self._maps[rec.file] = torch.from_numpy(np.memmap(rec.file, dtype=np.uint8, mode="c"))
        raw = self._maps[rec.file][rec.begin:rec.end]
        if rec.begin % max(torch.empty(0, dtype=rec.dtype).element_size(), 1):
            raw = raw.clone()  # misaligned for its dtype: the one case where bytes are copied
        return raw.view(rec.dtype).reshape(rec.shape)


def _shard_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = root / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({root / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                missing = next(n for n, v in weight_map.items() if root / v == f)
                raise CheckpointError(f"tensor '{missing}': its shard {f.name} (named in {INDEX_FILE}) is missing")
        return files, weight_map
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files and no {INDEX_FILE}")
    return files, None


# ---------------------------------------------------------------------------------------------
# Assembling parameters
# ---------------------------------------------------------------------------------------------

class _Assembler:
    def __init__(self, records: dict[str, _Record], maps: _ShardMaps):
        self.records, self.maps, self.used = records, maps, set()

    def has(self, name: str) -> bool:
        return name in self.records

    def get(self, name: str, shape=None, dtypes=None, what: str = "") -> torch.Tensor:
        rec = self.records.get(name)
        if rec is None:
            raise CheckpointError(f"missing tensor '{name}'" + (f" (expected {what})" if what else ""))
        if shape is not None and rec.shape != tuple(shape):
            raise CheckpointError(f"tensor '{name}': shape {list(rec.shape)}, expected {list(shape)}"
                                  + (f" ({what})" if what else ""))
        if dtypes is not None and rec.dtype not in dtypes:
            expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise CheckpointError(f"tensor '{name}': dtype {str(rec.dtype).replace('torch.', '')}, expected {expected}"
                                  + (f" ({what})" if what else ""))
        self.used.add(name)
        return self.maps.tensor(rec)

    def scalar(self, name: str, what: str) -> torch.Tensor:
        rec = self.records.get(name)
        if rec is not None and math.prod(rec.shape) != 1:
            raise CheckpointError(f"tensor '{name}': shape {list(rec.shape)}, expected a scalar ({what})")
        shape = rec.shape if rec is not None else ()
        return self.get(name, shape, (torch.float32,), what).reshape(())

    def plain(self, spec: ParamSpec) -> torch.Tensor:
        dtypes = _INTEGERS if spec.role == "tid2eid" else _FLOATS
        return self.get(spec.name, spec.shape, dtypes)

    def linear(self, spec: ParamSpec):
        n, k = spec.shape
        base = spec.name
        rec = self.records.get(f"{base}.weight")
        if rec is None:
            raise CheckpointError(f"missing tensor '{base}.weight' (expected a [{n}, {k}] linear)")
        if rec.dtype == torch.uint8 and self.has(f"{base}.weight_scale"):
            return self._nvfp4(base, n, k)
        if rec.dtype in (torch.int8, torch.uint8):
            return Mxfp4Weight(self.get(f"{base}.weight", (n, k // 2), what="MXFP4 packed E2M1 pairs"),
                               self.get(f"{base}.scale", (n, k // MXFP4_BLOCK), (torch.float8_e8m0fnu,),
                                        "MXFP4 E8M0 scale per 32"))
        if rec.dtype == torch.float8_e4m3fn:
            blocks = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
            return Fp8BlockWeight(self.get(f"{base}.weight", (n, k)),
                                  self.get(f"{base}.scale", blocks, (torch.float8_e8m0fnu, torch.float32),
                                           "FP8 128x128 block scale"))
        if rec.dtype in _FLOATS:
            return self.get(f"{base}.weight", (n, k))
        raise CheckpointError(f"tensor '{base}.weight': dtype {str(rec.dtype).replace('torch.', '')}, expected uint8 "
                              "(NVFP4), int8 (MXFP4), float8_e4m3fn (FP8 block) or bfloat16/float32")

    def _nvfp4(self, base: str, n: int, k: int) -> Nvfp4Weight:
        w = Nvfp4Weight(self.get(f"{base}.weight", (n, k // 2), what="NVFP4 packed E2M1 pairs"),
                        self.get(f"{base}.weight_scale", (n, k // NVFP4_BLOCK), (torch.float8_e4m3fn,),
                                 "NVFP4 E4M3 scale per 16"),
                        self.scalar(f"{base}.weight_scale_2", "NVFP4 global scale"),
                        self.scalar(f"{base}.input_scale", "NVFP4 activation calibration scale"))
        ws2, ins = float(w.weight_scale_2), float(w.input_scale)
        if not (math.isfinite(ws2) and ws2 > 0):
            raise CheckpointError(f"tensor '{base}.weight_scale_2' = {ws2:.6g}: must be finite and > 0")
        if not (math.isfinite(ins) and ins >= 1e-12):
            raise CheckpointError(f"tensor '{base}.input_scale' = {ins:.6g}: must be finite and >= 1e-12")
        return w


def format_of(weight) -> str:
    return {Nvfp4Weight: "nvfp4", Mxfp4Weight: "mxfp4", Fp8BlockWeight: "fp8_block"}.get(type(weight), "plain")


def load_checkpoint(path: str | Path, device="cpu") -> Checkpoint:
    """Load a DeepSeek-V4 checkpoint directory (config.json + safetensors shards)."""
    root = Path(path)
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root}: no config.json")
    args = ModelArgs.from_json(root / "config.json")
    files, weight_map = _shard_files(root)
    records: dict[str, _Record] = {}
    for f in files:
        for name, rec in _records(f).items():
            if name in records:
                raise CheckpointError(f"tensor '{name}' appears in both {records[name].file.name} and {f.name}")
            records[name] = rec
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in records or records[name].file.name != fname:
                raise CheckpointError(f"tensor '{name}': {INDEX_FILE} places it in {fname}, which does not hold it")

    asm = _Assembler(records, _ShardMaps())
    weights = {}
    for spec in model_params(args):
        weights[spec.name] = asm.linear(spec) if spec.kind == "linear" else asm.plain(spec)
    unexpected = sorted(n for n in records if n not in asm.used and not _IGNORED.match(n))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"unexpected tensor '{unexpected[0]}': not a DeepSeek-V4 parameter for this config; "
                              f"unexpected: {unexpected[:5]}{more}")
    if device != "cpu":
        weights = {k: v.to(device) for k, v in weights.items()}
    formats = Counter(format_of(w) for spec, w in zip(model_params(args), weights.values()) if spec.kind == "linear")
    tok = root / "tokenizer.json"
    return Checkpoint(args, weights, formats, read_quant_info(root), root, tok if tok.exists() else None, files)
