"""MoE experts kernels: the training-side one (HF's grouped-matmul experts with cheaper gathers)
and the decoder's (``grouped_experts``: capacity-padded batched matmuls or grouped matmuls over the
token-expert pairs, whichever pays for the call's shape).

transformers runs the experts of Qwen3-MoE / Qwen2-MoE / Mixtral / OLMoE through a pluggable
"experts implementation" (default ``grouped_mm``): sort the token-expert pairs by expert, one
grouped matmul per projection, then restore the order. Its two row gathers use advanced
indexing (``x[idx]``), whose backward is an accumulating ``index_put_`` — on CPU much slower
than the ``index_add_`` behind ``index_select`` (``benchmarks/experts_kernel.py`` measures both). This module registers
the same maths with ``index_select`` gathers as the ``"stablerl_grouped_mm"`` implementation
and ``use_fast_experts`` switches a model to it; the routing weights are applied after the
order is restored, so no weight gather is needed at all.

Layouts other than HF's default (biases, transposed or non-gated experts, post-expert norms,
expert parallelism) fall through to HF's ``grouped_mm`` unchanged.

Under ``torch.compile`` (``train.compile``) the grouped matmuls run as custom ops the compiler
does not trace (``grouped_mm_op``): dynamo's fake kernel of ``torch._grouped_mm`` accepts bf16
inputs only, though the CPU kernel runs fp32, so tracing it fails at the first MoE layer. The ops
call the same ``F.grouped_mm``, forward and backward, so the numbers are the eager kernel's.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward

from stablerl.precision import linear, matmul, quantize_activations_fp8, quantize_activations_nvfp4

NAME = "stablerl_grouped_mm"


def _standard_layout(experts: nn.Module) -> bool:
    # transformers < 5.20 has no `has_post_expert_norm` (and no such norms): absent means False
    return (
        getattr(experts, "has_gate", False)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "is_transposed", True)
        and not getattr(experts, "has_post_expert_norm", False)
        and getattr(experts, "is_concatenated", False)
        and not getattr(experts, "_is_expert_parallel", True)
        and hasattr(F, "grouped_mm")
    )


@torch.library.custom_op("stablerl::grouped_mm", mutates_args=())
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm(x, w, offs=offs)`` (``x`` ``[P, K]``, ``w`` ``[E, K, N]``, ``offs`` the groups'
    cumulative row counts) as an op the compiler treats as opaque."""
    return F.grouped_mm(x, w, offs=offs)


@grouped_mm_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("stablerl::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The gradient of ``grouped_mm_op``'s ``w``: group e's ``x_e^T grad_e``, ``[E, K, N]``."""
    return F.grouped_mm(x.t(), grad, offs=offs)


@grouped_mm_weight_grad.register_fake
def _(x, grad, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    return grouped_mm_op(grad, w.transpose(-1, -2), offs), grouped_mm_weight_grad(x, grad, offs), None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # eager: torch's own op (and its autograd), bit for bit HF's; compiled: the opaque op
    return grouped_mm_op(x, w, offs) if torch.compiler.is_compiling() else F.grouped_mm(x, w, offs=offs)


def compilable(module: nn.Module) -> bool:
    """Whether ``torch.compile`` can trace ``module``'s experts: HF experts in a layout other than
    the standard one run HF's ``grouped_mm`` (traced, and refused in fp32), so they stay eager, as
    do experts under peft's LoRA (model.lora)."""
    from peft.tuners.lora import ParamWrapper

    if isinstance(module, ParamWrapper):  # LoRA on packed experts: a new parametrization per forward,
        return False  # which would invalidate the compiled code at every call
    is_experts = isinstance(getattr(module, "down_proj", None), nn.Parameter)  # a dense MLP's is a Linear
    return not is_experts or _standard_layout(module)


def grouped_mm_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    apply_gate,
) -> torch.Tensor:
    """sum_k w_k * expert_{e_k}(h) for every token, one grouped matmul per projection over the
    token-expert pairs (no padding). ``hidden_states`` ``[N, H]``, index/weights ``[N, k]``,
    ``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``; ``apply_gate`` maps the
    concatenated gate/up projection ``[P, 2I]`` to ``[P, I]`` (HF's ``_apply_gate``)."""
    N, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    _, perm = flat.sort(stable=True)  # pair p = token * k + j, in expert order
    offsets = torch.bincount(flat, minlength=gate_up_proj.shape[0]).cumsum(0).to(torch.int32)
    x = hidden_states.index_select(0, perm // k).to(gate_up_proj.dtype)
    h = apply_gate(_grouped_mm(x, gate_up_proj.transpose(1, 2), offsets))
    y = _grouped_mm(h, down_proj.transpose(1, 2), offsets)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    y = y.index_select(0, inverse).view(N, k, -1)
    # the k contributions of a token summed in a fixed order (no scatter-add), as HF does
    return (y * top_k_weights.to(y.dtype)[..., None]).sum(1).to(hidden_states.dtype)


def grouped_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"stablerl_grouped_mm"`` experts implementation: ``grouped_mm_experts`` on an HF
    experts module in the standard layout, HF's own ``grouped_mm`` on any other."""
    if not _standard_layout(self):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return grouped_mm_experts(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self._apply_gate
    )


ExpertsInterface.register(NAME, grouped_experts_forward)


def quantized_activations_experts(precision: str, quant):
    """The inference engine's experts for a precision that rounds activations (``quant``, per
    token: ``stablerl.precision``): the input of both projections rounded; inference only (no
    gradient path is needed)."""

    def forward(
        self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if not _standard_layout(self):
            return _quantized_experts_any_layout(self, hidden_states, top_k_index, top_k_weights, quant)
        return grouped_experts(
            quant(hidden_states),
            top_k_index,
            top_k_weights.to(hidden_states.dtype),
            self.gate_up_proj,
            self.down_proj,
            self.act_fn,
            quant=quant,
        )

    return forward


def _quantized_experts_any_layout(self: nn.Module, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, quant):
    """Experts in another HF layout (transposed, biased, gate/up interleaved: gpt-oss), one expert
    at a time through the module's own ``_apply_gate``, the input of both projections rounded."""
    if getattr(self, "has_post_expert_norm", False) or not getattr(self, "has_gate", False):
        raise ValueError(f"activation-quantized experts support gated experts only, not {type(self).__name__}")
    transposed, biased = bool(getattr(self, "is_transposed", False)), bool(getattr(self, "has_bias", False))
    out = torch.zeros_like(h)
    for e in idx.unique().tolist():
        tokens, slot = torch.where(idx == e)
        w_gu, w_down = self.gate_up_proj[e], self.down_proj[e]
        gate_up = quant(h[tokens]) @ (w_gu if transposed else w_gu.T).to(h.dtype)
        if biased:
            gate_up = gate_up + self.gate_up_proj_bias[e].to(h.dtype)
        y = quant(self._apply_gate(gate_up)) @ (w_down if transposed else w_down.T).to(h.dtype)
        if biased:
            y = y + self.down_proj_bias[e].to(h.dtype)
        out.index_add_(0, tokens, y * weights[tokens, slot, None].to(h.dtype))
    return out


W8A8_NAME, W4A4_NAME = "stablerl_fp8_w8a8", "stablerl_nvfp4_w4a4"
ExpertsInterface.register(W8A8_NAME, quantized_activations_experts("fp8_w8a8", quantize_activations_fp8))
ExpertsInterface.register(W4A4_NAME, quantized_activations_experts("nvfp4_w4a4", quantize_activations_nvfp4))
# the experts implementation of each precision that quantizes activations
ACTIVATION_EXPERTS = {"fp8_w8a8": W8A8_NAME, "nvfp4_w4a4": W4A4_NAME}


def grouped_experts(
    h,
    idx,
    weights,
    gate_up_proj,
    down_proj,
    act_fn,
    quant=None,
    layout: str | None = None,
    packed: tuple[list, list] | None = None,
) -> torch.Tensor:
    """sum_k w_k * down_e(act(gate_e(h)) * up_e(h)) over each token's experts e = idx[:, k].

    ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` are in HF's layout.

    Three layouts of the same sum; of the first two, the faster is chosen per call (``layout=None``;
    ``pick_layout``):

    - ``"padded"``: token-expert pairs sorted by expert into a zero-padded [E, C, H] block (C = the
      busiest expert's load), both projections one batched matmul each. On CPU this beats per-
      expert matmuls at small sizes, but it computes E * C rows for N * k pairs: a trained
      router's uneven loads make that several times the pairs' arithmetic at decode.
    - ``"pairs"``: one ``F.grouped_mm`` per projection over the pairs themselves (no padding).
    - ``"dense"``: every expert on every token (E / k times the pairs' arithmetic), the results
      combined with the routing weights (zero for the experts a token did not pick). No sort,
      gather or data-dependent shape: what a compiled, static-shape decode step holds
      (``rollout.compile``); never picked automatically.

    Tokens go in and results come out by gathers (index_select), not a scatter-add, so each
    token's k contributions are summed in a fixed order, as HF's grouped_mm path does. Used for
    decoding; training uses ``grouped_experts_forward`` (its backward measured faster on CPU).
    ``quant`` (W8A8 engines) rounds the down projection's input per row; the caller quantizes
    ``h``. The projections multiply in their weights' dtype (the fast decoder passes them in its
    ``matmul_dtype``), the products rounded to ``h``'s. ``packed``: each expert's two matrices
    prepacked for oneDNN (``stablerl.precision.pack_weight``), which the pairs layout then
    multiplies expert by expert instead of through ``F.grouped_mm``.
    """
    N, k = idx.shape
    E, two_i, H = gate_up_proj.shape
    if layout == "dense":
        return _dense_experts(h, idx, weights, gate_up_proj, down_proj, act_fn, quant)
    flat = idx.reshape(-1)
    expert, order = flat.sort(stable=True)
    # the pairs per expert (bincount's output length would depend on the data: a compiled step's
    # graph could not hold it)
    counts = torch.zeros(E, dtype=torch.long, device=h.device).index_add_(0, flat, torch.ones_like(flat))
    # the padded block's capacity, read once (a host sync); never for the pairs a compiled step asks for
    C = None if layout == "pairs" else int(counts.max())
    layout = layout or pick_layout(N * k, E * C, H, two_i // 2, gate_up_proj.dtype, h.device)
    if layout == "pairs":
        return _pairs_experts(h, order, counts, weights, gate_up_proj, down_proj, act_fn, quant, packed)
    if layout != "padded":
        raise ValueError(f"layout must be 'padded', 'pairs', 'dense' or None (pick), not {layout!r}")
    return _padded_experts(h, expert, order, counts, C, weights, gate_up_proj, down_proj, act_fn, quant)


def _padded_experts(h, expert, order, counts, C: int, weights, gate_up_proj, down_proj, act_fn, quant) -> torch.Tensor:
    """The padded layout: pairs sorted by expert into a zero-padded [E, C, H] block."""
    N, k = weights.shape
    E, _, H = gate_up_proj.shape
    # slot[p]: the row of the [E * C] block that holds pair p = token * k + j
    slot = torch.empty_like(order)
    slot[order] = expert * C + (torch.arange(N * k, device=h.device) - (counts.cumsum(0) - counts)[expert])
    # src[row]: the token each block row reads; padding rows read an appended zero row (index N)
    src = torch.full((E * C,), N, dtype=torch.long, device=h.device)
    src[slot] = torch.arange(N * k, device=h.device) // k
    x = torch.cat([h, h.new_zeros(1, H)]).index_select(0, src).view(E, C, H)
    gate, up = matmul(x, gate_up_proj.transpose(1, 2), gate_up_proj.dtype).chunk(2, dim=-1)
    inner = act_fn(gate) * up
    if quant is not None:
        inner = quant(inner)
    y = matmul(inner, down_proj.transpose(1, 2), down_proj.dtype).view(E * C, H)
    return (y.index_select(0, slot).view(N, k, H) * weights[..., None]).sum(1)


def _pairs_experts(h, order, counts, weights, gate_up_proj, down_proj, act_fn, quant, packed=None) -> torch.Tensor:
    # the "pairs" layout of grouped_experts: order = the pairs sorted by expert, counts per expert
    N, k = weights.shape
    x = h.index_select(0, order // k)

    def expert(x, gate_up, down):  # x @ gate_up -> act(gate) * up (-> quant) @ down, in h's dtype
        gate, up = gate_up(x).chunk(2, dim=-1)
        inner = act_fn(gate) * up
        return down(inner if quant is None else quant(inner))

    if packed is not None:  # expert by expert, on the prepacked matrices
        pieces, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                pieces.append(
                    expert(
                        x[start : start + n], partial(linear, weight=packed[0][e]), partial(linear, weight=packed[1][e])
                    )
                )
                start += n
        y = torch.cat(pieces)
    else:
        offsets = counts.cumsum(0).to(torch.int32)
        y = expert(
            x,
            lambda z: _grouped_mm(z.to(gate_up_proj.dtype), gate_up_proj.transpose(1, 2), offsets).to(h.dtype),
            lambda z: _grouped_mm(z.to(down_proj.dtype), down_proj.transpose(1, 2), offsets).to(h.dtype),
        )
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return (y.index_select(0, inverse).view(N, k, -1) * weights[..., None]).sum(1)


def _dense_experts(h, idx, weights, gate_up_proj, down_proj, act_fn, quant) -> torch.Tensor:
    # the "dense" layout of grouped_experts: all E experts' gate/up projections as one matrix
    # multiply, the down projections one batched multiply, then each token's sum over experts with
    # its routing weights scattered into [N, E] (exact zeros where it picked no expert)
    N, k = idx.shape
    E, two_i, H = gate_up_proj.shape
    gate, up = linear(h, gate_up_proj.reshape(E * two_i, H)).view(N, E, two_i).transpose(0, 1).chunk(2, dim=-1)
    inner = act_fn(gate) * up  # [E, N, I]
    if quant is not None:
        inner = quant(inner)
    y = matmul(inner, down_proj.transpose(1, 2), down_proj.dtype)  # [E, N, H]
    routing = torch.zeros(N, E, dtype=weights.dtype, device=h.device).scatter_(1, idx, weights)
    # weighted, then summed over experts in h's dtype, as the other layouts sum over the k picks
    # (the zeros add nothing, so a token's sum is theirs up to the order of its k terms)
    return (y * routing.t()[..., None]).sum(0)


# experts from this size up (hidden x width) are bound by arithmetic, not per-op overhead, on CPU
LARGE_EXPERTS = 512 * 512


def _grouped_mm_fits(hidden: int, width: int, dtype: torch.dtype) -> bool:
    # F.grouped_mm needs the experts' rows in whole 16-byte multiples
    size = torch.finfo(dtype).bits // 8
    return (hidden * size) % 16 == 0 and (width * size) % 16 == 0


def static_layout(experts: int, top_k: int, hidden: int, width: int, dtype: torch.dtype, decode: bool = True) -> str:
    """The experts' layout of the compiled, static-shape decode (``rollout.compile``), where the
    padded block cannot go (its capacity depends on the data): for a decode step on small experts,
    the dense one while it costs at most 4x the pairs' arithmetic (E <= 4k; there one matrix
    multiply beats grouped matmuls' per-expert loop: docs/notebook/performance-log.md); for the prefill (tens of
    rows per expert), above 4k and from experts of 512 x 512 up (where arithmetic, not overhead,
    bounds the decode: ``pairs_can_pay``'s line), the pairs through ``F.grouped_mm``, where its rows
    are whole 16-byte multiples (dense otherwise)."""
    small = hidden * width < LARGE_EXPERTS
    aligned = _grouped_mm_fits(hidden, width, dtype)
    return "dense" if (decode and experts <= 4 * top_k and small) or not aligned else "pairs"


def pick_layout(
    pairs: int, padded_rows: int, hidden: int, width: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> str:
    """``grouped_experts``'s layout for one call, by what was measured on CPU
    (``benchmarks/decode_experts.py``, docs/notebook/performance-log.md): the pairs layout once padding at
    least doubles the rows on experts where it can pay (``pairs_can_pay``)."""
    return "pairs" if padded_rows >= 2 * pairs and pairs_can_pay(hidden, width, dtype, device) else "padded"


def pairs_can_pay(hidden: int, width: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether experts of this shape may run in the pairs layout: at least 512 x 512 (there it
    beats the padded block under uneven loads, fp32 and bf16; docs/performance.md). Smaller
    experts keep the padded block: in bf16 it is faster there, in fp32 the pairs gain little on
    the experts alone, and keeping it keeps every small model's engine numbers (the default
    run's, the tests', the experiments') unchanged by the layout choice. ``F.grouped_mm`` needs rows of whole
    16-byte multiples; and only the CPU was measured (other devices keep the padded block)."""
    return (
        torch.device(device).type == "cpu"
        and hidden * width >= LARGE_EXPERTS
        and _grouped_mm_fits(hidden, width, dtype)
    )


def use_fast_experts(model: nn.Module, name: str = NAME) -> nn.Module:
    """Switch a transformers MoE model's experts to ``stablerl_grouped_mm`` (or ``name``) in
    place; models without pluggable experts (dense ones, other architectures) are unchanged."""
    if getattr(model.config, "_experts_implementation", None) is not None and hasattr(
        model, "set_experts_implementation"
    ):
        model.set_experts_implementation(name)
    return model
