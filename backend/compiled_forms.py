"""The compiled forms of the reference's decode pieces (backend.gpu_model's COMPILED_FORMS): the same
math written so that torch.compile makes fewer or faster kernels of it (the fp32 sums possibly in
another order). DeepseekV4Gpu compiles these in place of the reference's pieces for decode steps;
eager calls keep the reference's forms."""
from __future__ import annotations

import torch

from kernels.formats import fp8_qdq
from kernels.hadamard import hadamard_transform

from .model import (KV_QAT_BLOCK, CompressorState, DeepseekV4, apply_rope_per_channel, compressor_projections,
                    next_window, pool_window, window_row, write_entries_decode)


class CompiledForms:
    """Mixed into DeepseekV4Gpu ahead of DeepseekV4, whose methods these call by name."""

    def hc_mixes_in_chunks(self, x: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        """hc_mixes with K (hc * D = 16384 in V4) in 64 chunks through a batched GEMM, then their
        sum: its 24 outputs give one GEMM too few blocks (H200, compiled, batch 8: 8 us per call
        against 16; bench/NOTES.md). Not the eager form: the reordered fp32 sums move the tiny CPU
        models' FP8-rounded activations, which the CPU parity tests compare bit for bit."""
        flat = x.flatten(2).float()
        b, s, k = flat.shape
        chunks = 64 if k % 64 == 0 else 1
        partial = torch.einsum("tcl,ncl->tnc", flat.reshape(b * s, chunks, -1), fn.view(fn.shape[0], chunks, -1))
        rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.args.rms_norm_eps)
        return partial.sum(-1).view(b, s, -1) * rms

    def head_input_in_chunks(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                             norm: torch.Tensor) -> torch.Tensor:
        """head_input with the streams' projection as hc_mixes_in_chunks; compiled, the pre-mix and the
        final norm fuse with it (eagerly, and with the norm apart, 8 kernels and 27 us at batch 1, H200)."""
        return self.collapse_for_head(x, self.hc_mixes_in_chunks(x, fn), scale, base, norm)

    @staticmethod
    def hc_post_unrolled(y: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
        """hc_post with the streams' mix written out as hc products per output, where the reference's
        einsum is a batched GEMM: compiled, one pointwise kernel instead of a cuBLAS launch and a
        pointwise one (as a sum over a k axis it became a reduction kernel: 6.7 us at batch 8, H200)."""
        residual = residual.float()
        mixed = comb[..., 0, :, None] * residual[..., 0, None, :]             # [B, S, j, D]
        for k in range(1, residual.shape[-2]):
            mixed = mixed + comb[..., k, :, None] * residual[..., k, None, :]
        return (post.unsqueeze(-1) * y.float().unsqueeze(-2) + mixed).to(y.dtype)

    def compressor_step_in_place(self, x, pos, slots, kv_state_all, score_state_all, entries, wkv, wgate, ape, norm,
                                 ratio: int, head_dim: int, rotate: bool) -> None:
        """compressor_step for one token per sequence (decode): the token's window row is written in
        place and the pooling reads the slots' windows where they are, where the reference's form
        copies each slot's whole window out and back (for ratio 128, 512 KB per sequence). The
        overlapping windows (ratio 4) still move their halves when a window closes."""
        p = pos[:, 0]
        projections = compressor_projections(x, wkv, wgate, linear=torch.ops.dsv4.linear_f32)  # fp32 math
        kv_new, score_new = (t[:, 0] for t in projections)
        row = window_row(p, ratio)
        kv_state_all[slots, row] = kv_new
        score_state_all[slots, row] = score_new + ape[p % ratio]
        kv_state, score_state = kv_state_all[slots], score_state_all[slots]
        pooled = pool_window(kv_state, score_state, ratio, head_dim)
        if ratio == 4:
            kv_state_all[slots] = next_window(kv_state, p, ratio)
            score_state_all[slots] = next_window(score_state, p, ratio)
        entry = self.finish_entries(pooled.unsqueeze(1), pos, norm, ratio, rotate, rotation=hadamard_transform,
                                    rope=apply_rope_per_channel, kv_qat=self.kv_qat_in_blocks)
        write_entries_decode(CompressorState(kv_state_all, score_state_all, entries), slots, pos, entry, ratio)

    def query_heads_in_one_pass(self, q: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """query_heads with the RoPE per channel (apply_rope_per_channel): compiled, one kernel with the
        norm, where the RoPE's slices and concatenation made three (H200, batch 1: ~7 us per layer)."""
        return DeepseekV4.query_heads(self, q, pos, freqs, rope=apply_rope_per_channel)

    def kv_entry_in_one_pass(self, kv: torch.Tensor, norm: torch.Tensor, pos: torch.Tensor,
                             freqs: torch.Tensor) -> torch.Tensor:
        """kv_entry with the RoPE per channel and kv_qat_in_blocks (so do compressor_step_in_place's
        entries): compiled, 2 kernels where slices and concatenations made 6 (H200, batch 1)."""
        return DeepseekV4.kv_entry(self, kv, norm, pos, freqs, rope=apply_rope_per_channel,
                                   kv_qat=self.kv_qat_in_blocks)

    def kv_qat_in_blocks(self, kv: torch.Tensor) -> torch.Tensor:
        """_kv_qat on whole 64-blocks of the head, the RoPE blocks kept by a select (no concatenation)."""
        nope = self.args.nope_head_dim
        if nope % KV_QAT_BLOCK or kv.shape[-1] % KV_QAT_BLOCK:
            return self._kv_qat(kv)
        blocks = kv.unflatten(-1, (-1, KV_QAT_BLOCK))
        is_nope = torch.arange(blocks.shape[-2], device=kv.device).unsqueeze(-1) * KV_QAT_BLOCK < nope
        return torch.where(is_nope, fp8_qdq(blocks, KV_QAT_BLOCK), blocks).flatten(-2)

    def index_queries_fast_rotation(self, q, x, weights_proj, pos):
        """index_queries with the QAT rotation as the fast Walsh-Hadamard transform, which Inductor
        fuses with the pieces' pointwise work (compressor_step_in_place rotates its entries so too).
        As a matmul it was a GEMM launch of its own: on an H200 at batch 8, cuBLAS ran the entries'
        [8, 128] x [128, 128] as a 53 us SGEMM (bench/NOTES.md, eleventh session)."""
        return DeepseekV4.index_queries(self, q, x, weights_proj, pos, rotation=hadamard_transform,
                                        linear=torch.ops.dsv4.linear_f32)

    def routing_by_argmax(self, x: torch.Tensor, gate: torch.Tensor, choice: torch.Tensor, hashed: bool):
        """routing with the top-k experts taken as k successive argmaxes (each masking the picks before
        it), in the order topk gives them (ties aside: exact ties of fp32 scores): compiled, one kernel
        with the scores, where topk launches a selection and a sort (H200, batch 1: 12.6 us). The gate's
        fp32 GEMV runs on kernels.linear.linear_f32 (hash layers too): on an H200 at batch 8 cuBLAS
        took 21 us for this 4 MB and Inductor's multiply-sum 13.5 us (bench/NOTES.md)."""
        return DeepseekV4.routing(self, x, gate, choice, hashed, linear=torch.ops.dsv4.linear_f32,
                                  top_k=self.top_k_by_argmax)

    @staticmethod
    def top_k_by_argmax(biased: torch.Tensor, k: int) -> torch.Tensor:
        """torch.topk's indices of the k largest (ties aside) as k successive argmaxes, each over
        `biased` with the picks before it masked. Each argmax masks the scores afresh: masking the
        previous argmax's masked scores instead made Inductor store one of them in the kernel and load
        it back in the next loop, a race between warps (backend/inductor_check.py; H200, 256 and 384
        experts, 1-32 tokens), which it does not with every masked copy read once."""
        ids, picks = torch.arange(biased.shape[-1], device=biased.device), []
        for _ in range(k):
            masked = biased
            for pick in picks:
                masked = masked.masked_fill(ids == pick, float("-inf"))
            picks.append(masked.argmax(-1, keepdim=True))
        return torch.cat(picks, dim=-1)

    @staticmethod
    def combine_experts(routed: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """The routed experts' slots [T, k, D] summed in order k = 0..K-1 (the runners' sum), plus
        the shared expert [T, D]: compiled, one kernel for both."""
        return routed.sum(1) + shared.float()
