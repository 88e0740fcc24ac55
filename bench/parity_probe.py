"""Where the runner model departs from the reference (GPU, diagnostic): per decode step, the
logits' relative difference of (runner model, reference on CPU), (reference on GPU, reference on
CPU) and (runner model, reference on GPU), simulate_qat on, the references with the runners' f16
activations into W4A16 GEMMs (`runner_activations`), tiny checkpoints, teacher-forced.

    python -m bench.parity_probe [--flavor nvidia-nvfp4] [--steps 8]
"""
import argparse
import tempfile

import torch

from backend.checkpoint import load_checkpoint
from backend.gpu_model import DeepseekV4Gpu
from backend.model import DeepseekV4
from backend.synthetic import generate, tiny_args
from bench.timing import require_gpu
from tests.parity import relative, teacher_forced


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="nvidia-nvfp4")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--qat", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ck = load_checkpoint(generate(f"{tmp}/c", flavor=a.flavor, args=tiny_args(index_topk=64)))
        models = {"ref-cpu": DeepseekV4(ck.args, ck.weights, simulate_qat=bool(a.qat), runner_activations=True),
                  "ref-gpu": DeepseekV4(ck.args, ck.weights, simulate_qat=bool(a.qat), device="cuda",
                                        runner_activations=True),
                  "runners": DeepseekV4Gpu(ck.args, ck.weights, simulate_qat=bool(a.qat), device="cuda")}
    print(f"{a.flavor}, simulate_qat={bool(a.qat)}: relative logits difference per step")
    print("| step | runners vs ref-cpu | ref-gpu vs ref-cpu | runners vs ref-gpu | greedy equal (runners, ref-cpu) |")
    print("|---|---|---|---|---|")
    for step, logits in enumerate(teacher_forced(models, ck.args.vocab_size, a.steps, leader="ref-cpu")):
        r, u = logits["ref-cpu"], logits["runners"]
        print(f"| {step} | {relative(u, r):.2e} | {relative(logits['ref-gpu'], r):.2e} | "
              f"{relative(u, logits['ref-gpu']):.2e} | {bool(torch.equal(u.argmax(-1), r.argmax(-1)))} |", flush=True)


if __name__ == "__main__":
    main()
