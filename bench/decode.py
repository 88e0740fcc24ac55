"""Decode-step benchmark (GPU, one run): the model on the kernel runners, CUDA-graph replay vs eager,
per layer, against the weight-bytes floor of the step.

    python -m bench.decode [--layers 4] [--batch 1,8,32,128] [--flavor nvidia-nvfp4] [--pieces eager,compiled]
                           [--side-streams on,off] [--inductor-pdl on,off]

A flash-shaped checkpoint (real V4-Flash widths, `--layers` layers) is generated on the GPU. The floor
is the bytes one step must read (every non-expert weight of the layers, the distinct routed experts
the batch's routing picks, the head), at the bandwidth bench.timing.stream_read measures in this run.
Graph steps are timed back to back by CUDA events (median of 5 blocks of 50), as the engine runs
them, and also each waiting for the one before (the host's launch gap included).
--pieces: one table per choice for the torch pieces between the runners: "eager", and/or "compiled"
(through torch.compile: DeepseekV4Gpu's compile_attention), each on the same checkpoint.
--inductor-pdl: the compiled pieces' Triton kernels as programmatic dependent launches (on, the
default) and/or not; one model each.
"""
import argparse
import re
import tempfile
import time

import torch

from backend.checkpoint import load_checkpoint
from backend.engine.cuda_graphs import DecodeGraphs
from backend.gpu_model import DeepseekV4Gpu
from backend.synthetic import generate
from bench.timing import require_gpu, step_ms, stream_read


def nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return sum(nbytes(t) for t in vars(w).values() if isinstance(t, torch.Tensor))


def main():
    require_gpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", default="1,8,32,128")
    p.add_argument("--flavor", default="nvidia-nvfp4")
    p.add_argument("--pieces", default="eager", help="eager and/or compiled, comma-separated")
    p.add_argument("--side-streams", default="on", help="on and/or off, comma-separated: the decode step's "
                   "side streams (DeepseekV4Gpu.beside), one table each on the same model")
    p.add_argument("--inductor-pdl", default="on", help="on and/or off, comma-separated (compiled pieces)")
    a = p.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = generate(f"{tmp}/ckpt", flavor=a.flavor, size="flash-shaped", layers=a.layers, device="cuda")
        ck = load_checkpoint(path)
        print(f"GPU: {torch.cuda.get_device_name()}; flash-shaped {a.flavor}, {a.layers} layers, "
              f"checkpoint ready in {time.perf_counter() - start:.0f} s")
    # Bytes as the checkpoint ships them (the model widens small plain tensors to fp32).
    layers = {n: w for n, w in ck.weights.items() if n.startswith("layers.")}
    dense = sum(nbytes(w) for n, w in layers.items() if ".ffn.experts." not in n) + nbytes(ck.weights["head.weight"])
    expert_bytes = sum(nbytes(w) for n, w in layers.items() if re.search(r"\.ffn\.experts\.0\.w[123]$", n))  # one per layer
    bandwidth = measure_bandwidth()
    print(f"streaming read: {bandwidth / 1e12:.2f} TB/s; non-expert weights + head {dense / 1e6:.0f} MB")
    runs = [(pieces, pdl) for pieces in a.pieces.split(",")
            for pdl in (a.inductor_pdl.split(",") if pieces == "compiled" else ["off"])]
    for pieces, pdl in runs:
        if pieces not in ("eager", "compiled"):
            raise SystemExit(f"--pieces: expected eager and/or compiled, got {pieces!r}")
        if pdl not in ("on", "off"):
            raise SystemExit(f"--inductor-pdl: expected on and/or off, got {pdl!r}")
        start = time.perf_counter()
        model = DeepseekV4Gpu(ck.args, ck.weights, simulate_qat=True, device="cuda",
                              compile_attention=pieces == "compiled", overlap=True, inductor_pdl=pdl == "on")
        print(f"\ntorch pieces {pieces}" + (f", Inductor PDL {pdl}" if pieces == "compiled" else "")
              + f": model on the GPU in {time.perf_counter() - start:.0f} s")
        side_streams = model.side_streams
        for choice in a.side_streams.split(","):
            if choice not in ("on", "off"):
                raise SystemExit(f"--side-streams: expected on and/or off, got {choice!r}")
            model.side_streams = side_streams if choice == "on" else ()
            print(f"side streams {choice}")
            measure(model, batches, dense, expert_bytes, bandwidth)
        del model
        torch.cuda.empty_cache()


def measure_bandwidth() -> float:
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").view(torch.int32)
    for _ in range(3):
        stream_read(big)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        stream_read(big)
    torch.cuda.synchronize()
    return 10 * big.numel() * 4 / (time.perf_counter() - t0)


def measure(model: DeepseekV4Gpu, batches: list[int], dense: int, expert_bytes: int, bandwidth: float) -> None:
    """Per batch: graph replays back to back (the step's device time: the ratio to the floor uses
    it); graph replays each waiting for the last (`DecodeGraphs.run` from host lists: a pageable
    copy of the inputs, so the device idles while the host launches the next; earlier sessions'
    numbers); and eager steps."""
    args = model.args
    max_b = max(batches)
    state = model.new_state(max_b + 1, 256, with_mtp=False)
    start = time.perf_counter()
    graphs = DecodeGraphs(model, state, max_batch=max_b, scratch_slot=max_b)
    print(f"graphs captured in {time.perf_counter() - start:.1f} s (torch.compile included)", flush=True)
    print("| batch | graph ms/step | graph, synced each step | eager ms/step | eager / graph | graph per layer ms "
          "| floor ms | graph / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for b in batches:
        tokens = torch.randint(2, 4000, (b,)).tolist()
        positions = [17] * b
        slots = list(range(b))
        inputs = torch.tensor(graphs.pad(tokens, positions, slots), device="cuda")
        graph_ms = step_ms(lambda: graphs.replay(inputs, b), iters=50, blocks=5)
        synced_ms = step_ms(lambda: graphs.run(tokens, positions, slots), iters=20, blocks=3)
        tok, pos, sl = (torch.tensor(tokens, device="cuda").view(b, 1), torch.tensor(positions, device="cuda"),
                        torch.arange(b, device="cuda"))
        model.forward(tok, pos, sl, state)
        eager_ms = step_ms(lambda: model.forward(tok, pos, sl, state), iters=3, blocks=1)
        e, k = args.n_routed_experts, args.num_experts_per_tok
        distinct = e * (1 - (1 - k / e) ** b)
        floor_ms = (dense + expert_bytes * distinct) / bandwidth * 1e3
        print(f"| {b} | {graph_ms:.3f} | {synced_ms:.3f} | {eager_ms:.3f} | {eager_ms / graph_ms:.1f}x "
              f"| {graph_ms / args.num_hidden_layers:.3f} | {floor_ms:.3f} | {graph_ms / floor_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
