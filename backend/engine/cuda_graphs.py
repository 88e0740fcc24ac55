"""Decode steps from pre-captured CUDA graphs.

One graph per batch size of a ladder (1, 2, 4, ... up to max_num_seqs), captured at start-up after
an eager warm-up (which also compiles every kernel the step uses). A step of B sequences replays
the smallest graph of at least B: its inputs are copied into the graph's static buffers, and the
unused rows decode a dummy token in a scratch slot that no sequence owns, so they touch nobody's
state. All graphs share one memory pool (captured largest first).
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("deepseek_v4")


def batch_ladder(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, state, max_batch: int, scratch_slot: int):
        self.model, self.state = model, state
        # The static inputs, one row each: tokens, positions, slots (one copy fills them all).
        self.inputs = torch.zeros(3, max_batch, dtype=torch.long, device=model.device)
        self.inputs[2] = scratch_slot
        self.tokens, self.positions, self.slots = self.inputs[0].view(-1, 1), self.inputs[1], self.inputs[2]
        self.scratch_slot = scratch_slot
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        for b in sorted(batch_ladder(max_batch), reverse=True):
            self.graphs[b] = self._capture(b, pool)
        self.state.reset([scratch_slot])
        log.info("[deepseek_v4] captured decode graphs for batch sizes %s in %.1f s", sorted(self.graphs),
                 time.perf_counter() - start)

    def _step(self, b: int) -> torch.Tensor:
        logits, _ = self.model.forward(self.tokens[:b], self.positions[:b], self.slots[:b], self.state)
        return logits

    def _capture(self, b: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, settles the allocator
            for _ in range(2):
                self._step(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self._step(b)
        return graph, out

    def padded_size(self, batch: int) -> int:
        """The captured batch size that a step of `batch` sequences replays."""
        return min(s for s in self.graphs if s >= batch)

    def pad(self, tokens: list[int], positions: list[int], slots: list[int]) -> list[list[int]]:
        """The three input rows of a step, padded to its captured size: an unused row decodes a dummy
        token at position 0 in the scratch slot, which no sequence owns."""
        pad = self.padded_size(len(tokens)) - len(tokens)
        return [tokens + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad]

    def replay(self, inputs: torch.Tensor, batch: int) -> torch.Tensor:
        """inputs: [3, padded_size(batch)] tokens, positions and slots on the device (padded rows
        from `pad`) -> logits [batch, V] (a copy)."""
        size = inputs.shape[1]
        self.inputs[:, :size].copy_(inputs)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:batch].clone()

    def run(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """`replay` from host lists (tests and benchmarks) -> logits [B, V]."""
        inputs = torch.tensor(self.pad(tokens, positions, slots), device=self.inputs.device)
        return self.replay(inputs, len(tokens))
