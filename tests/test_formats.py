"""Formats: every E2M1 code, hand-computed blocks, edge cases, and agreement with torch's dtypes."""
import pytest
import torch

from kernels import formats as F
from kernels.hadamard import hadamard, hadamard_transform
from kernels.linear import dequantize_weight, linear_ref

ALL_CODE_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_every_e2m1_code_decodes_and_reencodes():
    codes = torch.arange(16, dtype=torch.uint8)
    values = F.decode_e2m1(codes)
    assert values.tolist() == ALL_CODE_VALUES
    assert torch.signbit(values[8])  # code 8 is negative zero
    assert F.encode_e2m1(values).tolist() == list(range(16))


@pytest.mark.parametrize("x, code", [
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),       # ties to even
    (0.26, 1), (0.74, 1), (1.26, 3), (2.6, 5), (4.9, 6), (5.1, 7),                  # nearest
    (6.0, 7), (7.0, 7), (1e9, 7), (float("inf"), 7), (-100.0, 15),                   # saturation
    (-0.0, 8), (-0.2, 8), (0.1, 0), (-0.75, 10),                                     # signs
])
def test_e2m1_rounding(x, code):
    assert F.encode_e2m1(torch.tensor([x])).item() == code


def test_table_free_rounding_is_encode_then_decode_bit_for_bit():
    """round_e2m1 (fp4_qdq's rounding, compiled into decode graphs) against the code tables, on the
    hand-picked cases above (ties, saturation, signed zeros) and random values of every magnitude."""
    edges = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 0.74, 2.6, 4.9, 5.1, 6.0, 7.0, 1e9,
                          float("inf"), 0.0, 1e-30])
    rand = torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 4
    x = torch.cat([edges, -edges, rand])
    want = F.decode_e2m1(F.encode_e2m1(x))
    assert torch.equal(F.round_e2m1(x).view(torch.int32), want.view(torch.int32))


def test_pack_low_nibble_first_and_round_trip():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = F.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert torch.equal(F.unpack_e2m1(packed), codes)
    # The same bytes are torch's float4_e2m1fn_x2 (two codes per element, same order).
    as_fp4 = packed.view(torch.float4_e2m1fn_x2)
    assert as_fp4.shape == (1, 2) and torch.equal(F.unpack_e2m1(as_fp4), codes)
    rand = torch.randint(0, 16, (7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(F.unpack_e2m1(F.pack_e2m1(rand)), rand)


def test_nvfp4_hand_computed_block():
    # One row, one block of 16, amax 12 -> weight_scale_2 = 12 / (6*448); block scale = 12 / (6 * ws2) = 448.
    row = torch.tensor([[12.0, -6.0, 3.0, 1.0, 0.5, 0.0, -12.0, 9.0] + [0.0] * 8])
    q = F.quantize_nvfp4(row)
    assert q.weight_scale_2.item() == pytest.approx(12.0 / (6 * 448))
    assert q.weight_scale.float().item() == 448.0
    # x / (448 * ws2) = x / 2: 6, -3, 1.5, 0.5, 0.25 (tie -> 0), 0, -6, 4.5 (-> 4)
    codes = F.unpack_e2m1(q.weight)[0, :8].tolist()
    assert codes == [7, 13, 3, 1, 0, 0, 15, 6]
    assert q.dequantize()[0, :8].tolist() == pytest.approx([12.0, -6.0, 3.0, 1.0, 0.0, 0.0, -12.0, 8.0])


def test_nvfp4_zero_block_and_zero_tensor():
    w = torch.zeros(2, 32)
    w[1, 16:] = torch.linspace(-3, 3, 16)
    q = F.quantize_nvfp4(w)
    assert q.weight_scale.float()[0].tolist() == [0.0, 0.0]
    assert torch.equal(q.dequantize()[0], torch.zeros(32))
    assert torch.isfinite(q.dequantize()).all()
    q0 = F.quantize_nvfp4(torch.zeros(1, 16))
    assert torch.equal(q0.dequantize(), torch.zeros(1, 16)) and q0.weight_scale_2.item() > 0


def test_mxfp4_hand_computed_block():
    row = torch.zeros(1, 32)
    row[0, :4] = torch.tensor([10.0, -2.5, 0.3, 7.0])  # amax 10 -> scale 2^ceil(log2(10/6)) = 2
    q = F.quantize_mxfp4(row)
    assert q.weight.dtype == torch.int8 and q.scale.dtype == torch.float8_e8m0fnu
    assert q.scale.float().item() == 2.0
    # 5 -> 4 (tie to even), -1.25 -> -1, 0.15 -> 0, 3.5 -> 4 (tie to even)
    assert q.dequantize()[0, :4].tolist() == [8.0, -2.0, 0.0, 8.0]


def test_fp8_block_hand_computed_and_scale_dtypes():
    w = torch.zeros(130, 260)
    w[0, 0], w[129, 259], w[5, 200] = 448.0 * 3, -1.0, 0.1
    q = F.quantize_fp8_block(w)
    assert q.scale.shape == (2, 3) and q.scale.dtype == torch.float8_e8m0fnu
    assert q.scale.float()[0, 0].item() == 4.0  # 2^ceil(log2(1344/448)) = 4
    assert q.dequantize()[0, 0].item() == 1280.0  # 336 is an E4M3 tie (320 | 352): to even
    assert q.dequantize()[129, 259].item() == -1.0
    q32 = F.quantize_fp8_block(w, torch.float32)
    assert q32.scale.dtype == torch.float32 and q32.scale[0, 0].item() == pytest.approx(3.0)
    assert q32.dequantize()[0, 0].item() == pytest.approx(1344.0)


def test_fp8_values_match_torch_cast():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 3
    q, scale = F.quantize_activation_fp8(x)
    expected = (x.unflatten(-1, (2, 128)) / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).flatten(-2)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


def test_e8m0_agrees_with_torch():
    pow2 = torch.tensor([2.0**-127, 2.0**-20, 0.25, 1.0, 4.0, 2.0**127])
    ours = F.float_to_e8m0(pow2)
    assert torch.equal(ours.view(torch.uint8), pow2.to(torch.float8_e8m0fnu).view(torch.uint8))
    assert torch.equal(F.e8m0_to_float(ours), pow2)
    assert torch.equal(F.e8m0_to_float(ours.view(torch.uint8)), pow2)
    with pytest.raises(ValueError):
        F.float_to_e8m0(torch.tensor([3.0]))


def test_pow2_ceil_is_exact():
    x = torch.tensor([1.0, 1.5, 0.75, 2.0**-30, 3e-5, 1000.0])
    assert F.pow2_ceil(x).tolist() == [1.0, 2.0, 1.0, 2.0**-30, 2.0**-15, 1024.0]


def test_activation_fp8_amax_floor_and_power_of_two_scale():
    x = torch.zeros(2, 128)
    x[1, 3] = 900.0
    q, scale = F.quantize_activation_fp8(x)
    assert scale[0, 0].item() == F.pow2_ceil(torch.tensor(1e-4 / 448)).item()  # all-zero block: floor
    assert scale[1, 0].item() == 4.0 and q[1, 3].float().item() == 224.0
    assert F.fp8_qdq(x)[1, 3].item() == 896.0


def test_fp4_qdq_matches_hand_computation():
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([12.0, 5.0, -1.0])  # scale 2^ceil(log2(2)) = 2 -> 6, 2.5->2, -0.5
    assert F.fp4_qdq(x)[0, :3].tolist() == [12.0, 4.0, -1.0]


def test_mxfp4_to_nvfp4_is_lossless():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    mx = F.quantize_mxfp4(w)
    nv = F.mxfp4_to_nvfp4(mx)
    assert torch.equal(nv.weight, mx.weight.view(torch.uint8))  # nibbles bit for bit
    assert torch.equal(nv.dequantize(), mx.dequantize())
    mant, _ = torch.frexp(nv.weight_scale.float())
    assert bool((mant == 0.5).all()) and torch.frexp(nv.weight_scale_2)[0].item() == 0.5


def test_mxfp4_to_nvfp4_refuses_scales_outside_e4m3():
    w = torch.ones(1, 64)
    w[0, 32:] = 2.0**-20
    with pytest.raises(ValueError, match="lossless"):
        F.mxfp4_to_nvfp4(F.quantize_mxfp4(w))


def test_hadamard_is_orthonormal():
    h = hadamard(128)
    assert torch.allclose(h @ h.T, torch.eye(128), atol=1e-6)
    with pytest.raises(ValueError):
        hadamard(96)


def test_hadamard_transform_is_the_matrix_product():
    """The fast transform against x @ hadamard(n) in float64 (orders 1 to 128, random rows with
    leading dims), and by hand at order 2 and 4."""
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 8, 128):
        x = torch.randn(3, 2, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
        assert torch.allclose(hadamard_transform(x), x @ hadamard(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(hadamard_transform(torch.tensor([3.0, 1.0])), torch.tensor([4.0, 2.0]) / 2 ** 0.5)
    assert torch.allclose(hadamard_transform(torch.tensor([1.0, 2.0, 3.0, 4.0])),
                          torch.tensor([10.0, -2.0, -4.0, 0.0]) / 2)
    with pytest.raises(ValueError):
        hadamard_transform(torch.ones(96))


def test_linear_ref_dequantizes_each_format_on_the_fly():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 256, generator=g) / 16
    x = torch.randn(5, 256, generator=g)
    for q in (F.quantize_nvfp4(w), F.quantize_mxfp4(w), F.quantize_fp8_block(w)):
        ref = x @ dequantize_weight(q).T
        assert torch.allclose(linear_ref(x, q), ref, rtol=1e-5, atol=1e-5)
        assert (ref - x @ w.T).norm() / (x @ w.T).norm() < 0.15  # quantization error, not layout garbage
    fp8 = F.quantize_fp8_block(w)
    assert torch.allclose(linear_ref(x, fp8, quantize_input=True), F.fp8_qdq(x) @ fp8.dequantize().T)
