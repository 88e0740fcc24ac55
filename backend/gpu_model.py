"""DeepSeek-V4 on the kernel runners: the reference model (backend.model) with every quantized
linear, the grouped wo_a, the routed experts and the mHC coefficients running on the device's
runners (kernels.dispatch: sm_90a CuTe DSL kernels on Hopper). Its decode step has no host syncs
(the reference's, minus the position check the engine does on the host), so it captures into a
CUDA graph (backend.engine.cuda_graphs).

What stays as in the reference (torch ops, fp32 math, all capturable): mHC, norms, RoPE, the
compressors, the indexer, sparse attention over the ring and the compressed entries, routing and
the small BF16 linears. The head stays BF16 (cuBLAS). Activations stay fp32 into the runners: the
FP8 quantizer reads them directly, the W4A16 kernels round them once to f16.

Weights keep their checkpoint formats on the GPU. Routed experts are stacked once per layer
(kernels.moe.stack_experts, a bit-preserving copy made on the host before upload), so the GPU
holds one copy.
"""
from __future__ import annotations

import os
import weakref

import torch

from kernels import attention, dispatch, mhc
from kernels.attention import sparse_mqa_decode
from kernels.cute_compile import cache_root
from kernels.mhc import mhc_pre
from kernels.formats import FP8_BLOCK, Fp8BlockWeight, Mxfp4Weight, quantize_activation_fp8
from kernels.linear import reserve_split_counters
from kernels.moe.experts import check_mxfp4_scales

from .compiled_forms import CompiledForms
from .config import ModelArgs
from .gpu_weights import SAME_INPUT_LINEARS, split_experts, stack_rows
from .inductor_check import install_check
from .model import DeepseekV4, ModelState

SHARED_EXPERT_LANE = 4  # beside(): lanes 0-3 are the attention's (backend.model)


# The pure-torch pieces between the runners (backend.model: attention side, mHC mixing, norms,
# routing): dozens of small kernels per layer eagerly, which bound the decode step at small
# batch; torch.compile fuses each into a few.
COMPILED_PIECES = ("norm", "head_input", "query_heads", "kv_entry", "window", "ring_write", "attend",
                   "compressor_step", "index_queries", "index_scores", "index_select", "hc_mixes",
                   "sublayer_input", "hc_post", "routing", "swiglu", "combine_experts", "emitted_mask")
# Pieces compiled in another form of the same math that compiles to fewer or faster kernels (the
# fp32 sums possibly in another order; backend.compiled_forms); eager calls keep the reference's form.
COMPILED_FORMS = {"hc_mixes": "hc_mixes_in_chunks", "hc_post": "hc_post_unrolled",
                  "compressor_step": "compressor_step_in_place", "routing": "routing_by_argmax",
                  "head_input": "head_input_in_chunks", "index_queries": "index_queries_fast_rotation",
                  "query_heads": "query_heads_in_one_pass", "kv_entry": "kv_entry_in_one_pass"}
# Pieces whose output feeds FP8 linears (the q LoRA norm: wq_b and the indexer's wq_b; the mHC
# sublayer input: wq_a||wkv and the shared w1||w3; attention: wo_a; the shared SwiGLU: w2). Their
# compiled forms also quantize the output as the FP8 runner would (quantize_activation_fp8, the
# runner quantizer's twin, bit for bit), fused with the piece, and those linears take that instead
# of launching the quantizer each.
QUANTIZING_PIECES = ("norm", "sublayer_input", "attend", "swiglu")
# Decode attention on kernels.attention (where its kernel applies) in place of these pieces: they
# then run in prefill only, eagerly.
FUSED_ATTENTION_PIECES = ("window", "attend")


def _quantizing(piece):
    """piece's output y, and y's FP8 activation quantization (rows = tokens), or None where its
    width is not whole 128-blocks."""
    def quantizing(*args):
        y = piece(*args)
        rows = y.reshape(y.shape[0] * y.shape[1], -1) if y.dim() > 2 else y
        return (y, *quantize_activation_fp8(rows)) if rows.shape[-1] % FP8_BLOCK == 0 else (y, None, None)
    return quantizing


def _cache_inductor_next_to_the_kernels() -> None:
    """Inductor's compiled code next to the runners' kernels (not in /tmp), so a restart or a new
    container on the same cache volume skips the minutes of compilation. A directory the user chose
    stays; Inductor writes its /tmp default into the environment on first use, so that one is replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


class DeepseekV4Gpu(CompiledForms, DeepseekV4):
    def __init__(self, args: ModelArgs, weights: dict, simulate_qat: bool = True, device="cuda",
                 compile_attention: bool = False, overlap: bool = True, inductor_pdl: bool = True):
        rest, stacks = split_experts(weights)  # routed experts' MXFP4 scales are checked when stacked
        for name, w in rest.items():
            if isinstance(w, Mxfp4Weight):  # a dense MXFP4 linear runs on the same W4A16 kernels
                check_mxfp4_scales(f"{name}.scale", w.scale.view(torch.uint8))
        head = rest.pop("head.weight")
        super().__init__(args, rest, simulate_qat=simulate_qat, dtype=torch.float32, device=device)
        self.stacks = {prefix: s.to(self.device) for prefix, s in stacks.items()}
        self.w["head.weight"] = head.to(self.device, torch.bfloat16)  # 1 GB in BF16 for V4: not widened
        self._decoding = False
        self.stacked = self._stack_same_input_weights()
        self.has_fp8 = any(isinstance(w, Fp8BlockWeight) for w in self.w.values())
        # hc_pre and decode attention on kernels.mhc and kernels.attention where their kernels apply
        # (every V4 model); elsewhere, and on the CPU, the reference's pieces.
        on_kernels = dispatch.backend(self.device) != "twin"
        self.fused_mhc = on_kernels and mhc.applies(args.hc_mult, args.hidden_size)
        self.fused_attention = on_kernels and attention.applies(args.num_attention_heads, args.head_dim)
        self._fp8_inputs = {}  # data_ptr -> (weakref to a piece's output, its FP8 quantization)
        # The hash layers' tables as one [layers, V, k] int64 tensor: one lookup gives a step's
        # experts for all of them (hash_experts).
        hash_layers = [i for i in range(args.num_hidden_layers) if args.is_hash_layer(i)]
        self.hash_table_index = {f"layers.{i}.ffn.": n for n, i in enumerate(hash_layers)}
        self.hash_tables = torch.stack([self.w.pop(f"layers.{i}.ffn.gate.tid2eid").long() for i in hash_layers]) \
            if hash_layers else None
        self._hash_experts = None  # this step's, looked up by the first hash layer
        # Decode steps run the work beside() marks on side streams, one per lane (the compressor;
        # the window; the indexer's compressor and scoring; its queries; the shared expert): at
        # small batch each of their kernels fills a few SMs, so they fit beside the query heads and
        # the routed experts (captured as parallel graph branches). Empty: one stream.
        lanes = 5 if overlap and self.device.type == "cuda" else 0
        self.side_streams = tuple(torch.cuda.Stream(self.device) for _ in range(lanes))
        for stream in self.side_streams:
            reserve_split_counters(stream)
        self._forked: set = set()
        if compile_attention:
            # Weights are arguments, so all layers share one compiled graph per piece; dynamic
            # shapes, so the batch sizes of the graph ladder share it too (size 1 specializes).
            # Decode steps only: prefill stays eager (its entry write has data-dependent shapes).
            # A piece still compiles once per value of its int arguments (the compressor: ratio,
            # head dim, rotation) and per coincidence of sizes; past Dynamo's default limit of 8 it
            # would run eagerly (seen on an H200 for the compressor), so the limit is raised.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # No duck shapes: a batch size equal to another size (hc_mult 4, 8 groups, ...) would
            # share its symbol and compile variants of its own, which a graph of that batch size
            # captured while eager calls took another variant (rounding differently: 0.055 apart
            # on the tiny model; bit for bit without duck shapes, H200).
            from torch.fx.experimental import _config as symbolic_shapes_config
            symbolic_shapes_config.use_duck_shape = False
            _cache_inductor_next_to_the_kernels()
            install_check()  # a compiled kernel that reads back what it stored fails the warm-up
            # Inductor's Triton kernels as programmatic dependent launches (Hopper and newer): each
            # starts beside the kernel before it and waits for it before its first dependent load,
            # as the runners' kernels do (kernels.dependent_launch); a step at small batch is a chain
            # of short kernels, each of which would otherwise start only once the one before ended.
            for name in COMPILED_PIECES:
                if self.fused_attention and name in FUSED_ATTENTION_PIECES:
                    continue
                form = getattr(self, COMPILED_FORMS.get(name, name))
                quantizes = self.has_fp8 and name in QUANTIZING_PIECES
                compiled = torch.compile(_quantizing(form) if quantizes else form, dynamic=True,
                                         options={"triton.enable_pdl": inductor_pdl})
                setattr(self, name, self._for_decode(getattr(self, name), compiled, quantizes))

    def _stack_same_input_weights(self) -> dict:
        """Replace same-input linears by one stacked weight each (SAME_INPUT_LINEARS, FP8 only) and
        the compressors' wkv and wgate by one (fp32 here). -> {(names): (stacked name, rows each)}."""
        stacked = {}
        layer_prefixes = sorted({n.removesuffix("attn.wq_a") for n in self.w if n.endswith("attn.wq_a")})
        for prefix in layer_prefixes:
            for group in SAME_INPUT_LINEARS:
                names = tuple(prefix + n for n in group)
                if not all(n in self.w for n in names):
                    continue
                w = stack_rows([self.w[n] for n in names])
                if w is not None:
                    stacked[names] = ("+".join(names), [self.w[n].shape[0] for n in names])
                    self.w[stacked[names][0]] = w
                    for n in names:
                        del self.w[n]
        for name in [n for n in self.w if n.endswith("compressor.wkv.weight")]:
            gate = name.replace(".wkv.", ".wgate.")
            self.w[name.replace(".wkv.", ".wkv+wgate.")] = torch.cat([self.w.pop(name), self.w.pop(gate)])
        # The fp32-math small linears' weights in BF16 as shipped (widened at load) where that is
        # exact: half the bytes for linear_f32, the same products
        for name in [n for n in self.w if n.endswith(("wkv+wgate.weight", "ffn.gate.weight", "weights_proj.weight"))]:
            w = self.w[name]
            self.w[name] = w.bfloat16() if torch.equal(w.bfloat16().float(), w) else w
        return stacked

    def linears(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        if names not in self.stacked:
            return super().linears(x, names)
        name, rows = self.stacked[names]
        return self.linear(x, name).split(rows, dim=-1)

    def compressor_linears(self, prefix: str):
        return self.w[f"{prefix}wkv+wgate.weight"], None

    def _for_decode(self, eager, compiled, quantizes: bool):
        def call(*args):
            if not self._decoding:
                return eager(*args)
            if not quantizes:
                return compiled(*args)
            y, q, scale = compiled(*args)
            if q is not None:
                self._hand_over(y, (q, scale))
            return y
        return call

    def _hand_over(self, y: torch.Tensor, quantized: tuple) -> None:
        """Record y's FP8 quantization for the FP8 linear that reads y (or a view of all of it), by a
        weak reference to the tensor that owns y's memory (a view's base, which every view keeps
        alive): once none is left, that memory may be another tensor's, and the entry is dead."""
        self._fp8_inputs[y.data_ptr()] = (weakref.ref(y if y._base is None else y._base), *quantized)

    def _fp8_input(self, x: torch.Tensor):
        """x's FP8 quantization if a piece made it (x is that piece's output, or a view of all of
        it), else None."""
        entry = self._fp8_inputs.get(x.data_ptr())
        y = entry[0]() if entry is not None else None  # alive: its memory is not another tensor's
        if y is None or y.numel() != x.numel() or not (x.is_contiguous() and y.is_contiguous()):
            return None
        return entry[1], entry[2]

    def forward(self, input_ids: torch.Tensor, start_pos, slots, state: ModelState, all_logits: bool = False):
        self._decoding = input_ids.shape[1] == 1
        try:
            return super().forward(input_ids, start_pos, slots, state, all_logits)
        finally:
            self._decoding = False  # a later call outside forward (mtp_forward) takes the reference's paths
            self._fp8_inputs.clear()
            self._hash_experts = None
            self.join()  # after an error half-way: no side stream's work is left unjoined

    def beside(self, lane: int = 0):
        """Decode steps on CUDA: the lane's side stream, after what was queued so far. Every tensor
        the work beside reads outlives join() (callers hold them), and what it allocates is freed
        on the main stream only after join(), so the allocator never hands memory still in use
        by one stream to another."""
        if not self.side_streams or not self._decoding:
            return super().beside(lane)
        stream = self.side_streams[lane]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        self._forked.add(stream)
        return torch.cuda.stream(stream)

    def event(self) -> torch.cuda.Event | None:
        """An event at this point of the current stream, when decode steps run side streams."""
        return torch.cuda.current_stream(self.device).record_event() if self.side_streams and self._decoding else None

    def join(self) -> None:
        for stream in self._forked:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self._forked.clear()

    def hash_experts(self, prefix: str, input_ids: torch.Tensor) -> torch.Tensor:
        """One lookup for all hash layers per step (the first hash layer's), in the int64
        hash_tables, where a lookup per layer and its widening to int64 took two kernels each
        (H200, 4 flash-shaped layers, 3 of them hashed, batch-1 graph: 0.857 ms per step against
        0.880, one run each)."""
        if self._hash_experts is None:
            self._hash_experts = self.hash_tables.index_select(1, input_ids)     # [layers, T, k]
        return self._hash_experts[self.hash_table_index[prefix]]

    def hc_pre(self, x: torch.Tensor, prefix: str, which: str):
        """Two kernels (kernels.mhc.mhc_pre) instead of the reference's pieces; the sublayer's input
        comes with its FP8 quantization when FP8 linears read it (wq_a||wkv, the shared w1||w3)."""
        if not self.fused_mhc:
            return super().hc_pre(x, prefix, which)
        a, w = self.args, self.w
        b, s, hc, d = x.shape
        y, post, comb, quantized = mhc_pre(x.reshape(b * s, hc, d), w[f"{prefix}hc_{which}_fn"],
                                           w[f"{prefix}hc_{which}_scale"], w[f"{prefix}hc_{which}_base"],
                                           w[f"{prefix}{which}_norm.weight"], a.hc_sinkhorn_iters, a.hc_eps,
                                           a.rms_norm_eps, quantize=self.has_fp8)
        y = y.view(b, s, d)
        if quantized is not None:
            self._hand_over(y, quantized)
        return y, post.view(b, s, hc), comb.view(b, s, hc, hc)

    def window(self, rings: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor):
        """Decode on the fused attention: no copy of the window and no mask; `attend` reads the rings in
        place once ring_write has put this step's token in (None marks that)."""
        if self._decoding and self.fused_attention:
            return rings, None
        return super().window(rings, slots, kv, pos)

    def attend(self, q, window, window_mask, entries, slots, comp_mask, sink, pos, freqs) -> torch.Tensor:
        """Decode: two kernels (kernels.attention.sparse_mqa_decode) over the rings (`window`, this
        step's token written) and the entries in place; the output comes with its FP8 quantization
        when wo_a is FP8. Prefill: the reference's."""
        if window_mask is not None:
            return super().attend(q, window, window_mask, entries, slots, comp_mask, sink, pos, freqs)
        b, _, h, d = q.shape
        o, quantized = sparse_mqa_decode(q.reshape(b, h, d), window, entries,
                                         None if comp_mask is None else comp_mask.reshape(b, -1), slots,
                                         pos.reshape(b), sink, freqs, self.args.head_dim ** -0.5, quantize=self.has_fp8)
        if quantized is not None:
            self._hand_over(o, quantized)
        return o.view(b, 1, h, d)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        shape, w = x.shape, self.w[name]
        quantized = self._fp8_input(x) if isinstance(w, Fp8BlockWeight) else None
        y = dispatch.linear(quantized or x.reshape(-1, shape[-1]), w, out_dtype=x.dtype)
        return y.view(*shape[:-1], -1)

    def grouped_linear(self, o: torch.Tensor, name: str) -> torch.Tensor:
        b, s, g, k = o.shape
        w = self.w[name]
        quantized = self._fp8_input(o) if isinstance(w, Fp8BlockWeight) else None
        return dispatch.linear(quantized or o.reshape(b * s, g * k), w, out_dtype=o.dtype, groups=g).view(b, s, g, -1)

    def moe(self, prefix: str, x: torch.Tensor, input_ids: torch.Tensor, hashed: bool) -> torch.Tensor:
        shape, stack = x.shape, self.stacks[f"{prefix}ffn."]
        flat = x.reshape(-1, shape[-1]).contiguous()
        # Beside the routing: the routed experts' activation layout (H200, batch 1: 4 us on the
        # critical path), then the shared expert; the experts wait for the first only.
        with self.beside(lane=SHARED_EXPERT_LANE):
            ordered, ordered_ready = dispatch.moe_activations(flat), self.event()
            shared = self.expert(flat, f"{prefix}ffn.shared_experts.", None, clamp=False)
        weights, experts = self.route(f"{prefix}ffn.", flat, input_ids.reshape(-1), hashed)
        if ordered_ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ordered_ready)
        y = dispatch.moe(flat, weights, experts, stack, self.args.swiglu_limit, sum_slots=False, x_ordered=ordered)
        self.join()
        return self.combine_experts(y, shared).to(x.dtype).view(shape)

    @staticmethod
    def check_positions(pos: torch.Tensor, state: ModelState) -> None:
        if pos.shape[1] > 1:  # decode positions are checked by the engine, on the host
            DeepseekV4.check_positions(pos, state)
