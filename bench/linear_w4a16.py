"""Dense W4A16 benchmark (GPU): our runner vs torch BF16 matmul on the dequantized weight vs the
weight-bytes floor (one streaming read of the NVFP4 weight and scales), CUDA-graph timed, one run.

    python -m bench.linear_w4a16 [--tokens 1,8,32,128,1024]
"""
import argparse

import torch

from bench.timing import graph_time, require_gpu
from kernels.formats import mxfp4_to_nvfp4, quantize_mxfp4
from kernels.linear import linear_w4a16
from tests.gpu.test_linear_w4a16 import SHAPES


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,32,128,1024")
    p.add_argument("--shapes", default=",".join(SHAPES))
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, NVFP4 weights")
    print("| projection | N x K | T | ours ms | bf16 ms | floor ms | bf16 / ours | ours / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        w = mxfp4_to_nvfp4(quantize_mxfp4(torch.randn(n, k, device="cuda") * k ** -0.5))
        w_bf16 = w.dequantize().bfloat16()
        flat = torch.cat([w.weight.view(-1), w.weight_scale.view(torch.uint8).view(-1)])
        flat = flat[: flat.numel() // 4 * 4].view(torch.float32)
        for t in tokens:
            x = torch.randn(t, k, device="cuda").bfloat16()
            ours = graph_time(lambda: linear_w4a16(x, w), 20)
            base = graph_time(lambda: torch.nn.functional.linear(x, w_bf16), 20)
            floor = graph_time(lambda: flat.sum(), 20)
            print(f"| {name} | {n}x{k} | {t} | {ours:.4f} | {base:.4f} | {floor:.4f} | {base / ours:.2f}x | "
                  f"{ours / floor:.2f}x |", flush=True)
        del w, w_bf16, flat


if __name__ == "__main__":
    main()
