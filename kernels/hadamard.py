"""The Hadamard rotation of DeepSeek-V4's indexer QAT (keys and queries are rotated before their FP4
rounding): the orthonormal Sylvester matrix, and the same map as a fast transform."""
from __future__ import annotations

import torch


def hadamard(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), scaled by n^-0.5 (orthonormal)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * n ** -0.5).to(device=device, dtype=dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard(n) over the last dim (n a power of two) without the matrix: the fast
    Walsh-Hadamard transform, log2(n) stages of (a + b, a - b) on index pairs one bit apart, then
    the n^-0.5 once. The same map; the fp32 sums round in another order. Pointwise stages, so a
    compiled piece fuses them where a small matmul was a GEMM launch of its own."""
    n = x.shape[-1]
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    lead, h = x.shape[:-1], 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n) * n ** -0.5
