"""Dense W4A16 benchmark (GPU, one run): our runner vs torch BF16 matmul on the dequantized weight vs
the weight-bytes floor (bench.timing.stream_read of the NVFP4 weight and its scales).

Every column is timed the same way as bench.linear_fp8 (bench.timing.cold_graph_time): a CUDA graph
cycles through enough copies of the weights to defeat the 50 MB L2, as a decode step reading each
layer once does. The grouped wo_a shapes run as one launch (linear_w4a16(x, w, groups)); their BF16
baseline is a batched matmul over the groups.

    python -m bench.linear_w4a16 [--tokens 1,8,32,128,1024] [--shapes flash.wq_a,...,flash.wo_a] [--kernels]
                                 [--x-dtype bf16|fp32]

--x-dtype fp32 gives our runner fp32 activations, as the runner model feeds its dense layers (the
BF16 baseline keeps bf16 ones).

--kernels adds a column per kernel, each forced at every T: the SIMT GEMV (kernels.linear.w4a16.gemv_plan,
2 tokens per pass), the mma.sync kernel (mma_plan) and, up to 32 tokens, the wgmma kernel (wgmma_plan),
so that dense_plan's choice can be checked against each.
"""
import argparse

import torch

from bench.timing import cold_graph_time, dense_baselines, l2_defeat_copies, require_gpu
from kernels.formats import Nvfp4Weight, mxfp4_to_nvfp4, quantize_mxfp4
from kernels.linear import linear_w4a16
from kernels.linear.w4a16 import gemv_plan, mma_plan, wgmma_plan
from tests.gpu.test_linear_w4a16 import GROUPED, SHAPES


def shape_of(name: str) -> tuple[int, int, int]:
    """(groups, rows per group, K per group)"""
    return GROUPED[name] if name in GROUPED else (1, *SHAPES[name])


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,32,128,1024")
    p.add_argument("--shapes", default=",".join([*SHAPES, *GROUPED]))
    p.add_argument("--kernels", action="store_true", help="also time each kernel, forced")
    p.add_argument("--x-dtype", choices=("bf16", "fp32"), default="bf16", help="our runner's activation dtype")
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, NVFP4 weights, {a.x_dtype} activations, "
          "L2 defeated")
    forced = " gemv ms | mma ms | wgmma ms |" if a.kernels else ""
    print(f"| projection | rows x K (groups) | T | ours ms |{forced} bf16 ms | floor ms | bf16 / ours | ours / floor |")
    print("|---|---|---|---|---|---|---|---|" + "---|---|---|" * a.kernels)
    for name in a.shapes.split(","):
        groups, rows, k = shape_of(name)
        w0 = mxfp4_to_nvfp4(quantize_mxfp4(torch.randn(groups * rows, k, device="cuda", generator=g) * k ** -0.5))
        copies = l2_defeat_copies(w0.weight.numel() + w0.weight_scale.numel())
        ws = [w0] + [Nvfp4Weight(w0.weight.clone(), w0.weight_scale.clone(), w0.weight_scale_2, w0.input_scale)
                     for _ in range(copies - 1)]
        bf16 = [w.dequantize().bfloat16() for w in ws[: max(2, copies // 4)]]  # 4x the bytes per copy
        flats = [torch.cat([w.weight.view(-1), w.weight_scale.view(torch.uint8).view(-1)]) for w in ws]
        flats = [f[: f.numel() // 4 * 4].view(torch.int32) for f in flats]
        for t in tokens:
            x = torch.randn(t, groups * k, device="cuda", generator=g).bfloat16()
            x_ours = x.float() if a.x_dtype == "fp32" else x
            ours = cold_graph_time([lambda w=w: linear_w4a16(x_ours, w, groups) for w in ws])
            cells = ""
            if a.kernels:
                gemv = dict(gemv_plan(2, groups * rows, k), n_tiles=min(t, 2))
                mma = mma_plan(min(max(t, 2), 32), groups * rows // 16, k)
                wgmma = wgmma_plan(t, rows, k, groups) if t <= 32 and k % 512 == 0 else None
                cells = "".join(f" {cold_graph_time([lambda w=w, c=knobs: linear_w4a16(x_ours, w, groups, c) for w in ws]):.4f} |"
                                if knobs else " - |" for knobs in (gemv, mma, wgmma))
            base, floor = dense_baselines(x, bf16, flats, groups)
            print(f"| {name} | {groups * rows}x{k} ({groups}) | {t} | {ours:.4f} |{cells} {base:.4f} | {floor:.4f} | "
                  f"{base / ours:.2f}x | {ours / floor:.2f}x |", flush=True)
        del ws, bf16, flats


if __name__ == "__main__":
    main()
