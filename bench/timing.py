"""CUDA-graph timing shared by the benchmarks, the bandwidth floor's streaming-read kernel, and the
guard that lets a GPU benchmark skip cleanly on a machine without a GPU."""
import functools

import torch


def require_gpu() -> None:
    """A GPU benchmark on a machine without a CUDA device: say so and exit 0, as the GPU tests skip."""
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: skipped")
        raise SystemExit(0)


@functools.cache
def _read_kernel():
    import triton  # only GPU hosts need it
    import triton.language as tl

    @triton.jit
    def read(src, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + tl.program_id(0), tl.sum(tl.load(src + offs, mask=offs < n, other=0), axis=0))
    return read


def stream_read(words: torch.Tensor, out: torch.Tensor | None = None, block: int = 4096) -> torch.Tensor:
    """Read every int32 of `words` once (16 KB per program, one small store each): the floor for a
    kernel that must read these bytes, launch and ramp-up included."""
    n = words.numel()
    grid = -(-n // block)
    out = torch.empty(grid, dtype=torch.int32, device=words.device) if out is None else out
    _read_kernel()[(grid,)](words, out, n, BLOCK=block)
    return out


def step_ms(step, iters: int, blocks: int) -> float:
    """Median over `blocks` of the mean ms per call of `iters` back-to-back calls of `step`, timed by
    CUDA events: the host queues the next call while the device runs the last one, as the engine's
    decode loop does (it queues step N+1 before it reads step N's tokens)."""
    times = []
    for _ in range(blocks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def graph_time(fn, iters: int) -> float:
    """Median ms of a CUDA-graph replay of fn (captured after two eager warm-ups)."""
    fn(), fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return step_ms(graph.replay, iters=1, blocks=iters)


L2_DEFEAT_BYTES = 256 << 20  # five times an H100/H200's 50 MB L2


def l2_defeat_copies(weight_bytes: int) -> int:
    """How many copies of a weight cold_graph_time should cycle through so that none is still in L2."""
    return max(2, min(256, L2_DEFEAT_BYTES // weight_bytes))


def cold_graph_time(calls, rounds: int = 4, iters: int = 5) -> float:
    """Median ms per call of `calls` (a list of functions, each on its own copy of the weights, whose
    bytes together exceed the L2 cache), captured `rounds` times over in one CUDA graph. A decode
    step reads each layer's weights once, from HBM: this is that regime, with launch gaps between
    kernels as a graph has them, not the host overhead of one graph launch per call."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in calls:
                fn()
    graph.replay()
    return step_ms(graph.replay, iters=1, blocks=iters) / (rounds * len(calls))


def dense_baselines(x: torch.Tensor, bf16_weights: list, weight_words: list, groups: int = 1) -> tuple[float, float]:
    """The dense benchmarks' two references for input x [T, groups*K], cold (cold_graph_time): torch
    BF16 matmul on dequantized copies of the weight (a batched matmul over block-diagonal groups),
    and the floor, one streaming read of the quantized weight's bytes -> (bf16 ms, floor ms)."""
    if groups == 1:
        base = cold_graph_time([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16_weights])
    else:
        t, k = x.shape[0], x.shape[1] // groups
        xg = x.view(t, groups, k).transpose(0, 1)
        base = cold_graph_time([lambda w=w: torch.bmm(xg, w.view(groups, -1, k).transpose(1, 2)) for w in bf16_weights])
    return base, cold_graph_time([lambda f=f: stream_read(f) for f in weight_words])
