"""Where a decode step's GPU time goes (GPU, diagnostic): one step of the runner model on a
flash-shaped checkpoint under torch.profiler, replayed from its CUDA graph (as served) or eager,
kernels grouped by name, top entries by total time, and the step's wall time against its kernel
time (the difference is the gaps between kernels).

    python -m bench.decode_profile [--layers 2] [--batch 1] [--pieces eager|compiled] [--eager-step]
"""
import argparse
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from backend.checkpoint import load_checkpoint
from backend.engine.cuda_graphs import DecodeGraphs
from backend.gpu_model import DeepseekV4Gpu
from backend.synthetic import generate
from bench.timing import require_gpu


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pieces", choices=("eager", "compiled"), default="eager",
                   help="the torch pieces between the runners eager or through torch.compile")
    p.add_argument("--eager-step", action="store_true", help="profile an eager step instead of a graph replay")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ck = load_checkpoint(generate(f"{tmp}/c", flavor="nvidia-nvfp4", size="flash-shaped", layers=a.layers,
                                      device="cuda"))
        model = DeepseekV4Gpu(ck.args, ck.weights, simulate_qat=True, device="cuda",
                              compile_attention=a.pieces == "compiled")
    b = a.batch
    state = model.new_state(b + 1, 256, with_mtp=False)
    tokens, positions, slots = torch.randint(2, 4000, (b,)).tolist(), [17] * b, list(range(b))
    if a.eager_step:
        tok, pos, sl = (torch.tensor(tokens, device="cuda").view(b, 1), torch.tensor(positions, device="cuda"),
                        torch.arange(b, device="cuda"))
        step = lambda: model.forward(tok, pos, sl, state)  # noqa: E731
    else:
        graphs = DecodeGraphs(model, state, max_batch=b, scratch_slot=b)
        step = lambda: graphs.run(tokens, positions, slots)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 10 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    launches = sum(e.count for e in events)
    how = "eager step" if a.eager_step else "graph replay"
    print(f"GPU: {torch.cuda.get_device_name()}; {a.layers} flash-shaped layers, batch {b}, {how}, torch pieces "
          f"{a.pieces}: {launches} kernels ({launches / a.layers:.0f} per layer), {total / 1e3:.3f} ms of kernel "
          f"time in a {wall_ms:.3f} ms step")
    print("| kernel | calls | total us | mean us | share |")
    print("|---|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:a.top]:
        print(f"| {e.key[:90]} | {e.count} | {e.device_time_total:.0f} | {e.device_time_total / e.count:.1f} "
              f"| {e.device_time_total / total:.1%} |")


if __name__ == "__main__":
    main()
