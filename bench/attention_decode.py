"""Decode attention of one layer (GPU, one run): kernels.attention.sparse_mqa_decode (two CuTe DSL
kernels) against the torch baseline, its twin (backend.model.sparse_mqa_decode_reference: the
reference's window and attend and the FP8 quantization of the output) through torch.compile, and
against the floor, one streaming read of the bytes a call must read (the queries, the sequences'
rings and the entries they attend). Timed cold, as a decode step reads a layer's state: copies of
the rings and entries cycled in one CUDA graph, so none is still in L2.

Layers: "window" (sliding-window only: 128 keys), "csa" (the window and the indexer's top 512 of a
4096-token context's 1024 compressed entries), "hca" (the window and all 32 entries of 4096 tokens).

    python -m bench.attention_decode
"""
import torch

from backend.model import sparse_mqa_decode_reference
from bench.timing import cold_graph_time, l2_defeat_copies, require_gpu, stream_read
from kernels.attention import sparse_mqa_decode

HEADS = {"flash": 64, "pro": 128}
DIM, WINDOW, ROPE = 512, 128, 64
CONTEXT = 4096
LAYERS = {"window": (0, 0), "csa": (CONTEXT // 4, 512), "hca": (CONTEXT // 128, CONTEXT // 128)}  # entries, attended
BATCHES = (1, 8, 32, 128)


def main():
    require_gpu()
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(sparse_mqa_decode_reference, dynamic=True)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, ROPE, 2, device="cuda", dtype=torch.float32) / ROPE))
    print(f"GPU: {torch.cuda.get_device_name()}; ms per call, cold rings and entries; ratios of the same run; "
          f"context {CONTEXT}, head dim {DIM}, window {WINDOW}")
    print("| model | layer | B | ours ms | torch compiled ms | floor ms | torch / ours | ours / floor | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, heads in HEADS.items():
        g = torch.Generator(device="cuda").manual_seed(heads)
        sink = torch.randn(heads, device="cuda", generator=g)
        for layer, (capacity, attended) in LAYERS.items():
            if name == "pro" and layer == "hca":
                continue
            for b in BATCHES:
                q = torch.randn(b, heads, DIM, device="cuda", generator=g) * 2
                slots, pos = torch.arange(b, device="cuda"), torch.full((b,), CONTEXT - 1, device="cuda")
                mask = None
                if capacity:  # `attended` entries of each row, at random
                    scores = torch.rand(b, capacity, device="cuda", generator=g)
                    mask = scores >= scores.topk(attended, dim=-1).values[:, -1:]
                state_bytes = 4 * b * (WINDOW + capacity) * DIM
                copies = []
                for _ in range(l2_defeat_copies(state_bytes)):
                    ring = torch.randn(b, WINDOW, DIM, device="cuda", generator=g)
                    entries = torch.randn(b, capacity, DIM, device="cuda", generator=g) if capacity else None
                    copies.append((q, ring, entries, mask, slots, pos, sink, inv_freq, DIM ** -0.5, True))
                ours = cold_graph_time([lambda a=a: sparse_mqa_decode(*a) for a in copies])
                base = cold_graph_time([lambda a=a: compiled(*a) for a in copies])
                needed = 4 * b * (heads + WINDOW + attended) * DIM // 4  # int32 words: q, rings, attended entries
                reads = [torch.empty(needed, dtype=torch.int32, device="cuda") for _ in copies]
                floor = cold_graph_time([lambda r=r: stream_read(r) for r in reads])
                o, o_ref = (f(*copies[0])[0] for f in (sparse_mqa_decode, sparse_mqa_decode_reference))
                diff = ((o - o_ref).norm() / o_ref.norm()).item()
                print(f"| {name} | {layer} | {b} | {ours:.4f} | {base:.4f} | {floor:.4f} | {base / ours:.2f}x | "
                      f"{ours / floor:.2f}x | {diff:.1e} |", flush=True)
                del copies, reads


if __name__ == "__main__":
    main()
