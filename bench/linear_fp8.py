"""FP8 block-128 dense benchmark (GPU): our runner (activation quantizer + wgmma GEMM) vs torch BF16
matmul on the dequantized weight vs the weight-bytes floor (one streaming read of the FP8 weight and
its scales), CUDA-graph timed, one run.

    python -m bench.linear_fp8 [--tokens 1,8,32,128,1024] [--shapes flash.wq_a,...]
"""
import argparse

import torch

from bench.moe_w4a16 import graph_time
from kernels.linear import fp8_plan, linear_fp8
from tests.gpu.test_linear_fp8 import SHAPES, random_tokens, random_weight


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,32,128,1024")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--plan", default=None, help="force tile_n,stages,splits")
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    forced = tuple(int(v) for v in a.plan.split(",")) if a.plan else None
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, FP8 block-128 weights (E8M0 scales)")
    print("| projection | rows x K (groups) | T | plan | ours ms | bf16 ms | floor ms | bf16 / ours | ours / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.shapes.split(","):
        rows, k, groups = SHAPES[name]
        w = random_weight(rows, k, g)
        w_bf16 = w.dequantize().bfloat16()
        flat = torch.cat([w.weight.view(torch.uint8).view(-1), w.scale.view(torch.uint8).view(-1)])
        flat = flat[: flat.numel() // 4 * 4].view(torch.float32)
        for t in tokens:
            x = random_tokens(t, groups * k, g)
            plan = forced or fp8_plan(t, rows // groups, k, groups)
            ours = graph_time(lambda: linear_fp8(x, w, groups, plan=plan), 20)
            if groups == 1:
                base = graph_time(lambda: torch.nn.functional.linear(x, w_bf16), 20)
            else:
                wg = w_bf16.view(groups, rows // groups, k)
                base = graph_time(lambda: torch.bmm(x.view(t, groups, k).transpose(0, 1), wg.transpose(1, 2)), 20)
            floor = graph_time(lambda: flat.sum(), 20)
            print(f"| {name} | {rows}x{k} ({groups}) | {t} | {plan} | {ours:.4f} | {base:.4f} | {floor:.4f} | "
                  f"{base / ours:.2f}x | {ours / floor:.2f}x |", flush=True)
        del w, w_bf16, flat


if __name__ == "__main__":
    main()
