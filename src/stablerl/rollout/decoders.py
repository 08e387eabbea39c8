"""Incremental decoders used by the local engine: prefill a batch of prompts, then one token per
step, returning next-token logits and (for MoE) the routes of the fed positions.

- ``HFDecoder``: any causal LM ``transformers`` loads, through its own forward with a
  ``DynamicCache``; routes come from ``stablerl.routing.capture_routes``.
- ``FastQwen3MoeDecoder``: the same Qwen3-MoE maths written as a lean inference path, as an
  inference engine would: a preallocated KV cache (no per-step concatenation of the whole
  cache), masks and rotary tables built once per step for all layers, plain batched-matmul
  attention for single-token decode, routes recorded inline (no hooks), experts as
  capacity-padded batched matmuls or matmuls over the token-expert pairs, picked per call
  (``stablerl.moe.grouped_experts``); bf16 matrices prepacked for oneDNN where it runs them. It
  reads the weights from the engine's HF model when built (once per generate call), so a weight
  sync updates both paths. Every matrix multiply runs in ``stablerl.precision.matmul_dtype`` (bf16
  inputs multiplied in fp32 on a CPU without native bf16 kernels), its weights cast to it once per build.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from stablerl.models import is_moe, position_ids_from_mask
from stablerl.moe import grouped_experts, pairs_can_pay, static_layout
from stablerl.precision import PackedWeight, linear, matmul, matmul_dtype, pack_weight
from stablerl.rollout.sampling import sample_next
from stablerl.routing import NO_ROUTE, ROUTE_DTYPE, capture_routes


class HFDecoder:
    def __init__(self, model: nn.Module, capture: bool):
        from transformers import DynamicCache

        self.model, self.capture = model, capture and is_moe(model)
        self.cache = DynamicCache(config=model.config)
        self.attention_mask: torch.Tensor | None = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        kwargs = dict(
            input_ids=ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if not self.capture:
            return self.model(**kwargs).logits[:, -1], None
        with capture_routes(self.model) as cap:
            logits = self.model(**kwargs).logits[:, -1]
        return logits, cap.routes

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor):
        self.attention_mask = attention_mask.long()
        return self._forward(ids, position_ids_from_mask(attention_mask))

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        self.attention_mask = torch.cat([self.attention_mask, valid.long()[:, None]], dim=1)
        return self._forward(tokens[:, None], positions[:, None])

    def keep(self, rows: torch.Tensor) -> None:
        """Decode only ``rows`` (indices into the current batch) from now on."""
        # every cache layer kind can reorder along the batch, the recurrent state of a linear
        # attention layer included (its batch_select_indices does not exist); a subset of rows is a
        # reorder to fewer rows
        self.cache.reorder_cache(rows)
        self.attention_mask = self.attention_mask[rows]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as HF: normalize in fp32, cast back, then scale. Written out rather than F.rms_norm, which
    # copies strided inputs (the q/k heads are a strided view of the fused projection).
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


# rollout.compile: prompt widths are left-padded to a multiple of COMPILED_WIDTH_BUCKET and cache
# lengths rounded up to one of COMPILED_LEN_BUCKET, so that batches of different widths share
# their compiled prefill and step
COMPILED_WIDTH_BUCKET, COMPILED_LEN_BUCKET = 8, 64
_COMPILED: dict = {}
# the sampling settings as the compiled step sees them
Sampling = namedtuple("Sampling", "temperature top_k top_p")


def _compiled(name: str):
    """``FastQwen3MoeDecoder``'s method ``name`` (``_static_prefill``, ``_static_step``,
    ``_static_sample_and_step``) under
    ``torch.compile``, one compiled function per method for the process: dynamo keeps a graph per
    batch size, width or cache length and dtype, and guards on tensors' shapes (the decoder holds
    its weights as tensors), so a new decoder of a known shape reuses its graph."""
    if name not in _COMPILED:
        # emulate_precision_casts: fused kernels round to bf16 between operations where eager
        # does (by default inductor keeps fp32 there, which made a bf16 engine's mismatch with
        # the fp32 training forward 25% smaller than eager's: not the precision it names).
        # cpp_wrapper: the graph's kernel calls and buffer allocations issued from C++, not from a
        # Python wrapper (a step of the tiny model calls ~30 kernels: 6-8% of its rollout)
        _COMPILED[name] = torch.compile(
            getattr(FastQwen3MoeDecoder, name),
            dynamic=False,
            options={"emulate_precision_casts": True, "cpp_wrapper": True},
        )
    return _COMPILED[name]


class FastQwen3MoeDecoder:
    @staticmethod
    def supports(model: nn.Module) -> bool:
        cfg = model.config
        return (
            cfg.model_type == "qwen3_moe"
            and getattr(cfg, "sliding_window", None) is None
            and cfg.rope_parameters.get("rope_type", "default") == "default"
        )

    def __init__(
        self, model: nn.Module, capture: bool, batch_size: int, max_len: int, act_quant=None, compiled: bool = False
    ):
        cfg = model.config
        self.capture, self.compiled = capture, compiled
        if compiled:  # a few cache lengths for all prompt widths (room for the widths' bucketing)
            max_len = -(-(max_len + COMPILED_WIDTH_BUCKET - 1) // COMPILED_LEN_BUCKET) * COMPILED_LEN_BUCKET
        # W8A8 engines: the input of each fp8 matmul rounded per token (identity otherwise)
        self.act_quant = act_quant
        self.quant = act_quant or (lambda x: x)
        layers = list(model.model.layers)
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        rotary = model.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), rotary.attention_scaling
        dtype = model.model.embed_tokens.weight.dtype
        # [B, n_kv, max_len, head_dim] per layer: a slice [:, :, :t] keeps batch and head dims
        # collapsible, so the attention matmuls read the cache in place (no copy per step)
        shape = (batch_size, self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype) for _ in layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype) for _ in layers]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool)
        self.length = 0
        # the matrices, in the dtype they are multiplied in, built per decoder (i.e. per generate
        # call) from the engine's current weights: a no-op cast unless that dtype differs
        self.mm_dtype = mm = matmul_dtype(dtype, model.model.embed_tokens.weight.device)

        # the 2-D matrices prepacked once for oneDNN's bf16 kernel where it runs them (a no-op
        # otherwise: stablerl.precision.pack_weight); rows = a decode step's
        def pack(w):  # (the compiled step multiplies plain matrices: the compiler picks its kernels)
            w = w.detach().to(mm)
            return w if compiled else pack_weight(w, batch_size)

        self.lm_head_weight = pack(model.lm_head.weight)
        self.lm_head_bias = model.lm_head.bias
        # q/k/v as one matmul and the q/k head norms as one
        self.qkv_weight, self.o_weight, self.qk_norm_weight, self.mlp_weights = [], [], [], []
        self.packed_experts: list[tuple[list, list] | None] = []
        # the compiled decode's experts layouts per layer: (prefill, step)
        self.static_layouts: list[tuple[str, str] | None] = []
        # the tensors and functions the layers need, held here rather than read from the modules
        # in the forward: a compiled step then guards on tensors' shapes, not on module objects, so
        # an engine of the same shape (another run in the process) reuses its graph
        self.embed_weight, self.final_norm_weight = model.model.embed_tokens.weight, model.model.norm.weight
        self.norm_weights, self.act_fns, self.is_moe_layer = [], [], []
        for layer in layers:
            self._add_layer(layer, pack, mm, batch_size, compiled)

    def _add_layer(self, layer: nn.Module, pack, mm: torch.dtype, batch_size: int, compiled: bool) -> None:
        """One decoder layer's norms, attention and MLP (dense, or the router and the experts)."""
        self.norm_weights.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight))
        a = layer.self_attn
        if a.q_proj.bias is not None:
            raise ValueError("the fast decoder does not support attention biases")
        self.qkv_weight.append(pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])))
        self.o_weight.append(pack(a.o_proj.weight))
        mlp = layer.mlp
        self.is_moe_layer.append(hasattr(mlp, "experts"))
        act = mlp.experts.act_fn if hasattr(mlp, "experts") else mlp.act_fn
        # transformers' SiLUActivation (nn.SiLU in older versions) is F.silu
        self.act_fns.append(F.silu if type(act).__name__ in ("SiLUActivation", "SiLU") else act)
        if hasattr(mlp, "experts"):  # router, experts' gate/up and down projections
            gate_up, down = (w.detach().to(mm) for w in (mlp.experts.gate_up_proj, mlp.experts.down_proj))
            self.mlp_weights.append((pack(mlp.gate.weight), gate_up, down))
            # each expert's matrices packed too, where the pairs layout may run them
            # (stablerl.moe.grouped_experts)
            packed = None
            if not compiled and pairs_can_pay(gate_up.shape[2], down.shape[2], mm, gate_up.device):
                rows = batch_size * self.top_k // len(gate_up)
                packed = ([pack_weight(w, rows) for w in gate_up], [pack_weight(w, rows) for w in down])
            self.packed_experts.append(packed if packed and isinstance(packed[0][0], PackedWeight) else None)
            self.static_layouts.append(
                tuple(
                    static_layout(len(gate_up), self.top_k, gate_up.shape[2], down.shape[2], mm, decode)
                    for decode in (False, True)
                )
            )
        else:  # a dense layer (mlp_only_layers / decoder_sparse_step)
            self.mlp_weights.append(
                tuple(pack(w) for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
            )
            self.packed_experts.append(None)
            self.static_layouts.append(None)
        # the attention scale folded into q's norm weight (RoPE is linear, so it commutes)
        self.qk_norm_weight.append(
            torch.cat([a.q_norm.weight.expand(self.n_heads, -1) * a.scaling, a.k_norm.weight.expand(self.n_kv, -1)])[
                :, None
            ]
        )

    # -- public ------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor):
        if not self.compiled:
            return self._forward(ids, position_ids_from_mask(attention_mask), attention_mask.bool())
        # left-padded to a bucketed width: the extra columns are padding (masked keys), so the
        # prompts' numbers are unchanged but for the order of their sums
        B, P = ids.shape
        extra = -P % COMPILED_WIDTH_BUCKET
        ids = torch.cat([ids.new_zeros(B, extra), ids], dim=1)
        attention_mask = torch.cat([attention_mask.new_zeros(B, extra), attention_mask], dim=1)
        logits, routes = _compiled("_static_prefill")(
            self, ids, position_ids_from_mask(attention_mask), attention_mask.bool()
        )
        return logits, (None if routes is None else routes[:, extra:])

    def _static_prefill(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        # the prefill with the experts in the compiled step's layouts (no data-dependent shape)
        return self._forward(ids, positions, valid, static=True)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        if not self.compiled:
            return self._forward(tokens[:, None], positions[:, None], valid[:, None])
        slot = self.length
        self.key_valid[:, slot] = valid
        self.length += 1
        return _compiled("_static_step")(self, tokens, positions, torch.tensor([slot]))

    def sample_and_step(
        self,
        logits: torch.Tensor,
        gumbel: torch.Tensor | None,
        finished: torch.Tensor,
        positions: torch.Tensor,
        sampling,
        eos_ids: torch.Tensor,
        pad_token_id: int,
    ):
        """The compiled decode's loop body (``rollout.compile``): sample the next tokens from
        ``logits`` (``stablerl.rollout.sampling.sample_next``) and feed them at ``positions``, in one
        compiled call — per step, the sampling's dozen small eager operations and a second call's
        fixed cost are what a compiled decode of a small model has left outside its graph.
        Returns the tokens, their log-probs, the rows active before them, the rows finished after
        them, the next logits and the fed tokens' routes (-1 on rows not active; None without
        capture)."""
        if not self.compiled:
            raise ValueError("sample_and_step is the compiled decode's step (rollout.compile)")
        slot = torch.tensor([self.length])
        self.length += 1
        # plain values, so that the compiled graph guards on them as constants
        sampling = Sampling(float(sampling.temperature), int(sampling.top_k), float(sampling.top_p))
        return _compiled("_static_sample_and_step")(
            self, logits, gumbel, finished, positions, slot, sampling, eos_ids, pad_token_id
        )

    def _static_sample_and_step(self, logits, gumbel, finished, positions, slot, sampling, eos_ids, pad_token_id):
        tokens, logp, active, finished = sample_next(logits, gumbel, finished, sampling, eos_ids, pad_token_id)
        # the token just sampled is real (valid) even if it was EOS; pads after it are not
        self.key_valid.index_copy_(1, slot, active[:, None])
        logits, routes = self._static_step(tokens, positions, slot)
        if routes is not None:
            routes = routes.to(ROUTE_DTYPE).masked_fill(~active[:, None, None, None], NO_ROUTE)
        return tokens, logp, active, finished, logits, routes

    def keep(self, rows: torch.Tensor) -> None:
        """Decode only ``rows`` (indices into the current batch) from now on: the caches shrink
        to them (one copy), and every later step computes only those rows."""
        if self.compiled:
            raise ValueError("a compiled decode step has a fixed batch: it cannot drop finished rows")
        self.k_cache = [c.index_select(0, rows) for c in self.k_cache]
        self.v_cache = [c.index_select(0, rows) for c in self.v_cache]
        self.key_valid = self.key_valid.index_select(0, rows)

    # -- the model ---------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, static: bool = False):
        B, T = ids.shape
        t0, t1 = self.length, self.length + T
        self.key_valid[:, t0:t1] = valid
        self.length = t1
        x = F.embedding(ids, self.embed_weight)
        cos, sin = self._rope(positions, x.dtype)
        # query i (cache slot t0+i) sees valid keys up to itself; a padded query sees itself so
        # its (unused) softmax is never over an empty set
        slots = torch.arange(t1)
        causal = slots[None, :] <= (t0 + torch.arange(T))[:, None]  # [T, t1]
        mask = (self.key_valid[:, None, :t1] & causal[None]) | (slots[None, :] == (t0 + torch.arange(T))[:, None])[None]
        mask = mask[:, None]  # [B, 1, T, t1]
        if T == 1:  # decode attends [B, n_kv, group, t1]: an additive mask shared by all layers
            mask = torch.zeros(mask.shape, dtype=torch.float).masked_fill_(~mask, float("-inf"))
        return self._layers(x, cos, sin, mask, slice(t0, t1), static)

    def _static_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor):
        """One decode step in which every shape is fixed by the batch and the cache's length, so
        that it compiles to one graph (``rollout.compile``): the token's key and value written at
        cache slot ``slot`` (a tensor, not a Python int), attention over the whole cache with the
        slots not yet written masked out, the experts in a layout with no data-dependent shape
        (``stablerl.moe.static_layout``). The same maths as ``_forward`` at T = 1, summed in other
        orders."""
        x = F.embedding(tokens[:, None], self.embed_weight)
        cos, sin = self._rope(positions[:, None], x.dtype)
        # a key is visible once written and valid; a padded query sees itself (as in _forward)
        visible = self.key_valid | (torch.arange(self.key_valid.shape[1]) == slot)
        mask = torch.zeros(visible.shape, dtype=torch.float).masked_fill_(~visible, float("-inf"))[:, None, None]
        return self._layers(x, cos, sin, mask, slot, static=True)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        cos = (torch.cat((freqs, freqs), dim=-1).cos() * self.rope_scale).to(dtype)[:, None]
        # rotate_half(x) * sin == roll(x, d/2) * [-sin_1, sin_2]: one op fewer per layer
        sin = freqs.sin() * self.rope_scale
        return cos, torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]

    def _layers(self, x, cos, sin, mask, slots: slice | torch.Tensor, static: bool = False):
        # the decoder layers, the final norm and the LM head (of the last position); ``slots``:
        # the cache slots the positions write (a slice; or a slot tensor, and then attention reads
        # the whole cache); ``static``: the experts in the compiled step's layouts
        B, T, _ = x.shape
        routes = []
        for i, (input_norm, post_norm) in enumerate(self.norm_weights):
            x = x + self._attention(_rms_norm(x, input_norm, self.eps), cos, sin, mask, i, slots)
            h = _rms_norm(x, post_norm, self.eps)
            if self.is_moe_layer[i]:
                out, idx = self._moe(h.reshape(B * T, -1), i, self.static_layouts[i][T == 1] if static else None)
                x = x + out.view(B, T, -1)
                routes.append(idx.view(B, T, -1))
            else:
                gate, up, down = self.mlp_weights[i]
                x = x + linear(self.act_fns[i](linear(h, gate)) * linear(h, up), down)
        x = _rms_norm(x[:, -1], self.final_norm_weight, self.eps)
        logits = linear(x, self.lm_head_weight, self.lm_head_bias)
        if not (self.capture and routes):
            return logits, None
        return logits, torch.stack(routes, dim=2)

    def _attention(self, h, cos, sin, mask, layer_idx, slots: slice | torch.Tensor):
        B, T, _ = h.shape
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        qkv = linear(self.quant(h), self.qkv_weight[layer_idx]).view(B, T, nq + 2 * nkv, hd).transpose(1, 2)
        # q and k: per-head RMSNorm (scale folded in) and rotary embedding in one go, then split
        qk = _rms_norm(qkv[:, : nq + nkv], self.qk_norm_weight[layer_idx], self.eps)
        qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        if isinstance(slots, slice):  # read back up to the last slot written
            kc[:, :, slots] = qk[:, nq:]
            vc[:, :, slots] = qkv[:, nq + nkv :]
            q, k, v = qk[:, :nq], kc[:, :, : slots.stop], vc[:, :, : slots.stop]
        else:  # the compiled step: the whole cache, its unwritten slots masked
            kc.index_copy_(2, slots, qk[:, nq:])
            vc.index_copy_(2, slots, qkv[:, nq + nkv :])
            q, k, v = qk[:, :nq], kc, vc
        if T == 1:  # decode: three small batched matmuls beat the CPU flash kernel here
            scores = matmul(q.reshape(B, nkv, nq // nkv, hd), k.transpose(-1, -2), self.mm_dtype).float() + mask
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = matmul(probs, v, self.mm_dtype).view(B, nq, 1, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
        return linear(self.quant(out.transpose(1, 2).reshape(B, T, -1)), self.o_weight[layer_idx])

    def _moe(self, h: torch.Tensor, layer_idx: int, layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        router, gate_up_proj, down_proj = self.mlp_weights[layer_idx]
        # the router exactly as HF computes it: softmax in fp32, top-k, optional renormalization
        router_logits = linear(h, router)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        out = grouped_experts(
            self.quant(h),
            idx,
            weights.to(h.dtype),
            gate_up_proj,
            down_proj,
            self.act_fns[layer_idx],
            quant=self.act_quant,
            layout=layout,
            packed=self.packed_experts[layer_idx],
        )
        return out, idx
