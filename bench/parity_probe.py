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

LENGTHS = (5, 9, 13, 20)


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
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, ck.args.vocab_size, (1, n), generator=g) for n in LENGTHS]
    states = {k: m.new_state(4, 96, with_mtp=False) for k, m in models.items()}
    logits = {k: torch.cat([m.forward(p, 0, [i], states[k])[0] for i, p in enumerate(prompts)]).float().cpu()
              for k, m in models.items()}
    print(f"{a.flavor}, simulate_qat={bool(a.qat)}: relative logits difference per step")
    print("| step | runners vs ref-cpu | ref-gpu vs ref-cpu | runners vs ref-gpu | greedy equal (runners, ref-cpu) |")
    print("|---|---|---|---|---|")
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()
    for step in range(a.steps + 1):
        r = logits["ref-cpu"]
        print(f"| {step} | {rel(logits['runners'], r):.2e} | {rel(logits['ref-gpu'], r):.2e} | "
              f"{rel(logits['runners'], logits['ref-gpu']):.2e} | "
              f"{bool(torch.equal(logits['runners'].argmax(-1), r.argmax(-1)))} |", flush=True)
        tokens = r.argmax(-1, keepdim=True)
        pos = torch.tensor(LENGTHS) + step
        for k, m in models.items():
            dev = m.device
            logits[k] = m.forward(tokens.to(dev), pos.to(dev), torch.arange(4, device=dev), states[k])[0].float().cpu()


if __name__ == "__main__":
    main()
