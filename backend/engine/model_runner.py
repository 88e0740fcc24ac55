"""Turns scheduled sequences into model calls: owns the model, its state and the sequences'
sampling seeds. The only engine code that builds device tensors."""
from __future__ import annotations

import logging
import time

import torch

from ..checkpoint import load_checkpoint
from ..model import DeepseekV4
from ..synthetic import default_checkpoint
from ..tokenizer import load_tokenizer
from .config import EngineConfig
from .sampler import SampledTokens, host_to_device, sample
from .sequence import Sequence

log = logging.getLogger("deepseek_v4")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        start = time.perf_counter()
        self.config = config
        self.device = resolve_device(config.device)
        path = config.checkpoint or default_checkpoint()
        ckpt = load_checkpoint(path)
        self.args = ckpt.args
        if ckpt.tokenizer_file is None:
            raise ValueError(f"checkpoint {path} has no tokenizer.json")
        self.tokenizer = load_tokenizer(ckpt.tokenizer_file)
        on_kernels = self.device.type == "cuda" and config.kernels
        if on_kernels:
            from ..gpu_model import DeepseekV4Gpu
            self.model = DeepseekV4Gpu(ckpt.args, ckpt.weights, simulate_qat=config.simulate_qat, device=self.device,
                                       compile_attention=config.compile_attention)
        else:
            self.model = DeepseekV4(ckpt.args, ckpt.weights, simulate_qat=config.simulate_qat, device=self.device)
        # One slot more than sequences: the scratch slot that padded graph rows decode into.
        self.state = self.model.new_state(config.max_num_seqs + 1, config.max_model_len, with_mtp=False)
        self.graphs = None
        if on_kernels and config.cuda_graphs:
            from .cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self.model, self.state, config.max_num_seqs, scratch_slot=config.max_num_seqs)
        self._seed_source = torch.Generator().manual_seed(int(time.time_ns()) & (2**62))
        log.info("[deepseek_v4] loaded %s (%s) on %s in %.1f s; %d slots x %d tokens", path,
                 dict(ckpt.formats), self.device, time.perf_counter() - start, config.max_num_seqs,
                 config.max_model_len)

    def start_sequence(self, seq: Sequence) -> None:
        """A sequence takes its slot: clear what the slot held and give it its sampling seed."""
        self.state.reset(host_to_device([seq.slot], self.device))  # no wait for the queued step
        seq.seed = seq.params.seed
        if seq.seed is None:
            seq.seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))

    def prefill(self, seq: Sequence, n: int) -> torch.Tensor:
        """Feeds the next n prompt tokens; -> logits [V] after the last of them."""
        if seq.num_prefilled == 0:
            self.start_sequence(seq)
        chunk = seq.prompt_ids[seq.num_prefilled:seq.num_prefilled + n]
        logits, _ = self.model.forward(torch.tensor([chunk]), seq.num_prefilled, [seq.slot], self.state)
        return logits[0]

    def decode(self, seqs: list[Sequence], previous: SampledTokens | None) -> torch.Tensor:
        """One token for each sequence: its last token, or for a sequence still prefilling (a short
        prompt riding in the decode step) its next prompt token; -> logits [B, V]. A sequence whose
        last token the previous step sampled and nobody has read yet (`num_pending`) takes it from
        `previous.tokens` on the device, so this step can be queued before that one finishes."""
        tokens, positions, from_previous = [], [], []
        for seq in seqs:
            token, position, row = self._next_input(seq)
            tokens.append(token)
            positions.append(position)
            from_previous.append(row)
        slots = [s.slot for s in seqs]
        rows = self.graphs.pad(tokens, positions, slots) if self.graphs is not None else [tokens, positions, slots]
        pad = len(rows[0]) - len(seqs)
        inputs = host_to_device(rows + [from_previous + [-1] * pad], self.device)
        if any(r >= 0 for r in from_previous):
            if previous is None:
                raise RuntimeError("a sequence's last token is pending, but no step is in flight")
            take = inputs[3]
            inputs[0] = torch.where(take >= 0, previous.tokens[take.clamp(min=0)], inputs[0])
        if self.graphs is not None:
            return self.graphs.replay(inputs[:3], len(seqs))
        logits, _ = self.model.forward(inputs[0].view(-1, 1), inputs[1], inputs[2], self.state)
        return logits

    def _next_input(self, seq: Sequence) -> tuple[int, int, int]:
        """-> (token, position, row of the previous step's tokens to take it from instead, or -1)."""
        if seq.num_prefilled < len(seq.prompt_ids):
            if seq.num_prefilled == 0:
                self.start_sequence(seq)
            return seq.prompt_ids[seq.num_prefilled], seq.num_prefilled, -1
        if seq.num_pending:
            return 0, seq.num_tokens + seq.num_pending - 1, seq.pending_row
        return seq.last_token, seq.num_tokens - 1, -1

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], banned: list[list[int]],
               rows: list[int] | None = None) -> SampledTokens:
        """A token for each of seqs from its row of logits (rows: which rows, when not all), left on
        the device with its copy to the host under way."""
        if rows is not None:
            logits = logits[host_to_device(rows, logits.device)]
        # A sequence's draws are numbered by the tokens it sampled before, read or still in flight.
        return SampledTokens(sample(logits.view(len(seqs), -1), [s.params for s in seqs], [s.seed for s in seqs],
                                    [len(s.output_ids) + s.num_pending for s in seqs], banned))
