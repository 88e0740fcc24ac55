"""Where a decode step's GPU time goes (GPU, diagnostic): one eager step of the runner model on a
flash-shaped checkpoint under torch.profiler, kernels grouped by name, top entries by total time.

    python -m bench.decode_profile [--layers 2] [--batch 1]
"""
import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from backend.checkpoint import load_checkpoint
from backend.gpu_model import DeepseekV4Gpu
from backend.synthetic import generate
from bench.timing import require_gpu


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ck = load_checkpoint(generate(f"{tmp}/c", flavor="nvidia-nvfp4", size="flash-shaped", layers=a.layers,
                                      device="cuda"))
        model = DeepseekV4Gpu(ck.args, ck.weights, simulate_qat=True, device="cuda")
    b = a.batch
    state = model.new_state(b, 256, with_mtp=False)
    tok = torch.randint(2, 4000, (b, 1), device="cuda")
    pos, slots = torch.full((b,), 17, device="cuda"), torch.arange(b, device="cuda")
    for _ in range(2):
        model.forward(tok, pos, slots, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.forward(tok, pos, slots, state)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    launches = sum(e.count for e in events)
    print(f"GPU: {torch.cuda.get_device_name()}; {a.layers} flash-shaped layers, batch {b}: "
          f"{launches} kernels, {total / 1e3:.3f} ms of kernel time")
    print("| kernel | calls | total us | share |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
        print(f"| {e.key[:90]} | {e.count} | {e.device_time_total:.0f} | {e.device_time_total / total:.1%} |")


if __name__ == "__main__":
    main()
