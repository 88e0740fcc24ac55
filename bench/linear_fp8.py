"""FP8 block-128 dense benchmark (GPU, one run): our runner (activation quantizer + wgmma GEMM, or the
GEMM alone on an input quantized once for several layers) vs torch BF16 matmul on the dequantized
weight vs the weight-bytes floor (bench.timing.stream_read of the FP8 weight and its scales).

Every column is timed the same way (bench.timing.cold_graph_time): a CUDA graph cycles through
enough copies of the weights to defeat the 50 MB L2, as a decode step reading each layer once does.

    python -m bench.linear_fp8 [--tokens 1,8,32,128,1024] [--shapes flash.wq_a,...] [--plan 8,8,4,2]
                               [--splits 1,2,4]

--splits sweeps the K splits on the planner's tile (one row per count), to check its split rule.
"""
import argparse

import torch

from bench.timing import cold_graph_time, dense_baselines, l2_defeat_copies, require_gpu
from kernels.linear import fp8_plan, linear_fp8, quantize_rows_fp8
from tests.gpu.test_linear_fp8 import SHAPES, random_tokens, random_weight


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,32,128,1024")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--plan", default=None, help="force tile_n,stages,splits,consumers")
    p.add_argument("--splits", default=None, help="sweep these K split counts on the planner's tile")
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    forced = tuple(int(v) for v in a.plan.split(",")) if a.plan else None
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, FP8 block-128 weights (E8M0 scales), "
          "L2 defeated")
    print("| projection | rows x K (groups) | T | plan | ours ms | GEMM only ms | bf16 ms | floor ms | bf16 / ours "
          "| ours / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.shapes.split(","):
        rows, k, groups = SHAPES[name]
        w0 = random_weight(rows, k, g)
        copies = l2_defeat_copies(w0.weight.numel() + w0.scale.numel() * w0.scale.element_size())
        ws = [w0] + [type(w0)(w0.weight.clone(), w0.scale.clone()) for _ in range(copies - 1)]
        bf16 = [w.dequantize().bfloat16() for w in ws[: max(2, copies // 2)]]  # twice the bytes per copy
        flats = [torch.cat([w.weight.view(torch.uint8).view(-1), w.scale.view(torch.uint8).view(-1)]) for w in ws]
        flats = [f[: f.numel() // 4 * 4].view(torch.int32) for f in flats]
        for t in tokens:
            x = random_tokens(t, groups * k, g)
            xq = quantize_rows_fp8(x)
            plan = forced or fp8_plan(t, rows // groups, k, groups)
            plans = [plan] if a.splits is None else [(*plan[:2], int(s), plan[3]) for s in a.splits.split(",")]
            base, floor = dense_baselines(x, bf16, flats, groups)
            for plan in plans:
                ours = cold_graph_time([lambda w=w: linear_fp8(x, w, groups, plan=plan) for w in ws])
                gemm = cold_graph_time([lambda w=w: linear_fp8(xq, w, groups, plan=plan) for w in ws])
                print(f"| {name} | {rows}x{k} ({groups}) | {t} | {plan} | {ours:.4f} | {gemm:.4f} | {base:.4f} | "
                      f"{floor:.4f} | {base / ours:.2f}x | {ours / floor:.2f}x |", flush=True)
        del ws, bf16, flats


if __name__ == "__main__":
    main()
