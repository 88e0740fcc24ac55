"""The tensor-core W4A16 kernel's lane arithmetic, emulated on the CPU (kernels/moe/w4a16_mma_sm90.py):
which K positions each lane loads for A (weights) and B (activations), the E2M1 pair decode, the
block scale folded into f16 exactly, and mma.sync m16n8k16's fragment layout as the PTX ISA defines
it. Checked against x @ dequantize(W)^T, so a wrong permutation or an inexact scale fold fails here
before any GPU run."""
import numpy as np
import pytest
import torch

from kernels.formats import quantize_mxfp4, quantize_nvfp4
from kernels.moe import pair_order


def f16x2(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def word_of(halves) -> int:
    lo, hi = np.array(halves, dtype=np.float16).view(np.uint16)
    return int(lo) | (int(hi) << 16)


def e2m1_pair(word: int, j: int) -> int:
    """The kernel's decode (`_e2m1_pair`, its shifts and masks on 32 bits): nibbles j and j+4 of 8
    as f16 (value * 2^-14)."""
    magnitude = word << (9 - 4 * j) if j < 3 else word >> 3
    sign = word << (12 - 4 * j) if j < 3 else word
    return ((magnitude & 0x0E000E00) | (sign & 0x80008000)) & 0xFFFFFFFF


def test_pair_decode_gives_every_e2m1_value():
    """Hand check of the decode against the E2M1 table, for all 16 x 16 codes of the pair and
    random other nibbles (which the masks must drop)."""
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    rng = np.random.default_rng(3)
    for j in range(4):
        for lo in range(16):
            for hi in range(16):
                word = int(rng.integers(0, 2**32)) & ~((0xF << (4 * j)) | (0xF << (16 + 4 * j)))
                word |= (lo << (4 * j)) | (hi << (16 + 4 * j))
                want = [(-1) ** (c >> 3) * table[c & 7] * 2.0**-14 for c in (lo, hi)]
                got = f16x2(e2m1_pair(word, j)).astype(np.float64)
                assert np.array_equal(got, want) and np.array_equal(np.signbit(got), [lo >> 3, hi >> 3])


def scale_f16x2(byte: int, nvfp4: bool) -> int:
    if nvfp4:  # cvt.rn.f16x2.e4m3x2 of (byte, byte)
        v = torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).half().item()
        return word_of([v, v])
    field = max(min(byte - 98, 30), 0)  # E8M0 times 2^14 as an f16 exponent
    return (field << 10) | (field << 26)


def scale_pair(scale_bytes, row: int, chunk: int, nvfp4: bool) -> list[int]:
    """The kernel's scales for one lane's 32 weights of a row: NVFP4 reads the 2 bytes as one 16-bit
    word (little-endian: the first 16 weights' scale low), converts both with cvt.rn.f16x2.e4m3x2 and
    broadcasts each half with prmt; MXFP4 reads its one byte."""
    if not nvfp4:
        return [scale_f16x2(int(scale_bytes[row, chunk]), False)]
    word16 = int(scale_bytes[row, 2 * chunk: 2 * chunk + 2].view(np.uint16)[0])
    lo, hi = (torch.tensor([word16 & 0xFF, word16 >> 8], dtype=torch.uint8).view(torch.float8_e4m3fn)
              .half().numpy())
    return [word_of([lo, lo]), word_of([hi, hi])]


def hmul2_exact(a: int, b: int) -> int:
    """mul.rn.f16x2, asserting the product needs no rounding (the kernel's exactness claim)."""
    exact = f16x2(a).astype(np.float64) * f16x2(b).astype(np.float64)
    rounded = exact.astype(np.float16)
    assert np.array_equal(rounded.astype(np.float64), exact), (exact, rounded)
    return word_of(rounded)


def emulate(packed, scale_bytes, global_scale, x, nvfp4):
    """One (expert, all rows) GEMM as the kernel computes it: for every warp of 16 rows, for every
    128-wide K block, every lane's loads, then 8 MMA steps whose operands are gathered from the
    lanes by the PTX fragment layout. -> [T, N] float64."""
    n, k = packed.shape[0], packed.shape[1] * 2
    t_count = x.shape[0]
    w_words = packed.view(np.uint32).reshape(n, k // 32, 4)
    x_words = pair_order(x).view(torch.int32).numpy().view(np.uint32).reshape(t_count, k // 8, 4)
    out = np.zeros((t_count, n))
    for n0 in range(0, n, 16):
        acc = np.zeros((32, 4))
        for kb in range(k // 128):
            lanes = []
            for lane in range(32):
                g, t = lane // 4, lane % 4
                wq = [[int(w) for w in w_words[n0 + g + 8 * r, kb * 4 + t]] for r in range(2)]
                sc = [scale_pair(scale_bytes, n0 + g + 8 * r, kb * 4 + t, nvfp4) for r in range(2)]
                token = min(g, t_count - 1)  # absent columns repeat a real token and are discarded
                xq = [[int(w) for w in x_words[token, kb * 16 + 4 * w + t]] for w in range(4)]
                lanes.append((wq, sc, xq))
            for s in range(8):
                w, p = s // 2, 2 * (s % 2)
                b = w // 2 if nvfp4 else 0
                a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
                for lane, (wq, sc, xq) in enumerate(lanes):
                    g, t = lane // 4, lane % 4
                    a_mat[g, 2 * t:2 * t + 2] = f16x2(hmul2_exact(e2m1_pair(wq[0][w], p), sc[0][b]))
                    a_mat[g + 8, 2 * t:2 * t + 2] = f16x2(hmul2_exact(e2m1_pair(wq[1][w], p), sc[1][b]))
                    a_mat[g, 2 * t + 8:2 * t + 10] = f16x2(hmul2_exact(e2m1_pair(wq[0][w], p + 1), sc[0][b]))
                    a_mat[g + 8, 2 * t + 8:2 * t + 10] = f16x2(hmul2_exact(e2m1_pair(wq[1][w], p + 1), sc[1][b]))
                    b_mat[2 * t:2 * t + 2, g] = f16x2(xq[w][p])
                    b_mat[2 * t + 8:2 * t + 10, g] = f16x2(xq[w][p + 1])
                d = a_mat @ b_mat
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    acc[lane] += (d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1])
        correction = 2.0**14 if nvfp4 else 1.0
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i in range(4):
                token = 2 * t + i % 2
                if token < t_count:
                    out[token, n0 + g + 8 * (i // 2)] = acc[lane, i] * global_scale * correction
    return out


@pytest.mark.parametrize("fmt,tokens", [("nvfp4", 8), ("nvfp4", 5), ("mxfp4", 8)])
def test_lane_arithmetic_is_the_dequantized_matmul(fmt, tokens):
    g = torch.Generator().manual_seed(tokens)
    # Block magnitudes spread over many binades, so E4M3 scales include subnormals and the fold is tested.
    w = torch.randn(32, 256, generator=g) * torch.exp(2 * torch.randn(32, 16, generator=g)).repeat_interleave(16, 1)
    if fmt == "nvfp4":
        q = quantize_nvfp4(w)
        packed, scales, gs = q.weight.view(torch.uint8), q.weight_scale.view(torch.uint8), float(q.weight_scale_2)
    else:
        q = quantize_mxfp4(w * 0.01)
        packed, scales, gs = q.weight.view(torch.uint8), q.scale.view(torch.uint8), 1.0
    x = torch.randn(tokens, 256, generator=g).half()
    ref = x.double() @ q.dequantize().double().T
    out = emulate(packed.numpy(), scales.numpy(), gs, x, fmt == "nvfp4")
    # The reference rounds w to fp32 once (the global scale); the emulation is exact until the sum.
    assert np.abs(out - ref.numpy()).max() <= 1e-6 * np.abs(ref.numpy()).max()


def test_activation_position_is_where_pair_order_puts_each_element():
    """L1's epilogue writes h[n] at activation_position(n) and L2 reads h as pair_order lays out x:
    the two must agree, element for element, and be a permutation within each 128."""
    from kernels.moe import activation_position
    d = 384
    x = torch.arange(d, dtype=torch.float32).repeat(2, 1)  # exact in f16
    laid_out = pair_order(x)
    n = torch.arange(d)
    pos = activation_position(n)
    assert torch.equal(laid_out[:, pos].float(), x)
    assert torch.equal(torch.sort(pos).values, n) and torch.equal(pos // 128, n // 128)
    assert [activation_position(int(i)) for i in range(16)] == [int(p) for p in pos[:16]]  # ints too
    # hand-checked: the pair order within 8, chunk/vector swap within 128
    assert [int(p) for p in pos[:8]] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert int(pos[8]) == 32 and int(pos[32]) == 8 and int(pos[40]) == 40 and int(pos[128 + 97]) == 128 + 2 + 32 * 0 + 8 * 3
