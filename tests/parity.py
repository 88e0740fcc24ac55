"""Teacher-forced decode of several models side by side: the parity tests (CPU twins, GPU runners)
and bench.parity_probe share it. Four sequences of different lengths, batched decode steps on one
model's greedy tokens."""
from __future__ import annotations

from collections.abc import Iterator

import torch

LENGTHS = (5, 9, 13, 20)


def prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, vocab, (1, n), generator=g) for n in LENGTHS]


def prefill(model, state, prompt_list) -> torch.Tensor:
    """Each prompt into slot i; the last positions' logits, fp32 on the CPU [len(prompt_list), V]."""
    return torch.cat([model.forward(p.to(model.device), 0, [i], state)[0]
                      for i, p in enumerate(prompt_list)]).float().cpu()


def teacher_forced(models: dict, vocab: int, steps: int, leader: str, max_len: int = 96) -> Iterator[dict]:
    """Prefills of the 4 LENGTHS, then `steps` batched decode steps, every model fed the leader's
    greedy tokens. Yields {name: fp32 CPU logits [4, V]} per step, the prefills' first."""
    states = {k: m.new_state(len(LENGTHS), max_len, with_mtp=False) for k, m in models.items()}
    logits = {k: prefill(m, states[k], prompts(vocab)) for k, m in models.items()}
    for step in range(steps + 1):
        yield logits
        if step == steps:
            return
        tokens, pos = logits[leader].argmax(-1, keepdim=True), torch.tensor(LENGTHS) + step
        logits = {k: m.forward(tokens.to(m.device), pos.to(m.device), torch.arange(len(LENGTHS), device=m.device),
                               states[k])[0].float().cpu() for k, m in models.items()}


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def selection_flips(trace: list, ref_trace: list) -> list[dict]:
    """Compare two models' indexer picks call by call (DeepseekV4.index_trace of one step, in the
    order of execution). For each query whose selected set differs, the reference's score margin:
    the lowest reference score of the entries only the reference picked minus the highest of those
    only the other model picked, relative to the query's largest |score| (a near-tie: near 0), and
    whether an earlier call already flipped for the same sequence (then the inputs differed
    already and the margin says nothing)."""
    flips = []
    for call, ((prefix, slots, _, mask), (ref_prefix, _, ref_scores, ref_mask)) in enumerate(
            zip(trace, ref_trace, strict=True)):
        assert prefix == ref_prefix, (prefix, ref_prefix)
        for b, s in (mask != ref_mask).any(-1).nonzero().tolist():
            scores, picked, ref_picked = ref_scores[b, s], mask[b, s], ref_mask[b, s]
            gap = scores[ref_picked & ~picked].min() - scores[picked & ~ref_picked].max()
            slot = int(slots[b])
            flips.append(dict(layer=prefix, slot=slot, query=s, margin=(gap / scores[ref_picked].abs().max()).item(),
                              after_a_flip=any(f["slot"] == slot and f["call"] < call for f in flips), call=call))
    return flips


def selection_report(models: dict, vocab: int, steps: int, ref: str, other: str) -> list[dict]:
    """Teacher-forced decode (the reference leading) with the indexer's picks traced: per step the
    logits' relative difference, the greedy agreement and the selection flips (selection_flips).
    Sets and clears the models' index_trace."""
    report = []
    for m in models.values():
        m.index_trace = []
    try:
        for logits in teacher_forced(models, vocab, steps, leader=ref):
            traces = {k: m.index_trace for k, m in models.items()}
            for m in models.values():
                m.index_trace = []
            report.append(dict(rel=relative(logits[other], logits[ref]), flips=selection_flips(traces[other], traces[ref]),
                               agree=int((logits[other].argmax(-1) == logits[ref].argmax(-1)).sum())))
    finally:
        for m in models.values():
            m.index_trace = None
    return report


def split_at_first_flip(report: list[dict]) -> tuple[list[dict], list[dict]]:
    """-> (the steps whose every selection matched, up to the first that did not (states differ
    after), that step's own flips: those no earlier layer's flip of the same sequence explains)."""
    first = next((i for i, r in enumerate(report) if r["flips"]), len(report))
    flips = report[first]["flips"] if first < len(report) else []
    return report[:first], [f for f in flips if not f["after_a_flip"]]
