"""Where a decode step's GPU time goes (GPU, diagnostic): one step of the runner model on a
flash-shaped checkpoint under torch.profiler, replayed from its CUDA graph (as served) or eager,
kernels grouped by name, top entries by total time, and the step's wall time against its kernel
time (the difference is the gaps between kernels). An eager step (`--eager-step`) also gets its
kernels attributed to the model's pieces and linears (per weight name), which a graph replay cannot;
only kernels launched through torch are attributed (the CuTe DSL runners' launches have no profiler
op: find them in the per-kernel table).

    python -m bench.decode_profile [--layers 2] [--batch 1[,8,...]] [--pieces eager|compiled] [--eager-step]
                                   [--trace DIR [--timeline US]]

--trace writes each profiled step as a Chrome trace (DIR/step-b{batch}.json: every kernel with its
start, duration and stream), to read which kernels overlap and which wait; --timeline US also
prints from it each stream's busy time and every kernel of at least US microseconds in start order
(`python -m bench.decode_profile --timeline US FILE.json` reads a saved trace).
"""
import argparse
import os
import re
import tempfile
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from backend.checkpoint import load_checkpoint
from backend.engine.cuda_graphs import DecodeGraphs
from backend.gpu_model import COMPILED_PIECES, DeepseekV4Gpu
from backend.synthetic import generate
from bench.timing import require_gpu, step_ms


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated; one profile each")
    p.add_argument("--pieces", choices=("eager", "compiled"), default="eager",
                   help="the torch pieces between the runners eager or through torch.compile")
    p.add_argument("--eager-step", action="store_true", help="profile an eager step instead of a graph replay")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--trace", help="a directory for the Chrome trace of each profiled step")
    p.add_argument("--timeline", type=float, help="print each trace's kernels of at least this many us in order")
    p.add_argument("saved", nargs="?", help="a saved trace to print the timeline of (no GPU needed)")
    a = p.parse_args()
    if a.saved:
        print_timeline(a.saved, a.timeline or 0.0)
        return
    require_gpu()
    with tempfile.TemporaryDirectory() as tmp:
        ck = load_checkpoint(generate(f"{tmp}/c", flavor="nvidia-nvfp4", size="flash-shaped", layers=a.layers,
                                      device="cuda"))
        model = DeepseekV4Gpu(ck.args, ck.weights, simulate_qat=True, device="cuda",
                              compile_attention=a.pieces == "compiled")
    if a.eager_step:
        label_pieces(model)
    for b in [int(b) for b in a.batch.split(",")]:
        profile_step(model, a, b)


def profile_step(model, a, b: int) -> None:
    state = model.new_state(b + 1, 256, with_mtp=False)
    tokens, positions, slots = torch.randint(2, 4000, (b,)).tolist(), [17] * b, list(range(b))
    if a.eager_step:
        tok, pos, sl = (torch.tensor(tokens, device="cuda").view(b, 1), torch.tensor(positions, device="cuda"),
                        torch.arange(b, device="cuda"))
        step = lambda: model.forward(tok, pos, sl, state)  # noqa: E731
    else:
        graphs = DecodeGraphs(model, state, max_batch=b, scratch_slot=b)
        inputs = torch.tensor(graphs.pad(tokens, positions, slots), device="cuda")
        step = lambda: graphs.replay(inputs, b)  # noqa: E731
    for _ in range(3):
        step()
    wall_ms = step_ms(step, iters=10, blocks=3)  # back to back, as bench.decode times steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    if a.trace:
        os.makedirs(a.trace, exist_ok=True)
        prof.export_chrome_trace(os.path.join(a.trace, f"step-b{b}.json"))
        if a.timeline is not None:
            print_timeline(os.path.join(a.trace, f"step-b{b}.json"), a.timeline)
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
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
    if a.eager_step:
        print_by_piece(prof, a.layers)


def timeline(trace: dict, min_us: float) -> tuple[dict, list]:
    """A Chrome trace's GPU work -> ({stream: busy us}, [(start us from the first, duration us,
    stream, name)] of every kernel or copy of at least min_us, in start order)."""
    work = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"
                   and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    busy = defaultdict(float)
    for e in work:
        busy[e["args"].get("stream")] += e["dur"]
    t0 = work[0]["ts"] if work else 0.0
    return dict(busy), [(e["ts"] - t0, e["dur"], e["args"].get("stream"), e["name"]) for e in work
                        if e["dur"] >= min_us]


def print_timeline(path: str, min_us: float) -> None:
    import json
    with open(path) as f:
        busy, kernels = timeline(json.load(f), min_us)
    print(f"\n{path}: busy us per stream {({s: round(t) for s, t in busy.items()})}; kernels of {min_us:g} us and more:")
    for start, dur, stream, name in kernels:
        print(f"{start:9.1f} {dur:7.1f} s{stream} {name[:110]}")


# What an eager step's kernels are attributed to: the innermost of these calls that launched them.
_RUNNER_CALLS = ("linear", "grouped_linear", "hc_pre", "moe", "logits", "embed")
_LABELLED = set()
_LAYER_PREFIX = re.compile(r"(mtp\.\d+\.|layers\.\d+\.)")


def label_pieces(model) -> None:
    """Wrap the model's pieces and runner calls (instance attributes) in profiler ranges named
    after them; linears by weight name without the layer index."""
    def labelled(name, fn):
        def call(*args):
            label = name
            if name in ("linear", "grouped_linear"):
                label = f"{name}:{_LAYER_PREFIX.sub('', args[1])}"
            _LABELLED.add(label)
            with torch.profiler.record_function(label):
                return fn(*args)
        return call
    for name in COMPILED_PIECES + _RUNNER_CALLS:
        setattr(model, name, labelled(name, getattr(model, name)))


def print_by_piece(prof, layers: int) -> None:
    totals = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type != DeviceType.CPU or e.self_device_time_total <= 0 or e.name in _LABELLED:
            continue
        owner = e.cpu_parent
        while owner is not None and owner.name not in _LABELLED:
            owner = owner.cpu_parent
        entry = totals[owner.name if owner is not None else "(outside any piece)"]
        entry[0] += max(len(e.kernels), 1)
        entry[1] += e.self_device_time_total
    total = sum(t for _, t in totals.values())
    print(f"\nBy piece ({total / 1e3:.3f} ms of kernel time attributed; per layer = total / {layers}):")
    print("| piece | kernels | total us | per layer us | share |")
    print("|---|---|---|---|---|")
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n} | {t:.0f} | {t / layers:.1f} | {t / total:.1%} |")


if __name__ == "__main__":
    main()
