"""Incremental decoders used by the local engine: prefill a batch of prompts, then one token per
step, returning next-token logits and (for MoE) the routes of the fed positions.

- ``HFDecoder``: any causal LM ``transformers`` loads, through its own forward with a
  ``DynamicCache``; routes come from ``stablerl.routing.capture_routes``.
- ``FastQwen3MoeDecoder``: the same Qwen3-MoE maths written as a lean inference path, as an
  inference engine would: a preallocated KV cache (no per-step concatenation of the whole
  cache), masks and rotary tables built once per step for all layers, plain batched-matmul
  attention for single-token decode, routes recorded inline (no hooks), experts as
  capacity-padded batched matmuls or matmuls over the token-expert pairs, picked per call
  (``stablerl.moe.grouped_experts``); bf16 matrices prepacked for oneDNN where it runs them. It reads the weights from the engine's
  HF model when built (once per generate call), so a weight sync updates both paths. Every
  matrix multiply runs in ``stablerl.precision.matmul_dtype`` (bf16 inputs multiplied in fp32 on
  a CPU without native bf16 kernels), its weights cast to it once per build.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stablerl.models import is_moe, position_ids_from_mask
from stablerl.moe import grouped_experts, pairs_can_pay
from stablerl.precision import PackedWeight, linear, matmul, matmul_dtype, pack_weight
from stablerl.routing import capture_routes


class HFDecoder:
    def __init__(self, model: nn.Module, capture: bool):
        from transformers import DynamicCache

        self.model, self.capture = model, capture and is_moe(model)
        self.cache = DynamicCache(config=model.config)
        self.attention_mask: torch.Tensor | None = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        kwargs = dict(input_ids=ids, attention_mask=self.attention_mask, position_ids=positions,
                      past_key_values=self.cache, use_cache=True, logits_to_keep=1)
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
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as HF: normalize in fp32, cast back, then scale. Written out rather than F.rms_norm, which
    # copies strided inputs (the q/k heads are a strided view of the fused projection).
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class FastQwen3MoeDecoder:
    @staticmethod
    def supports(model: nn.Module) -> bool:
        cfg = model.config
        return (cfg.model_type == "qwen3_moe" and getattr(cfg, "sliding_window", None) is None
                and cfg.rope_parameters.get("rope_type", "default") == "default")

    def __init__(self, model: nn.Module, capture: bool, batch_size: int, max_len: int, act_quant=None):
        cfg = model.config
        self.model, self.capture = model, capture
        # W8A8 engines: the input of each fp8 matmul rounded per token (identity otherwise)
        self.act_quant = act_quant
        self.quant = act_quant or (lambda x: x)
        self.layers = list(model.model.layers)
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
        self.k_cache = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool)
        self.length = 0
        # the matrices, in the dtype they are multiplied in, built per decoder (i.e. per generate
        # call) from the engine's current weights: a no-op cast unless that dtype differs
        self.mm_dtype = mm = matmul_dtype(dtype, model.model.embed_tokens.weight.device)
        # the 2-D matrices prepacked once for oneDNN's bf16 kernel where it runs them (a no-op
        # otherwise: stablerl.precision.pack_weight); rows = a decode step's
        def pack(w):
            return pack_weight(w.detach().to(mm), batch_size)

        self.lm_head_weight = pack(model.lm_head.weight)
        self.lm_head_bias = model.lm_head.bias
        # q/k/v as one matmul and the q/k head norms as one
        self.qkv_weight, self.o_weight, self.qk_norm_weight, self.mlp_weights = [], [], [], []
        self.packed_experts: list[tuple[list, list] | None] = []
        for layer in self.layers:
            a = layer.self_attn
            if a.q_proj.bias is not None:
                raise ValueError("the fast decoder does not support attention biases")
            self.qkv_weight.append(pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])))
            self.o_weight.append(pack(a.o_proj.weight))
            mlp = layer.mlp
            if hasattr(mlp, "experts"):  # router, experts' gate/up and down projections
                gate_up, down = (w.detach().to(mm) for w in (mlp.experts.gate_up_proj, mlp.experts.down_proj))
                self.mlp_weights.append((pack(mlp.gate.weight), gate_up, down))
                # each expert's matrices packed too, where the pairs layout may run them
                # (stablerl.moe.grouped_experts)
                packed = None
                if pairs_can_pay(gate_up.shape[2], down.shape[2], mm, gate_up.device):
                    rows = batch_size * self.top_k // len(gate_up)
                    packed = ([pack_weight(w, rows) for w in gate_up], [pack_weight(w, rows) for w in down])
                self.packed_experts.append(packed if packed and isinstance(packed[0][0], PackedWeight) else None)
            else:  # a dense layer (mlp_only_layers / decoder_sparse_step)
                self.mlp_weights.append(tuple(pack(w) for w in (mlp.gate_proj.weight, mlp.up_proj.weight,
                                                                mlp.down_proj.weight)))
                self.packed_experts.append(None)
            # the attention scale folded into q's norm weight (RoPE is linear, so it commutes)
            self.qk_norm_weight.append(torch.cat([a.q_norm.weight.expand(self.n_heads, -1) * a.scaling,
                                                  a.k_norm.weight.expand(self.n_kv, -1)])[:, None])

    # -- public ------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor):
        return self._forward(ids, position_ids_from_mask(attention_mask), attention_mask.bool())

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        return self._forward(tokens[:, None], positions[:, None], valid[:, None])

    def keep(self, rows: torch.Tensor) -> None:
        """Decode only ``rows`` (indices into the current batch) from now on: the caches shrink
        to them (one copy), and every later step computes only those rows."""
        self.k_cache = [c.index_select(0, rows) for c in self.k_cache]
        self.v_cache = [c.index_select(0, rows) for c in self.v_cache]
        self.key_valid = self.key_valid.index_select(0, rows)

    # -- the model ---------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        B, T = ids.shape
        t0, t1 = self.length, self.length + T
        self.key_valid[:, t0:t1] = valid
        self.length = t1
        x = F.embedding(ids, self.model.model.embed_tokens.weight)
        freqs = positions[..., None].float() * self.inv_freq
        cos = (torch.cat((freqs, freqs), dim=-1).cos() * self.rope_scale).to(x.dtype)[:, None]
        # rotate_half(x) * sin == roll(x, d/2) * [-sin_1, sin_2]: one op fewer per layer
        sin = freqs.sin() * self.rope_scale
        sin = torch.cat((-sin, sin), dim=-1).to(x.dtype)[:, None]
        # query i (cache slot t0+i) sees valid keys up to itself; a padded query sees itself so
        # its (unused) softmax is never over an empty set
        slots = torch.arange(t1)
        causal = slots[None, :] <= (t0 + torch.arange(T))[:, None]                      # [T, t1]
        mask = (self.key_valid[:, None, :t1] & causal[None]) | (slots[None, :] == (t0 + torch.arange(T))[:, None])[None]
        mask = mask[:, None]                                                            # [B, 1, T, t1]
        if T == 1:  # decode attends [B, n_kv, group, t1]: an additive mask shared by all layers
            mask = torch.zeros(mask.shape, dtype=torch.float).masked_fill_(~mask, float("-inf"))
        routes = []
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer.self_attn, _rms_norm(x, layer.input_layernorm.weight, self.eps),
                                    cos, sin, mask, i, t0, t1)
            h = _rms_norm(x, layer.post_attention_layernorm.weight, self.eps)
            if hasattr(layer.mlp, "experts"):
                out, idx = self._moe(layer.mlp, h.reshape(B * T, -1), i)
                x = x + out.view(B, T, -1)
                routes.append(idx.view(B, T, -1))
            else:
                gate, up, down = self.mlp_weights[i]
                x = x + linear(layer.mlp.act_fn(linear(h, gate)) * linear(h, up), down)
        x = _rms_norm(x[:, -1], self.model.model.norm.weight, self.eps)
        logits = linear(x, self.lm_head_weight, self.lm_head_bias)
        if not (self.capture and routes):
            return logits, None
        return logits, torch.stack(routes, dim=2)

    def _attention(self, attn, h, cos, sin, mask, layer_idx, t0, t1):
        B, T, _ = h.shape
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        qkv = linear(self.quant(h), self.qkv_weight[layer_idx]).view(B, T, nq + 2 * nkv, hd).transpose(1, 2)
        # q and k: per-head RMSNorm (scale folded in) and rotary embedding in one go, then split
        qk = _rms_norm(qkv[:, : nq + nkv], self.qk_norm_weight[layer_idx], self.eps)
        qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        kc[:, :, t0:t1] = qk[:, nq:]
        vc[:, :, t0:t1] = qkv[:, nq + nkv:]
        q, k, v = qk[:, :nq], kc[:, :, :t1], vc[:, :, :t1]
        if T == 1:  # decode: three small batched matmuls beat the CPU flash kernel here
            scores = matmul(q.reshape(B, nkv, nq // nkv, hd), k.transpose(-1, -2), self.mm_dtype).float() + mask
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            out = matmul(probs, v, self.mm_dtype).view(B, nq, 1, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
        return linear(self.quant(out.transpose(1, 2).reshape(B, T, -1)), self.o_weight[layer_idx])

    def _moe(self, block, h: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        router, gate_up_proj, down_proj = self.mlp_weights[layer_idx]
        # the router exactly as HF computes it: softmax in fp32, top-k, optional renormalization
        router_logits = linear(h, router)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        out = grouped_experts(self.quant(h), idx, weights.to(h.dtype), gate_up_proj, down_proj,
                              block.experts.act_fn, quant=self.act_quant, packed=self.packed_experts[layer_idx])
        return out, idx
