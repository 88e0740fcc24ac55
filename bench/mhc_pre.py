"""The mHC pre-mix of a sublayer (GPU, one run): kernels.mhc.mhc_pre (two CuTe DSL kernels) against
the torch baseline, their twin (backend.model.mhc_pre_reference: the reference's pieces and the
FP8 quantization of the result) through torch.compile, and against the floor, one streaming read of
the bytes a call must read (the fp32 mix rows and the streams). Timed cold as a decode step reads
a layer: copies of the rows and streams cycled in one CUDA graph, so none is still in L2.

    python -m bench.mhc_pre
"""
import torch

from backend.model import mhc_pre_reference
from bench.timing import cold_graph_time, l2_defeat_copies, require_gpu, stream_read
from kernels.mhc import mhc_pre

WIDTHS = {"flash": 4096, "pro": 7168}
TOKENS = (1, 8, 32, 128)
ITERS, EPS = 20, 1e-6


def main():
    require_gpu()
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(mhc_pre_reference)
    print(f"GPU: {torch.cuda.get_device_name()}; ms per call, cold rows and streams; ratios of the same run")
    print("| model | T | ours ms | torch compiled ms | floor ms | torch / ours | ours / floor | x rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dim in WIDTHS.items():
        g = torch.Generator(device="cuda").manual_seed(dim)
        scale, base = torch.rand(3, device="cuda", generator=g) + 0.5, torch.randn(24, device="cuda", generator=g)
        norm = torch.rand(dim, device="cuda", generator=g) + 0.5
        for t in TOKENS:
            # Each copy: the mix rows, then the streams, in one buffer (the floor reads it once).
            rows, streams = 24 * 4 * dim, t * 4 * dim
            buffers = [torch.cat([torch.randn(rows, device="cuda", generator=g) * 0.05,
                                  torch.randn(streams, device="cuda", generator=g)])
                       for _ in range(l2_defeat_copies(4 * (rows + streams)))]
            args = [(b[rows:].view(t, 4, dim), b[:rows].view(24, 4 * dim), scale, base, norm) for b in buffers]
            ours = cold_graph_time([lambda a=a: mhc_pre(*a, ITERS, EPS, EPS, True) for a in args])
            base_ms = cold_graph_time([lambda a=a: compiled(*a, ITERS, EPS, EPS, True) for a in args])
            floor = cold_graph_time([lambda b=b: stream_read(b.view(torch.int32)) for b in buffers])
            x, x_ref = (f(*args[0], ITERS, EPS, EPS, True)[0] for f in (mhc_pre, mhc_pre_reference))
            diff = ((x - x_ref).norm() / x_ref.norm()).item()
            print(f"| {name} | {t} | {ours:.4f} | {base_ms:.4f} | {floor:.4f} | {base_ms / ours:.2f}x | "
                  f"{ours / floor:.2f}x | {diff:.1e} |", flush=True)

if __name__ == "__main__":
    main()
