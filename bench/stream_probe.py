"""Graph replay against eager decode with the compiled pieces (GPU, diagnostic): per decode step,
the largest logit difference between a graph replay and an eager step of the same rows, with the
side streams off, on with every lane joined at once (serial), and on (parallel branches). Tells a
cross-stream hazard (only "parallel" differs) from compiled kernels that are not bit-reproducible
between a graph and an eager call (all three differ alike). Tiny checkpoint, 4 sequences.

    python -m bench.stream_probe [--flavor nvidia-nvfp4] [--steps 16]
"""
import argparse
import contextlib
import tempfile

import torch

from backend.checkpoint import load_checkpoint
from backend.engine.cuda_graphs import DecodeGraphs
from backend.gpu_model import DeepseekV4Gpu
from backend.synthetic import generate, tiny_args
from bench.timing import require_gpu
from tests.parity import LENGTHS, prefill, prompts


def serial_lanes(model: DeepseekV4Gpu):
    """model.beside on its side streams, each lane joined as soon as its work is queued."""
    @contextlib.contextmanager
    def beside(lane: int = 0):
        with DeepseekV4Gpu.beside(model, lane):
            yield
        model.join()
    return beside


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="nvidia-nvfp4")
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ck = load_checkpoint(generate(f"{tmp}/c", flavor=a.flavor, args=tiny_args()))
        model = DeepseekV4Gpu(ck.args, ck.weights, simulate_qat=True, device="cuda", compile_attention=True,
                              overlap=True)
    lanes = model.side_streams
    print(f"{a.flavor}, compiled pieces: max |graph - eager| of the logits per decode step (* = greedy tokens differ)")
    print("| side streams | " + " | ".join(str(s) for s in range(a.steps)) + " |")
    print("|---|" + "---|" * a.steps)
    for mode in ("off", "serial", "parallel"):
        model.side_streams = () if mode == "off" else lanes
        if mode == "serial":
            model.beside = serial_lanes(model)
        else:
            model.__dict__.pop("beside", None)
        eager_state, graph_state = (model.new_state(len(LENGTHS) + 1, 96, with_mtp=False) for _ in range(2))
        graphs = DecodeGraphs(model, graph_state, max_batch=len(LENGTHS), scratch_slot=len(LENGTHS))
        le = prefill(model, eager_state, prompts(ck.args.vocab_size))
        prefill(model, graph_state, prompts(ck.args.vocab_size))
        cells = []
        for step in range(a.steps):
            tokens = le.argmax(-1)
            positions = [n + step for n in LENGTHS]
            le = model.forward(tokens.view(-1, 1).cuda(), torch.tensor(positions).cuda(),
                               torch.arange(len(LENGTHS), device="cuda"), eager_state)[0].float().cpu()
            lg = graphs.run(tokens.tolist(), positions, list(range(len(LENGTHS)))).float().cpu()
            flip = "" if torch.equal(le.argmax(-1), lg.argmax(-1)) else "*"
            cells.append(f"{(le - lg).abs().max().item():.2g}{flip}")
        print(f"| {mode} | " + " | ".join(cells) + " |", flush=True)
        del graphs


if __name__ == "__main__":
    main()
