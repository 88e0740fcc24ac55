"""DeepSeek-V4 reference model in pure torch (CPU and GPU), over explicit fixed-capacity state.

Numerics follow DeepSeek's `inference/model.py`; module and parameter names follow it too.
Everything is computed from the checkpoint's tensors as they ship: each linear calls the twin
of its weight format (kernels.linear.linear_ref), which dequantizes on the fly.

`simulate_qat`:
- True (DeepSeek's semantics): FP8 quantize-dequantize of the NoPE dims of every KV entry
  (block 64, power-of-two scale); Hadamard rotation + FP4 QDQ (block 32) of the indexer's queries
  and keys; activations quantized per token per 128 to FP8 before every FP8-block GEMM (what the
  FP8 runners do; DeepSeek's converter keeps wo_a in BF16 instead, and its FP4 experts take FP8
  activations where our Hopper W4A16 runner takes BF16 ones).
`runner_activations` (default False): also round the activations of every NVFP4 / MXFP4 GEMM to
  f16, the routed experts' intermediate h included, as the Hopper W4A16 runners store them. For
  checking the runner model against the reference: on the tiny test models the FP8 activation
  quantization flips on perturbations of 1e-7, so the runners' f16 h alone moved the logits by
  5-16% against an fp32 h (bench/NOTES.md). Off elsewhere: f16 roundings flip on every fp32
  difference between prefill and decode, where the self-consistency tests expect rare flips.
- False: HF transformers' `DeepseekV4ForCausalLM` semantics (no QAT simulation), except that the
  shared expert's SwiGLU is not clamped (DeepSeek does not clamp it; HF does).

State (`ModelState`) is allocated once for `num_slots` sequences of at most `max_len` tokens and
indexed by slot: per layer a sliding ring of `sliding_window` KV entries, compressed KV entries,
the indexer's compressed keys, and the compressors' running windows. `forward` processes S new
tokens for each of B sequences at their own start positions; prefill is S = prompt length (one
sequence or several of equal length), decode is S = 1 for a batch of sequences at any positions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.formats import Fp8BlockWeight, Mxfp4Weight, Nvfp4Weight, fp4_qdq, fp8_qdq, quantize_activation_fp8
from kernels.hadamard import hadamard
from kernels.linear import dequantize_weight, linear_ref

from .config import ModelArgs

KV_QAT_BLOCK = 64
INDEXER_QAT_BLOCK = 32


# ---------------------------------------------------------------------------------------------
# Small functional pieces
# ---------------------------------------------------------------------------------------------

def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp64 stays fp64): the precision of norms, softmax, mixing and routing."""
    return x if x.dtype == torch.float64 else x.float()


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 math, result in x's dtype (weight None: unweighted)."""
    xf = wide(x)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * wide(weight)).to(x.dtype)


def rope_inv_freq(args: ModelArgs, compressed: bool) -> torch.Tensor:
    """Inverse frequencies of the RoPE dims: plain RoPE (theta 10000) on sliding-only layers,
    YaRN (theta `compress_rope_theta`) on compressed layers, as DeepSeek's precompute_freqs_cis."""
    dim = args.qk_rope_head_dim
    base = args.compress_rope_theta if compressed else args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    yarn = args.rope_scaling
    if not compressed or yarn is None:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / yarn.factor * (1 - smooth) + freqs * smooth


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, rope_dim: int,
               inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing `rope_dim` channels of x, interleaved pairs (2i, 2i+1).
    x: [B, S, (H,) D]; pos: [B, S]. inverse=True rotates by -pos (undoes the rotation)."""
    angles = pos.to(torch.float32).unsqueeze(-1) * inv_freq.to(pos.device)  # [B, S, rope_dim/2]
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    nope, rope = x[..., :-rope_dim], wide(x[..., -rope_dim:])
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)


def apply_rope_per_channel(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """apply_rope's numbers with every channel through one expression, x * c + partner * s (the
    partner: the other channel of its pair; c = 1, s = 0 on the NoPE channels), no slices and no
    concatenation: what Inductor fuses with the work that makes x into one kernel."""
    d = x.shape[-1]
    channel = torch.arange(d, device=x.device)
    rope = channel >= d - rope_dim
    pair = ((channel - (d - rope_dim)) // 2).clamp(min=0)
    angles = pos.to(torch.float32).unsqueeze(-1) * inv_freq.to(pos.device)[pair]  # [B, S, D]
    if x.dim() == 4:
        angles = angles.unsqueeze(2)
    xf = wide(x)
    odd_sign = torch.where(channel % 2 == 1, 1.0, -1.0)  # even: e cos - o sin; odd: o cos + e sin
    c = torch.where(rope, angles.cos(), 1.0)
    s = torch.where(rope, angles.sin() * odd_sign, 0.0)
    return (xf * c + xf[..., channel ^ 1] * s).to(x.dtype)


def sinkhorn_split(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC coefficients from the projected streams. mixes: [..., (2+hc)*hc] ->
    pre [..., hc], post [..., hc], comb [..., hc, hc] (doubly stochastic, Sinkhorn)."""
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def project_streams(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """The mHC streams [B, S, hc, D] projected to the mixes, RMS-normalized -> [B, S, (2+hc)*hc]."""
    flat = wide(x.flatten(2))
    return F.linear(flat, fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def mix_streams(x: torch.Tensor, pre: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """A sublayer's input: sum_k pre_k * stream_k, then RMSNorm: [B, S, hc, D] -> [B, S, D]."""
    return rms_norm((pre.unsqueeze(-1) * wide(x)).sum(2).to(x.dtype), norm, eps)


def mhc_pre_reference(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm: torch.Tensor,
                      iters: int, eps: float, rms_eps: float, quantize: bool):
    """The reference's hc_pre on tokens h [T, hc, D] in kernels.mhc.mhc_pre's interface (its twin):
    -> x [T, D], post [T, hc], comb [T, hc, hc], and x's FP8 activation quantization or None."""
    streams = h.unsqueeze(1)  # [T, 1, hc, D]
    pre, post, comb = sinkhorn_split(project_streams(streams, fn, rms_eps), scale, base, h.shape[1], iters, eps)
    x = mix_streams(streams, pre, norm, rms_eps)[:, 0]
    return x, post[:, 0], comb[:, 0], quantize_activation_fp8(x) if quantize else None


def emitted_entries(num_entries: int, pos: torch.Tensor, ratio: int) -> torch.Tensor:
    """Which of a compressor's entries exist for each query position [B, S] -> mask [B, S, C]: entry
    e closes at position (e + 1) * ratio - 1."""
    return torch.arange(num_entries, device=pos.device) < ((pos + 1) // ratio).unsqueeze(-1)


def stable_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest scores along the last dim; ties go to the lowest index.
    Entries scored -inf are never selected."""
    if k >= scores.shape[-1]:  # every entry is among the k largest: no sort (a short context's step)
        return scores > float("-inf")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    return mask & (scores > float("-inf"))


def sparse_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Shared K=V MQA over a masked key set with per-head sinks (exp(sink) joins the denominator).
    q: [B, S, H, D]; keys: [B, N, D]; mask: [B, S, N] -> [B, S, H, D]."""
    scores = torch.einsum("bshd,bnd->bshn", wide(q), wide(keys)) * scale
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    sinks = sink.to(scores.dtype).view(1, 1, -1, 1).expand(*scores.shape[:3], 1)
    probs = torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1]
    return torch.einsum("bshn,bnd->bshd", probs, wide(keys)).to(q.dtype)


def sparse_mqa_decode_reference(q: torch.Tensor, ring: torch.Tensor, entries: torch.Tensor | None,
                                comp_mask: torch.Tensor | None, slots: torch.Tensor, pos: torch.Tensor,
                                sink: torch.Tensor, inv_freq: torch.Tensor, scale: float, quantize: bool):
    """Attention of one decode token per sequence in kernels.attention.sparse_mqa_decode's interface
    (its twin): q [B, H, D]; the slots' rings with this token written (ring slot j holds the position
    p = j mod win, pos - win < p <= pos: slot j exists once pos >= j) and, if given, their entries
    picked by comp_mask [B, C] -> o [B, H, D] after the inverse RoPE, and its FP8 quantization
    (rows [B, H*D]) or None. The keys go in the order DeepseekV4.window gives them (the ring's other
    slots, then this token), so on the same data this is the reference's attend bit for bit."""
    rows, win, pos = ring[slots], ring.shape[1], pos.view(-1, 1)
    newest = pos % win                                                      # this token's ring slot
    slot_ids = torch.arange(win, device=q.device)
    keys = torch.cat([rows, rows.gather(1, newest.unsqueeze(-1).expand(-1, 1, rows.shape[-1]))], dim=1)
    mask = torch.cat([(slot_ids <= pos) & (slot_ids != newest), torch.ones_like(pos, dtype=torch.bool)], dim=-1)
    if entries is not None:
        keys, mask = torch.cat([keys, entries[slots]], dim=1), torch.cat([mask, comp_mask], dim=-1)
    o = sparse_attention(q.unsqueeze(1), keys, mask.unsqueeze(1), sink, scale)
    o = apply_rope(o, pos, inv_freq, 2 * inv_freq.numel(), inverse=True)[:, 0]
    return o, quantize_activation_fp8(o.reshape(o.shape[0], -1)) if quantize else None


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------

def fp32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear in fp32 math, as DeepSeek's reference multiplies its small BF16 linears (the gate,
    the compressors, the indexer's weights_proj). The methods that call it take another runner of
    the same math as `linear` (a subclass's kernel)."""
    return F.linear(wide(x), wide(w))


def topk_indices(biased: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest per row, as routing picks its experts (torch.topk)."""
    return biased.topk(k, dim=-1).indices


def compressor_projections(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor | None, linear=fp32_linear):
    """A compressor's kv and score projections of x [B, S, D] in fp32 math (wgate None: wkv holds
    wkv's rows, then wgate's: one GEMM)."""
    if wgate is None:
        return linear(x, wkv).chunk(2, dim=-1)
    return linear(x, wkv), linear(x, wgate)


def window_row(p: torch.Tensor, ratio: int) -> torch.Tensor:
    """The row of a compressor's window state that position p writes (overlapping windows, ratio 4:
    the second half; the first half holds the previous window)."""
    return (ratio if ratio == 4 else 0) + p % ratio


def pool_window(kv_state: torch.Tensor, score_state: torch.Tensor, ratio: int, head_dim: int) -> torch.Tensor:
    """The windows [B, rows, channels] pooled per channel: the rows' kv weighted by the softmax of
    their scores -> [B, head_dim]. Overlapping windows (ratio 4) pool the previous window's first
    half of the channels and this window's second half."""
    if ratio == 4:
        d = head_dim
        kv_state = torch.cat([kv_state[:, :ratio, :d], kv_state[:, ratio:, d:]], dim=1)
        score_state = torch.cat([score_state[:, :ratio, :d], score_state[:, ratio:, d:]], dim=1)
    return (kv_state * score_state.softmax(dim=1)).sum(dim=1)


def next_window(state: torch.Tensor, p: torch.Tensor, ratio: int) -> torch.Tensor:
    """Overlapping windows' state after position p: where p closes a window, its rows become the
    next window's first half (the halves swap places)."""
    done = ((p + 1) % ratio == 0).view(-1, 1, 1)
    return torch.where(done, state.roll(-ratio, dims=1), state)


def write_entries_emitting(st: "CompressorState", slots, pos, entry, ratio: int) -> None:
    """Only the tokens that close a window write (tokens of one window share an index, so nothing
    races). Data-dependent shapes: for prefill."""
    b, s = ((pos + 1) % ratio == 0).nonzero(as_tuple=True)
    st.entries[slots[b], pos[b, s] // ratio] = entry[b, s]


def write_entries_decode(st: "CompressorState", slots, pos, entry, ratio: int) -> None:
    """One token per sequence: every sequence writes its current entry index, and those whose
    window did not close write the old value back. No data-dependent shapes, no host sync: it
    captures into a CUDA graph."""
    index = pos[:, 0] // ratio
    emit = ((pos[:, 0] + 1) % ratio == 0).view(-1, 1)
    st.entries[slots, index] = torch.where(emit, entry[:, 0], st.entries[slots, index])


@dataclass
class CompressorState:
    """A compressor's running window per slot and its emitted entries.
    kv/score: [slots, coff*ratio, coff*head_dim] (coff = 2 when windows overlap);
    entries: [slots, max_len // ratio, head_dim]."""
    kv: torch.Tensor
    score: torch.Tensor
    entries: torch.Tensor

    @classmethod
    def allocate(cls, slots: int, ratio: int, head_dim: int, max_len: int, device, dtype):
        coff = 2 if ratio == 4 else 1
        shape = (slots, coff * ratio, coff * head_dim)
        acc = wide_dtype(dtype)  # compression runs in fp32 at least, as DeepSeek's does
        return cls(torch.zeros(shape, dtype=acc, device=device),
                   torch.full(shape, float("-inf"), dtype=acc, device=device),
                   torch.zeros(slots, max(max_len // ratio, 1), head_dim, dtype=dtype, device=device))

    def reset(self, slots: torch.Tensor) -> None:
        self.kv[slots] = 0
        self.score[slots] = float("-inf")
        self.entries[slots] = 0


@dataclass
class LayerState:
    ring: torch.Tensor                         # [slots, window, head_dim]
    compressor: CompressorState | None = None  # ratio > 0
    indexer: CompressorState | None = None     # ratio == 4 (128-d keys)

    def reset(self, slots: torch.Tensor) -> None:
        self.ring[slots] = 0
        for part in (self.compressor, self.indexer):
            if part is not None:
                part.reset(slots)


class ModelState:
    """Per-sequence decoding state for `num_slots` sequences of up to `max_len` tokens."""

    def __init__(self, args: ModelArgs, num_slots: int, max_len: int, device="cpu",
                 dtype=torch.float32, with_mtp: bool = True):
        self.num_slots, self.max_len = num_slots, max_len
        n_layers = args.num_hidden_layers + (args.num_nextn_predict_layers if with_mtp else 0)
        self.layers: list[LayerState] = []
        for layer in range(n_layers):
            ratio = args.compress_ratio(layer)
            st = LayerState(torch.zeros(num_slots, args.sliding_window, args.head_dim, dtype=dtype, device=device))
            if ratio:
                st.compressor = CompressorState.allocate(num_slots, ratio, args.head_dim, max_len, device, dtype)
            if ratio == 4:
                st.indexer = CompressorState.allocate(num_slots, ratio, args.index_head_dim, max_len, device, dtype)
            self.layers.append(st)

    def reset(self, slots) -> None:
        """Forget everything the given slots held (a new sequence takes them)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.layers[0].ring.device).reshape(-1)
        for st in self.layers:
            st.reset(slots)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class DeepseekV4:
    """Reference DeepSeek-V4 over checkpoint tensors `weights` (native names, see backend.params)."""

    def __init__(self, args: ModelArgs, weights: dict, simulate_qat: bool = True,
                 dtype: torch.dtype = torch.float32, device="cpu", runner_activations: bool = False):
        self.args, self.simulate_qat, self.dtype, self.device = args, simulate_qat, dtype, torch.device(device)
        self.runner_activations = runner_activations
        # Plain tensors (norms, mHC, sinks, ape, BF16 linears, embed/head) become fp32 on the
        # device; quantized weights keep their bytes and are dequantized per call.
        self.w = {k: (v.to(self.device) if not isinstance(v, torch.Tensor)
                      else v.to(self.device, wide_dtype(dtype)) if v.is_floating_point() else v.to(self.device))
                  for k, v in weights.items()}
        self.freqs = {False: rope_inv_freq(args, False).to(self.device),
                      True: rope_inv_freq(args, True).to(self.device)}
        self._hadamard = hadamard(args.index_head_dim, self.device, dtype) if simulate_qat else None
        # Parity tests set a list here: each indexer call appends (layer prefix, slots [B], scores
        # [B, S, C], selection mask) on the CPU. A host copy per call, so never while capturing a graph.
        self.index_trace: list | None = None

    def new_state(self, num_slots: int, max_len: int, with_mtp: bool = True) -> ModelState:
        return ModelState(self.args, num_slots, max_len, self.device, self.dtype, with_mtp)

    # --- linears -------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """A checkpoint linear `name` (without `.weight`) on x, through its format's twin."""
        if self.runner_activations and isinstance(self.w[name], (Nvfp4Weight, Mxfp4Weight)):
            x = x.to(torch.float16).to(x.dtype)  # the W4A16 runners' activation format
        return linear_ref(x, self.w[name], quantize_input=self.simulate_qat)

    def linears(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """Several linears of the same input (wq_a and wkv; an expert's w1 and w3). A subclass may
        run them as one GEMM on their stacked rows (backend.gpu_model)."""
        return tuple(self.linear(x, name) for name in names)

    # --- mHC -----------------------------------------------------------------------------
    def hc_pre(self, x: torch.Tensor, prefix: str, which: str):
        """x: [B, S, hc, D] -> the sublayer's input [B, S, D] (streams mixed by `pre`, then its
        RMSNorm `{which}_norm`), post [B, S, hc], comb [B, S, hc, hc]."""
        mixes = self.hc_mixes(x, self.w[f"{prefix}hc_{which}_fn"])
        pre, post, comb = self.mix_coefficients(mixes, self.w[f"{prefix}hc_{which}_scale"],
                                                self.w[f"{prefix}hc_{which}_base"])
        return self.sublayer_input(x, pre, self.w[f"{prefix}{which}_norm.weight"]), post, comb

    def hc_mixes(self, x: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        return project_streams(x, fn, self.args.rms_norm_eps)

    def sublayer_input(self, x: torch.Tensor, pre: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return mix_streams(x, pre, norm, self.args.rms_norm_eps)

    def mix_coefficients(self, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor):
        a = self.args
        return sinkhorn_split(mixes, scale, base, a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps)

    @staticmethod
    def hc_post(y: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
        """new stream j = post_j * y + sum_k comb[k, j] * residual_k. y: [B,S,D] -> [B,S,hc,D]."""
        mixed = torch.einsum("bskj,bskd->bsjd", comb, wide(residual))
        return (post.unsqueeze(-1) * wide(y).unsqueeze(-2) + mixed).to(y.dtype)

    def head_input(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                   norm: torch.Tensor) -> torch.Tensor:
        """The head's input: the final streams [B, S, hc, D] collapsed by a sigmoid pre-mix of their
        projection (no Sinkhorn), then the final RMSNorm -> [B, S, D]."""
        return self.collapse_for_head(x, project_streams(x, fn, self.args.rms_norm_eps), scale, base, norm)

    def collapse_for_head(self, x: torch.Tensor, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                          norm: torch.Tensor) -> torch.Tensor:
        pre = torch.sigmoid(mixes * scale + base)
        y = ((pre + self.args.hc_eps).unsqueeze(-1) * wide(x)).sum(2).to(x.dtype)
        return rms_norm(y, norm, self.args.rms_norm_eps)

    # --- compressor ----------------------------------------------------------------------
    def compress(self, prefix: str, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                 st: CompressorState, ratio: int, head_dim: int, rotate: bool) -> None:
        """Feed S tokens to a compressor; every `ratio`-th token emits one entry into st.entries
        (compressor_step, with this compressor's weights)."""
        self.compressor_step(x, pos, slots, st.kv, st.score, st.entries, *self.compressor_linears(prefix),
                             self.w[f"{prefix}ape"], self.w[f"{prefix}norm.weight"], ratio, head_dim, rotate)

    def compressor_linears(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The compressor's (wkv, wgate); a subclass may give (wkv and wgate stacked, None)."""
        return self.w[f"{prefix}wkv.weight"], self.w[f"{prefix}wgate.weight"]

    def compressor_step(self, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kv_state_all: torch.Tensor,
                        score_state_all: torch.Tensor, entries: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor | None,
                        ape: torch.Tensor, norm: torch.Tensor, ratio: int, head_dim: int, rotate: bool) -> None:
        """x: [B, S, D]; pos: [B, S]; the state tensors are updated in place. Token p is written to
        its window row; when (p+1) % ratio == 0 the window is pooled (softmax over rows of score +
        ape, per channel) into entry p // ratio, normalized, rotated at the window's first position
        and QAT-rounded. wgate None: wkv holds wkv's rows then wgate's (one GEMM)."""
        kv_all, score_all = compressor_projections(x, wkv, wgate)  # [B, S, coff*d] fp32 each
        rows = torch.arange(x.shape[0], device=x.device)
        kv_state, score_state = kv_state_all[slots], score_state_all[slots]  # local copies, written back below
        pooled = []
        for t in range(x.shape[1]):
            p = pos[:, t]
            row = window_row(p, ratio)
            kv_state[rows, row] = kv_all[:, t]
            score_state[rows, row] = score_all[:, t] + ape[p % ratio]
            pooled.append(pool_window(kv_state, score_state, ratio, head_dim))
            if ratio == 4:
                kv_state, score_state = next_window(kv_state, p, ratio), next_window(score_state, p, ratio)
        kv_state_all[slots], score_state_all[slots] = kv_state, score_state

        entry = self.finish_entries(torch.stack(pooled, dim=1), pos, norm, ratio, rotate)
        self.write_entries(CompressorState(kv_state_all, score_state_all, entries), slots, pos, entry, ratio)

    def finish_entries(self, pooled: torch.Tensor, pos: torch.Tensor, norm: torch.Tensor, ratio: int,
                       rotate: bool, rotation=None, rope=apply_rope, kv_qat=None) -> torch.Tensor:
        """Pooled windows [B, S, d] -> entries: normalized, rotated at the window's first position
        and QAT-rounded (`rotation`, `rope`, `kv_qat`: other forms of qat_rotation, apply_rope, _kv_qat)."""
        entry = rms_norm(pooled.to(self.dtype), norm, self.args.rms_norm_eps)
        entry = rope(entry, pos + 1 - ratio, self.freqs[True], self.args.qk_rope_head_dim)
        if self.simulate_qat:
            if rotate:
                entry = fp4_qdq((rotation or self.qat_rotation)(entry), INDEXER_QAT_BLOCK)
            else:
                entry = (kv_qat or self._kv_qat)(entry)
        return entry

    def write_entries(self, st: CompressorState, slots: torch.Tensor, pos: torch.Tensor, entry: torch.Tensor,
                      ratio: int) -> None:
        """Store the entries of the tokens that close a window."""
        if pos.shape[1] == 1:
            write_entries_decode(st, slots, pos, entry, ratio)
        else:
            write_entries_emitting(st, slots, pos, entry, ratio)

    def _kv_qat(self, kv: torch.Tensor) -> torch.Tensor:
        """FP8 QDQ of the NoPE dims (block 64); the RoPE dims keep full precision."""
        nope = self.args.nope_head_dim
        return torch.cat([fp8_qdq(kv[..., :nope], KV_QAT_BLOCK), kv[..., nope:]], dim=-1)

    # --- indexer -------------------------------------------------------------------------
    def indexer(self, prefix: str, x, qr, pos, slots, st: CompressorState) -> torch.Tensor:
        """Lightning indexer: which compressed entries each query attends, its compressor fed with
        these tokens already (attention starts that on lane 2 first). Its queries take lane 3 while
        that compressor runs; the scoring follows both on lane 2. -> mask [B, S, C]."""
        a = self.args
        with self.beside(lane=3):
            q = self.linear(qr, f"{prefix}wq_b").unflatten(-1, (-1, a.index_head_dim))  # heads held here
            q, weights = self.index_queries(q, x, self.w[f"{prefix}weights_proj.weight"], pos)
            with self.beside(lane=2):
                scores = self.reduce_partial(self.index_scores(q, weights, st.entries, slots))
                mask = self.index_select(scores, pos)
                if self.index_trace is not None:
                    self.index_trace.append((prefix, slots.cpu(), scores.float().cpu(), mask.cpu()))
        return mask

    def qat_rotation(self, x: torch.Tensor) -> torch.Tensor:
        """The indexer's QAT rotation (keys and queries, before their FP4 rounding): x @ H."""
        return x @ self._hadamard

    def index_queries(self, q: torch.Tensor, x: torch.Tensor, weights_proj: torch.Tensor, pos: torch.Tensor,
                      rotation=None, linear=fp32_linear):
        """The index heads' (held here) queries q [B, S, Hi, Di] after RoPE (and the QAT's rotation
        and FP4 rounding), and their weights [B, S, Hi] from x (`rotation`: another form of
        qat_rotation; `linear`: another runner of fp32_linear)."""
        a = self.args
        q = apply_rope(q, pos, self.freqs[True], a.qk_rope_head_dim)
        if self.simulate_qat:
            q = fp4_qdq((rotation or self.qat_rotation)(q), INDEXER_QAT_BLOCK)
        weights = linear(x, weights_proj) * (a.index_head_dim ** -0.5 * a.index_n_heads ** -0.5)
        return q, weights

    @staticmethod
    def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The index heads' weighted ReLU scores of the slots' compressed keys (of all slots' [N, C, Di])
        -> [B, S, C]."""
        scores = torch.einsum("bshd,bcd->bshc", wide(q), wide(keys[slots])).relu()
        return (scores * weights.unsqueeze(-1)).sum(2)

    def index_select(self, scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The top `index_topk` of the entries each query may see (those emitted so far) -> mask [B, S, C]
        (fewer where fewer entries exist)."""
        valid = emitted_entries(scores.shape[-1], pos, 4)
        picked = stable_topk_mask(scores.masked_fill(~valid, float("-inf")), min(self.args.index_topk, scores.shape[-1]))
        return valid & picked

    # --- attention -----------------------------------------------------------------------
    def attention(self, prefix: str, layer: int, x, pos, slots, st: LayerState) -> torch.Tensor:
        """x: [B, S, D] -> [B, S, D]. Keys: the sliding window (ring + new tokens) and, on
        compressed layers, the compressed entries (all so far for HCA, the indexer's pick for CSA)."""
        a = self.args
        ratio = a.compress_ratio(layer)
        freqs = self.freqs[ratio > 0]
        p = f"{prefix}attn."
        entries = comp_mask = None
        # Independent paths until attend (names stay bound until join(): a side stream may still
        # read them): the compressors, which read x only and so start first (the indexer's on lane
        # 2, where the indexer's scoring follows); the window (lane 1); the query heads.
        if ratio:
            entries = st.compressor.entries                                      # [slots, C, hd]
            with self.beside(lane=0):
                self.compress(f"{p}compressor.", x, pos, slots, st.compressor, ratio, a.head_dim, rotate=False)
        if ratio == 4:
            with self.beside(lane=2):
                self.compress(f"{p}indexer.compressor.", x, pos, slots, st.indexer, 4, a.index_head_dim, rotate=True)
        q_lora, kv_lora = self.linears(x, (f"{p}wq_a", f"{p}wkv"))
        with self.beside(lane=1):
            kv = self.kv_entry(kv_lora, self.w[f"{p}kv_norm.weight"], pos, freqs)
            window, window_mask = self.window(st.ring, slots, kv, pos)
            self.ring_write(st.ring, slots, pos, kv)
            if ratio and ratio != 4:  # HCA: every entry emitted so far (short work: on the short lane)
                comp_mask = self.emitted_mask(entries, pos, ratio)
        qr = self.norm(q_lora, self.w[f"{p}q_norm.weight"])
        if ratio == 4:
            comp_mask = self.indexer(f"{p}indexer.", x, qr, pos, slots, st.indexer)
        q = self.query_heads(self.linear(qr, f"{p}wq_b").unflatten(-1, (-1, a.head_dim)), pos, freqs)
        self.join()
        o = self.attend(q, window, window_mask, entries, slots, comp_mask, self.w[f"{p}attn_sink"], pos, freqs)
        # Grouped output projection: block-diagonal wo_a (one [o_lora, H*hd/G] block per group).
        o = o.flatten(2).unflatten(-1, (-1, a.num_attention_heads * a.head_dim // a.o_groups))  # [B, S, G, H*hd/G]
        return self.reduce_partial(self.linear(self.grouped_linear(o, f"{p}wo_a").flatten(2), f"{p}wo_b"))

    # The attention's pure-torch pieces between the linears: one function each, with the weights
    # as arguments, so a subclass can compile them (backend.gpu_model) and every layer shares it.
    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm with the model's eps (the q LoRA norm)."""
        return rms_norm(x, weight, self.args.rms_norm_eps)

    @staticmethod
    def emitted_mask(entries: torch.Tensor, pos: torch.Tensor, ratio: int) -> torch.Tensor:
        """Which of the slots' compressed entries (all slots' [N, C, hd]) exist for each query
        position [B, S] -> [B, S, C]: those an HCA layer attends."""
        return emitted_entries(entries.shape[1], pos, ratio)

    @staticmethod
    def ring_write(ring: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor) -> None:
        """The new tokens' KV into the slots' sliding rings, in place; only the last `win` survive."""
        win = ring.shape[1]
        tail = min(kv.shape[1], win)
        ring[slots.unsqueeze(1), pos[:, -tail:] % win] = kv[:, -tail:]

    def query_heads(self, q: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, rope=apply_rope) -> torch.Tensor:
        """Queries [B, S, H, hd]: per-head unweighted RMSNorm, then RoPE (`rope`: another form of apply_rope)."""
        a = self.args
        return rope(rms_norm(q, None, a.rms_norm_eps), pos, freqs, a.qk_rope_head_dim)

    def kv_entry(self, kv: torch.Tensor, norm: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor,
                 rope=apply_rope, kv_qat=None) -> torch.Tensor:
        """The shared K=V head [B, S, hd]: RMSNorm, RoPE, and the KV cache's FP8 QAT rounding (`rope`,
        `kv_qat`: other forms of apply_rope and _kv_qat)."""
        a = self.args
        kv = rope(rms_norm(kv, norm, a.rms_norm_eps), pos, freqs, a.qk_rope_head_dim)
        return (kv_qat or self._kv_qat)(kv) if self.simulate_qat else kv

    def window(self, rings: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor):
        """Sliding-window keys: the slots' rings [B, win, hd] as they were before these tokens, then
        the new tokens -> keys [B, win + S, hd] and the mask [B, S, win + S] of those each query sees."""
        win, ring = self.args.sliding_window, rings[slots]
        last = (pos[:, 0] - 1).unsqueeze(1)                                    # [B, 1]
        ring_pos = last - (last - torch.arange(win, device=kv.device)) % win  # [B, win]
        key_pos = torch.cat([ring_pos, pos], dim=1).unsqueeze(1)
        qp = pos.unsqueeze(-1)
        return torch.cat([ring, kv], dim=1), (key_pos >= 0) & (key_pos <= qp) & (key_pos > qp - win)

    def attend(self, q, window, window_mask, entries, slots, comp_mask, sink, pos, freqs) -> torch.Tensor:
        """Sparse MQA over the window and (compressed layers) the slots' compressed entries (of all
        slots' [N, C, hd]), then the inverse RoPE of the output -> [B, S, H, hd]."""
        a = self.args
        keys, mask = window, window_mask
        if entries is not None:
            keys, mask = torch.cat([keys, entries[slots]], dim=1), torch.cat([mask, comp_mask], dim=-1)
        o = sparse_attention(q, keys, mask, sink, a.head_dim ** -0.5)
        return apply_rope(o, pos, freqs, a.qk_rope_head_dim, inverse=True)

    def grouped_linear(self, o: torch.Tensor, name: str) -> torch.Tensor:
        """o: [B, S, G, K] through the block-diagonal weight `name` [G*R, K] -> [B, S, G, R]."""
        if self.simulate_qat and isinstance(self.w[name], Fp8BlockWeight):  # what the FP8 runner computes
            o = fp8_qdq(o)
        w = dequantize_weight(self.w[name], o.dtype).unflatten(0, (o.shape[2], -1))
        return torch.einsum("bsgd,grd->bsgr", o, w)

    # --- MoE -----------------------------------------------------------------------------
    def route(self, prefix: str, x: torch.Tensor, input_ids: torch.Tensor, hashed: bool):
        """x: [T, D] -> weights [T, k] (normalized, times routed_scaling_factor), experts [T, k].
        Hash layers' experts are the tokens' rows of the hash table, looked up here, outside
        `routing`: compiled with it, one Inductor kernel stored the experts and read them back in a
        second loop, where a warp may read an element before another warp has stored it (the
        elements are replicated across warps): stale experts, an H200 index assert (bench/NOTES.md)."""
        choice = self.hash_experts(prefix, input_ids) if hashed else self.w[f"{prefix}gate.bias"]
        return self.routing(x, self.w[f"{prefix}gate.weight"], choice, hashed)

    def hash_experts(self, prefix: str, input_ids: torch.Tensor) -> torch.Tensor:
        """A hash layer's experts: the tokens' rows of its table tid2eid -> [T, k] int64."""
        return self.w[f"{prefix}gate.tid2eid"][input_ids].long()

    def routing(self, x: torch.Tensor, gate: torch.Tensor, choice: torch.Tensor, hashed: bool,
                linear=fp32_linear, top_k=topk_indices):
        """sqrt(softplus) scores (the BF16 gate in fp32 math, as the compressors' and the indexer's
        small linears, DeepSeek-style); experts: `choice` itself (hash layers: the tokens' rows of
        the hash table) or the top-k of scores + bias `choice` (`top_k`: another way to
        topk_indices' indices; `linear`: another runner of fp32_linear)."""
        a = self.args
        scores = F.softplus(linear(x, gate)).sqrt()                                # [T, E] fp32
        experts = choice if hashed else top_k(scores + choice, a.num_experts_per_tok)
        weights = scores.gather(1, experts)
        return weights / weights.sum(-1, keepdim=True) * a.routed_scaling_factor, experts

    def expert(self, x: torch.Tensor, prefix: str, weight: torch.Tensor | None, clamp: bool) -> torch.Tensor:
        """SwiGLU expert w2(silu(w1 x) * (w3 x)); routed experts clamp at swiglu_limit and apply
        the routing weight before w2, as DeepSeek's reference does."""
        gate, up = self.linears(x, (f"{prefix}w1", f"{prefix}w3"))
        h = self.swiglu(gate, up, weight, self.args.swiglu_limit if clamp else None)
        return self.linear(h.to(x.dtype), f"{prefix}w2")

    @staticmethod
    def swiglu(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None, limit: float | None) -> torch.Tensor:
        """silu(gate) * up in fp32, both clamped at `limit` if given (routed experts), times the routing weight."""
        gate, up = wide(gate), wide(up)
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        h = F.silu(gate) * up
        return h if weight is None else weight * h

    def moe(self, prefix: str, x: torch.Tensor, input_ids: torch.Tensor, hashed: bool) -> torch.Tensor:
        """x: [B, S, D] -> routed experts + shared expert, [B, S, D]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(f"{prefix}ffn.", x, input_ids.reshape(-1), hashed)
        y = torch.zeros(x.shape, dtype=wide_dtype(x.dtype), device=x.device)
        for e in experts.unique().tolist():
            if not self.holds_expert(e):
                continue
            token, k = torch.where(experts == e)
            y.index_add_(0, token, self.expert(x[token], f"{prefix}ffn.experts.{e}.",
                                               weights[token, k, None], clamp=True).to(y.dtype))
        if self.holds_shared_expert:
            y += self.expert(x, f"{prefix}ffn.shared_experts.", None, clamp=False).to(y.dtype)
        return self.reduce_partial(y).to(x.dtype).view(shape)

    # --- work that may overlap what follows it ----------------------------------------------
    def beside(self, lane: int = 0) -> contextlib.AbstractContextManager:
        """Context for work whose results nothing uses before join(): a subclass may run it on
        another stream (one per lane), beside the work that follows (backend.gpu_model); here it
        runs in place."""
        return contextlib.nullcontext()

    def join(self) -> None:
        """From here on, the work started beside() is done (here: it ran in place)."""

    # --- where a rank holds part of the model (backend.parallel) ---------------------------
    holds_shared_expert = True

    def holds_expert(self, e: int) -> bool:
        return True

    def reduce_partial(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a partial result over the ranks that hold the other parts; one process: itself."""
        return t

    # --- blocks and the whole model --------------------------------------------------------
    def block(self, prefix: str, layer: int, h, input_ids, pos, slots, st: LayerState, hashed: bool):
        """One transformer block on the streams h: [B, S, hc, D]."""
        x, post, comb = self.hc_pre(h, prefix, "attn")
        h = self.hc_post(self.attention(prefix, layer, x, pos, slots, st), h, post, comb)
        x, post, comb = self.hc_pre(h, prefix, "ffn")
        return self.hc_post(self.moe(prefix, x, input_ids, hashed), h, post, comb)

    def logits(self, h: torch.Tensor, prefix: str = "") -> torch.Tensor:
        w = self.w
        x = self.head_input(h, w[f"{prefix}hc_head_fn"], w[f"{prefix}hc_head_scale"], w[f"{prefix}hc_head_base"],
                            w[f"{prefix}norm.weight"])
        head = w["head.weight"]  # wide, or kept BF16 by a subclass
        return F.linear(x.to(head.dtype), head).to(wide_dtype(self.dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.w["embed.weight"][input_ids].to(self.dtype)

    @staticmethod
    def check_positions(pos: torch.Tensor, state: ModelState) -> None:
        if int(pos.max()) >= state.max_len:
            raise ValueError(f"position {int(pos.max())} exceeds the state's max_len {state.max_len}")

    def _positions(self, input_ids: torch.Tensor, start_pos) -> torch.Tensor:
        """[B, S] positions: start_pos is one start for every row, or one per row."""
        start = torch.as_tensor(start_pos, dtype=torch.long, device=self.device).reshape(-1, 1)
        if start.shape[0] not in (1, input_ids.shape[0]):
            raise ValueError(f"start_pos has {start.shape[0]} entries for {input_ids.shape[0]} sequences")
        return start.expand(input_ids.shape[0], 1) + torch.arange(input_ids.shape[1], device=self.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, start_pos, slots, state: ModelState,
                all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Process input_ids [B, S] at positions start_pos[b] + (0..S-1) for sequences in `slots`.
        Returns logits ([B, V] for the last position, or [B, S, V]) and the final streams
        [B, S, hc, D] (the MTP block's input)."""
        a = self.args
        input_ids = input_ids.to(self.device)
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        pos = self._positions(input_ids, start_pos)
        self.check_positions(pos, state)
        h = self.embed(input_ids)
        h = h.unsqueeze(2).repeat(1, 1, a.hc_mult, 1)
        for layer in range(a.num_hidden_layers):
            h = self.block(f"layers.{layer}.", layer, h, input_ids, pos, slots, state.layers[layer],
                           a.is_hash_layer(layer))
        logits = self.logits(h if all_logits else h[:, -1:])
        return (logits if all_logits else logits[:, 0]), h

    @torch.no_grad()
    def mtp_forward(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos, slots, state: ModelState,
                    depth: int = 0) -> torch.Tensor:
        """MTP block `depth`: from the main model's final streams h [B, S, hc, D] at positions p and
        the tokens at p+1 (next_ids [B, S]), logits [B, S, V] for the tokens at p+2."""
        a = self.args
        layer, prefix = a.num_hidden_layers + depth, f"mtp.{depth}."
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        next_ids = next_ids.to(self.device)
        pos = self._positions(next_ids, start_pos)
        e = rms_norm(self.embed(next_ids), self.w[f"{prefix}enorm.weight"], a.rms_norm_eps)
        hn = rms_norm(h, self.w[f"{prefix}hnorm.weight"], a.rms_norm_eps)
        x = self.linear(e, f"{prefix}e_proj").unsqueeze(2) + self.linear(hn, f"{prefix}h_proj")
        x = self.block(prefix, layer, x, next_ids, pos, slots, state.layers[layer], hashed=False)
        return self.logits(x, prefix)
