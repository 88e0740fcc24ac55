"""GPU tier (marker gpu): skipped without a CUDA device."""
import torch


def capture(fn):
    """Run fn once eagerly (kernels compile there: compiling is not allowed inside a capture), then
    capture it; -> (graph, fn's output tensor, which each replay overwrites)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
