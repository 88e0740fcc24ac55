"""Engine settings: one dataclass, checked once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    checkpoint: str | None = None   # None: the tiny synthetic checkpoint (generated on first use)
    device: str = "auto"            # auto: cuda when available, else cpu
    max_num_seqs: int = 16          # state slots = sequences decoding at once
    max_model_len: int = 512        # prompt + output tokens per sequence
    max_queue: int = 64             # waiting requests beyond which new ones are refused
    prefill_chunk: int = 64         # prompt tokens processed per prefill step
    # prompts up to this many tokens are fed through decode steps, a token per step, instead of
    # prefill chunks; None: 32 when decode replays CUDA graphs, else 0 (eager decode gains nothing)
    decode_prompt_tokens: int | None = None
    simulate_qat: bool = False      # the reference model's QAT simulation (see backend.model)
    kernels: bool = True            # on CUDA: the model on the kernel runners (backend.gpu_model)
    cuda_graphs: bool = True        # on CUDA with kernels: decode from pre-captured graphs
    # on CUDA with kernels: the torch pieces between runners via torch.compile (minutes at the
    # first start, cached on disk; bench/NOTES.md has what it gains)
    compile_attention: bool = True

    def __post_init__(self):
        for name in ("max_num_seqs", "max_model_len", "max_queue", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"engine setting '{name}' must be a positive integer, got {value!r}")
        if self.decode_prompt_tokens is not None and (
                not isinstance(self.decode_prompt_tokens, int) or self.decode_prompt_tokens < 0):
            raise ValueError("engine setting 'decode_prompt_tokens' must be a non-negative integer, "
                             f"got {self.decode_prompt_tokens!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"engine setting 'device' must be auto, cpu or cuda[:N], got {self.device!r}")
