"""The fp32-math small linears of a decode step (GPU, one run): the compressors' wkv / wgate, the
MoE gate, the indexer's weights_proj (BF16 weights, fp32 math as DeepSeek's reference) and the mHC
mixes projection (fp32), at V4-Flash widths, CUDA-graph timed, in the forms tried for them:
cuBLAS fp32 (what the model runs), Inductor's broadcast-multiply-sum over the BF16 weight, an exact
three-way BF16 split of the activations in one BF16 GEMM with fp32 output, and for the mixes the
K dimension in 64 chunks through a batched GEMM. Relative error against float64.

    python -m bench.small_linears
"""
import torch
import torch.nn.functional as F

from bench.timing import require_gpu

EPS = 1e-6


def fp32_linear(x, w):
    return F.linear(x, w.float())


def broadcast_sum(x, w):
    return (x.unsqueeze(1) * w.float()).sum(-1)


def bf16_split(x, w):
    """x = hi + mid + lo exactly (three 8-bit significands); one BF16 GEMM on the 3M rows."""
    hi = x.bfloat16()
    mid = (x - hi.float()).bfloat16()
    lo = (x - hi.float() - mid.float()).bfloat16()
    m = x.shape[0]
    y = torch.mm(torch.cat([hi, mid, lo]), w.t(), out_dtype=torch.float32)
    return y[:m] + y[m:2 * m] + y[2 * m:]


def mixes(flat, fn):
    return F.linear(flat, fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + EPS)


def mixes_chunked(flat, fn):
    b, k = flat.shape
    partial = torch.einsum("bcl,ncl->bnc", flat.view(b, 64, k // 64), fn.view(fn.shape[0], 64, k // 64))
    return partial.sum(-1) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + EPS)


def cell(f, x, w, ref) -> str:
    from triton.testing import do_bench_cudagraph
    try:
        y = f(x, w)
        torch.cuda.synchronize()
        us = do_bench_cudagraph(lambda: f(x, w)) * 1e3
        return f"{us:.1f} us ({((y.double() - ref).norm() / ref.norm()).item():.0e})"
    except Exception as e:  # a form Inductor or cuBLAS refuses: say so in the table
        return f"failed: {type(e).__name__}"


def main():
    require_gpu()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.recompile_limit = 64
    forms = {"cuBLAS fp32": fp32_linear, "compiled broadcast-sum": torch.compile(broadcast_sum),
             "BF16 split, eager": bf16_split, "BF16 split, compiled": torch.compile(bf16_split)}
    print(f"GPU: {torch.cuda.get_device_name()}; time per call (relative error against float64)")
    print("| linear | N x K | M | " + " | ".join(forms) + " |")
    print("|---" * (3 + len(forms)) + "|")
    for what, n, k in (("compressor wkv", 1024, 4096), ("gate", 256, 4096), ("weights_proj", 64, 4096)):
        w = torch.randn(n, k, device="cuda").bfloat16()
        for m in (1, 8, 32, 128):
            x = torch.randn(m, k, device="cuda")
            ref = x.double() @ w.double().t()
            print(f"| {what} | {n} x {k} | {m} | " + " | ".join(cell(f, x, w, ref) for f in forms.values()) + " |")
    fn = torch.randn(24, 16384, device="cuda")
    print("\n| mHC mixes 24 x 16384 | M | compiled as is | compiled, K in 64 chunks |")
    print("|---|---|---|---|")
    for m in (1, 8, 32, 128):
        flat = torch.randn(m, 16384, device="cuda")
        ref = mixes(flat.double(), fn.double())
        print(f"| | {m} | {cell(torch.compile(mixes), flat, fn, ref)} | {cell(torch.compile(mixes_chunked), flat, fn, ref)} |")


if __name__ == "__main__":
    main()
