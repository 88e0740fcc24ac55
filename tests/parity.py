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
