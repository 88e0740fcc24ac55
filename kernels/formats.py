"""Weight and activation formats: E2M1 (FP4), NVFP4, MXFP4, FP8 block-128, FP8 per-token activations.

Pure torch, CPU and GPU. These functions define what every kernel must compute: a kernel is right
when it agrees with `dequantize(...)` of the same bytes. Quantized weights travel as the small
containers below, which hold the checkpoint's bytes untouched (views, never copies or re-encodings).

Conventions (see shared/knowledge/formats.md):
- E2M1 code: bit 3 sign, bits 0-2 index into E2M1_MAGNITUDES. Two codes per byte, the LOW nibble
  is the first (even) element along K. Rounding is to nearest, ties to the even code; |x| > 6
  saturates to 6.
- NVFP4: uint8 [N, K/2] + E4M3 block scale per 16 along K + fp32 `weight_scale_2` (+ `input_scale`).
- MXFP4: int8 [N, K/2] + E8M0 block scale per 32 along K.
- FP8 block: E4M3 [N, K] + one scale per 128x128 block, E8M0 or fp32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes: a value equal to one is a tie.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP8_BLOCK = 128


# ---------------------------------------------------------------------------------------------
# E2M1 codes and nibble packing
# ---------------------------------------------------------------------------------------------

@functools.cache
def _device_constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small float32 table made once per device: building it from a list inside a forward would
    copy host memory, which a CUDA-graph capture refuses."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def e2m1_values(device=None) -> torch.Tensor:
    """The 16 values of the E2M1 codes 0..15 (code 8 is -0.0)."""
    mags = E2M1_MAGNITUDES
    return _device_constant(mags + tuple(-m for m in mags), torch.device(device or "cpu"))


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float values to E2M1 codes (uint8, one code per element), ties to even, saturating."""
    x = x.float()
    mag = x.abs().clamp(max=E2M1_MAX)
    mids = _device_constant(_E2M1_MIDPOINTS, x.device)
    code = torch.bucketize(mag, mids)  # number of midpoints strictly below mag
    # On a midpoint bucketize picks the lower code; ties go to the even code instead.
    on_mid = mids[code.clamp(max=len(_E2M1_MIDPOINTS) - 1)] == mag
    code = torch.where(on_mid & (code % 2 == 1), code + 1, code)
    sign = torch.signbit(x).to(torch.int64) << 3
    return (code | sign).to(torch.uint8)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, one per element) -> float32."""
    return e2m1_values(codes.device)[codes.long()]


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """decode_e2m1(encode_e2m1(x)) in float32, bit for bit, from comparisons with Python scalars only:
    no lookup table, so it fuses when compiled and captures in a CUDA graph (no host-to-device copy)."""
    x = x.float()
    mag, steps = x.abs(), [b - a for a, b in zip(E2M1_MAGNITUDES, E2M1_MAGNITUDES[1:])]
    # past midpoint j the value moves up a code; on it, only if that makes the code even (odd j)
    rounded = sum(torch.where(mag >= mid if j % 2 else mag > mid, steps[j], 0.0) for j, mid in enumerate(_E2M1_MIDPOINTS))
    return torch.copysign(rounded, x)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, the first element of each pair in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of FP4 codes along K ({codes.shape[-1]})")
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes (uint8, int8 or float4_e2m1fn_x2) -> [..., K] codes (uint8)."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# Scale helpers
# ---------------------------------------------------------------------------------------------

def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(x)) for positive finite x, exactly (frexp, no log rounding)."""
    mantissa, exponent = torch.frexp(x.float())  # x = m * 2^e, 0.5 <= m < 1
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact powers of two
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu (or its uint8 bytes) -> float32 2^(e-127); code 255 (NaN) -> NaN."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.float()
    exponent = scale.view(torch.uint8).to(torch.int32) - 127
    return torch.ldexp(torch.ones(scale.shape, dtype=torch.float32, device=scale.device), exponent)


def float_to_e8m0(pow2: torch.Tensor) -> torch.Tensor:
    """Exact powers of two (float32) -> float8_e8m0fnu. Raises on anything else."""
    mantissa, exponent = torch.frexp(pow2.float())
    if not bool((mantissa == 0.5).all()):
        raise ValueError("E8M0 scales must be exact powers of two")
    code = (exponent - 1 + 127)
    if bool(((code < 0) | (code > 254)).any()):
        raise ValueError("power of two outside the E8M0 range 2^-127..2^127")
    return code.to(torch.uint8).view(torch.float8_e8m0fnu)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., K] -> [..., K/block, block]; K must be a multiple of block."""
    if x.shape[-1] % block:
        raise ValueError(f"K={x.shape[-1]} is not a multiple of the block size {block}")
    return x.unflatten(-1, (-1, block))


# ---------------------------------------------------------------------------------------------
# Weight containers: the checkpoint's bytes, plus the logical [out, in] shape
# ---------------------------------------------------------------------------------------------

@dataclass
class Nvfp4Weight:
    """NVIDIA ModelOpt NVFP4: W[o,i] = e2m1(weight) * e4m3(weight_scale[o, i//16]) * weight_scale_2."""
    weight: torch.Tensor          # uint8 [N, K/2]
    weight_scale: torch.Tensor    # float8_e4m3fn [N, K/16]
    weight_scale_2: torch.Tensor  # float32 scalar
    input_scale: torch.Tensor     # float32 scalar (W4A4 calibration; unused by W4A16)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        return dequantize_nvfp4(self)

    def to(self, device) -> "Nvfp4Weight":
        return Nvfp4Weight(*(t.to(device) for t in
                             (self.weight, self.weight_scale, self.weight_scale_2, self.input_scale)))


@dataclass
class Mxfp4Weight:
    """MXFP4 (DeepSeek native experts): W[o,i] = e2m1(weight) * 2^(scale[o, i//32] - 127)."""
    weight: torch.Tensor  # int8 (or uint8) [N, K/2]
    scale: torch.Tensor   # float8_e8m0fnu [N, K/32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        return dequantize_mxfp4(self)

    def to(self, device) -> "Mxfp4Weight":
        return Mxfp4Weight(self.weight.to(device), self.scale.to(device))


@dataclass
class Fp8BlockWeight:
    """FP8 block-128: W[o,i] = e4m3(weight[o,i]) * scale[o//128, i//128]; scale E8M0 or fp32."""
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor   # float8_e8m0fnu or float32 [ceil(N/128), ceil(K/128)]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8_block(self)

    def to(self, device) -> "Fp8BlockWeight":
        return Fp8BlockWeight(self.weight.to(device), self.scale.to(device))


QuantizedWeight = Nvfp4Weight | Mxfp4Weight | Fp8BlockWeight


def slice_rows(w, start: int, stop: int):
    """Rows start:stop of a weight in any format (views; block scales follow)."""
    if isinstance(w, Fp8BlockWeight):
        return Fp8BlockWeight(w.weight[start:stop], w.scale[start // FP8_BLOCK:-(-stop // FP8_BLOCK)])
    if isinstance(w, Nvfp4Weight):
        return Nvfp4Weight(w.weight[start:stop], w.weight_scale[start:stop], w.weight_scale_2, w.input_scale)
    if isinstance(w, Mxfp4Weight):
        return Mxfp4Weight(w.weight[start:stop], w.scale[start:stop])
    return w[start:stop]


def slice_columns(w, start: int, stop: int):
    """Input columns start:stop of a weight (multiples of its scale block)."""
    if isinstance(w, Fp8BlockWeight):
        return Fp8BlockWeight(w.weight[:, start:stop], w.scale[:, start // FP8_BLOCK:-(-stop // FP8_BLOCK)])
    if isinstance(w, Nvfp4Weight):
        return Nvfp4Weight(w.weight[:, start // 2:stop // 2], w.weight_scale[:, start // NVFP4_BLOCK:stop // NVFP4_BLOCK],
                           w.weight_scale_2, w.input_scale)
    if isinstance(w, Mxfp4Weight):
        return Mxfp4Weight(w.weight[:, start // 2:stop // 2], w.scale[:, start // MXFP4_BLOCK:stop // MXFP4_BLOCK])
    return w[:, start:stop]


# ---------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------

def quantize_nvfp4(w: torch.Tensor, weight_scale_2: torch.Tensor | None = None,
                   input_scale: float = 1.0) -> Nvfp4Weight:
    """ModelOpt recipe: weight_scale_2 = amax/(6*448); block scale = e4m3(block_amax/(6*ws2)).

    Pass `weight_scale_2` to share one global scale between tensors (w1 and w3 of an expert).
    """
    w = w.float()
    if weight_scale_2 is None:
        amax = w.abs().amax()
        weight_scale_2 = torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))
    packed, scale, ws2 = _nvfp4_encode(w, weight_scale_2, saturate=False)
    return Nvfp4Weight(packed, scale, ws2, torch.tensor(float(input_scale), dtype=torch.float32, device=w.device))


def _nvfp4_encode(x: torch.Tensor, global_scale, saturate: bool):
    """Packed E2M1, E4M3 block scales (per 16 along the last dim) and the global scale."""
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(())
    blocks = _blocks(x.float(), NVFP4_BLOCK)
    ratio = blocks.abs().amax(-1) / (E2M1_MAX * gs)
    if saturate:  # activations beyond their calibration: the hardware's satfinite conversion
        ratio = ratio.clamp(max=E4M3_MAX)
    scale = ratio.to(torch.float8_e4m3fn)
    denom = scale.float().unsqueeze(-1) * gs
    scaled = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), 0.0)
    return pack_e2m1(encode_e2m1(scaled.flatten(-2))), scale, gs


def quantize_activation_nvfp4(x: torch.Tensor, input_scale) -> Nvfp4Weight:
    """W4A4 activations [T, K]: NVFP4 along K with the checkpoint's calibrated `input_scale` as the
    fixed global scale (no reduction over the batch, so a kernel doing it is graph safe). Block
    scales saturate at 448 and values at 6 when a token exceeds the calibration."""
    packed, scale, gs = _nvfp4_encode(x, input_scale, saturate=True)
    return Nvfp4Weight(packed, scale, gs, gs)


def nvfp4_qdq(x: torch.Tensor, input_scale) -> torch.Tensor:
    """Quantize-dequantize activations to NVFP4 (quantize_activation_nvfp4); fp32 out."""
    return dequantize_nvfp4(quantize_activation_nvfp4(x, input_scale))


def swizzle_scales_128x4(scales: torch.Tensor) -> torch.Tensor:
    """Block scales [M, Ks] (one byte each) -> the tensor-core layout of Blackwell's block-scaled MMA
    (cuBLAS/CUTLASS "128x4"), bytes only moved: M padded to 128 and Ks to 4 with zeros; 512-byte
    tiles in (M/128, Ks/4) row-major order; inside a tile, row r and column c sit at byte
    (r % 32) * 16 + (r // 32) * 4 + c. Returns a flat uint8 tensor."""
    m, ks = scales.shape
    raw = scales.view(torch.uint8)
    padded = torch.zeros(-(-m // 128) * 128, -(-ks // 4) * 4, dtype=torch.uint8, device=raw.device)
    padded[:m, :ks] = raw
    mb, kb = padded.shape[0] // 128, padded.shape[1] // 4
    tiles = padded.view(mb, 4, 32, kb, 4).permute(0, 3, 2, 1, 4)  # [mb, kb, r % 32, r // 32, c]
    return tiles.reshape(-1).contiguous()


def unswizzle_scales_128x4(flat: torch.Tensor, m: int, ks: int) -> torch.Tensor:
    """The inverse of swizzle_scales_128x4: uint8 [M, Ks]."""
    mb, kb = -(-m // 128), -(-ks // 4)
    tiles = flat.view(torch.uint8).view(mb, kb, 32, 4, 4).permute(0, 3, 2, 1, 4)  # [mb, r // 32, r % 32, kb, c]
    return tiles.reshape(mb * 128, kb * 4)[:m, :ks].contiguous()


def dequantize_nvfp4(q: Nvfp4Weight) -> torch.Tensor:
    values = _blocks(decode_e2m1(unpack_e2m1(q.weight)), NVFP4_BLOCK)
    scaled = values * q.weight_scale.float().unsqueeze(-1)
    return scaled.flatten(-2) * q.weight_scale_2.float()


# ---------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------

def quantize_mxfp4(w: torch.Tensor) -> Mxfp4Weight:
    """Block of 32 along K, scale 2^ceil(log2(amax/6)) (DeepSeek's FP4 recipe: nothing saturates)."""
    blocks = _blocks(w.float(), MXFP4_BLOCK)
    amax = blocks.abs().amax(-1).clamp(min=E2M1_MAX * 2.0**-126)
    scale = pow2_ceil(amax / E2M1_MAX)
    codes = encode_e2m1((blocks / scale.unsqueeze(-1)).flatten(-2))
    return Mxfp4Weight(pack_e2m1(codes).view(torch.int8), float_to_e8m0(scale))


def dequantize_mxfp4(q: Mxfp4Weight) -> torch.Tensor:
    values = _blocks(decode_e2m1(unpack_e2m1(q.weight)), MXFP4_BLOCK)
    return (values * e8m0_to_float(q.scale).unsqueeze(-1)).flatten(-2)


def mxfp4_to_nvfp4(q: Mxfp4Weight, weight_scale_2: torch.Tensor | None = None,
                   input_scale: float = 1.0) -> Nvfp4Weight:
    """Lossless MXFP4 -> NVFP4 cast: the nibbles stay bit for bit; every power-of-two E8M0 scale
    2^e becomes an E4M3 power of two 2^e / weight_scale_2 (E4M3 holds 2^-9 .. 2^8 exactly).

    `weight_scale_2` defaults to 2^(max e - 8) so the largest scale maps to 256; pass a shared one
    (a power of two) for w1/w3. Raises if a scale would fall outside E4M3's powers of two.
    """
    scale = e8m0_to_float(q.scale)
    if weight_scale_2 is None:
        weight_scale_2 = scale.amax() / 256.0
    ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=scale.device).reshape(())
    ratio = scale / ws2
    if bool(((ratio > 256.0) | (ratio < 2.0**-9)).any()):
        raise ValueError("MXFP4 scales span more than E4M3's powers of two (2^-9..2^8): "
                         "the cast to NVFP4 would not be lossless")
    nv_scale = ratio.repeat_interleave(MXFP4_BLOCK // NVFP4_BLOCK, dim=-1).to(torch.float8_e4m3fn)
    return Nvfp4Weight(q.weight.view(torch.uint8), nv_scale, ws2,
                       torch.tensor(float(input_scale), dtype=torch.float32, device=scale.device))


# ---------------------------------------------------------------------------------------------
# FP8 block-128 weights
# ---------------------------------------------------------------------------------------------

def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    n, k = w.shape
    return torch.nn.functional.pad(w, (0, (-k) % block, 0, (-n) % block))


def quantize_fp8_block(w: torch.Tensor, scale_dtype: torch.dtype = torch.float8_e8m0fnu) -> Fp8BlockWeight:
    """One scale per 128x128 block: 2^ceil(log2(amax/448)) for E8M0, amax/448 for fp32."""
    n, k = w.shape
    padded = _pad_to_blocks(w.float(), FP8_BLOCK)
    tiles = padded.unflatten(0, (-1, FP8_BLOCK)).unflatten(-1, (-1, FP8_BLOCK))  # [nb, 128, kb, 128]
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [nb, kb]
    if scale_dtype == torch.float8_e8m0fnu:
        scale = pow2_ceil(amax / E4M3_MAX)
        stored = float_to_e8m0(scale)
    elif scale_dtype == torch.float32:
        scale = amax / E4M3_MAX
        stored = scale
    else:
        raise ValueError(f"FP8 block scales are float8_e8m0fnu or float32, not {scale_dtype}")
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.flatten(2).flatten(0, 1)[:n, :k].contiguous()
    return Fp8BlockWeight(q, stored)


def fp8_block_scale_float(scale: torch.Tensor) -> torch.Tensor:
    return scale.float() if scale.dtype != torch.float8_e8m0fnu else e8m0_to_float(scale)


def dequantize_fp8_block(q: Fp8BlockWeight) -> torch.Tensor:
    n, k = q.weight.shape
    scale = fp8_block_scale_float(q.scale)
    full = scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    return q.weight.float() * full


# ---------------------------------------------------------------------------------------------
# Activations: per-token block quantization (FP8 for FP8 GEMMs and KV QAT, FP4 for the indexer)
# ---------------------------------------------------------------------------------------------

def quantize_activation_fp8(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, per `block` along K: E4M3 values and power-of-two fp32 scales
    2^ceil(log2(amax/448)), amax floored at 1e-4 (DeepSeek's act_quant with scale_fmt=ue8m0)."""
    blocks = _blocks(x.float(), block)
    amax = blocks.abs().amax(-1).clamp(min=1e-4)
    scale = pow2_ceil(amax / E4M3_MAX)
    q = (blocks / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale


def dequantize_activation_fp8(q: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    return (_blocks(q.float(), block) * scale.unsqueeze(-1)).flatten(-2)


def fp8_qdq(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Quantize-dequantize to FP8 per token per block (QAT simulation); keeps x's dtype."""
    return dequantize_activation_fp8(*quantize_activation_fp8(x, block), block).to(x.dtype)


def fp4_qdq(x: torch.Tensor, block: int = MXFP4_BLOCK) -> torch.Tensor:
    """Quantize-dequantize to E2M1 with a power-of-two scale per `block` (DeepSeek's fp4_act_quant)."""
    blocks = _blocks(x.float(), block)
    amax = blocks.abs().amax(-1).clamp(min=E2M1_MAX * 2.0**-126)
    scale = pow2_ceil(amax / E2M1_MAX).unsqueeze(-1)
    values = round_e2m1(blocks / scale) * scale
    return values.flatten(-2).to(x.dtype)
