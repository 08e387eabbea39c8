"""The training engine's forward over rollouts: log-probs of the sampled response tokens.

One function serves every place the trainer needs pi: ``old_logp`` (recording the training
routes for R2), ``logp`` with gradient, and replaying routes (R2: the recorded training routes,
R3: the rollout engine's routes).

``enable_activation_checkpointing`` (``train.activation_checkpointing``) recomputes each decoder
layer's forward during the backward instead of keeping its activations.

``compile_router_free_parts`` (``train.compile``) compiles each decoder layer's parts that hold
no MoE router; routers, where routing replay and route capture hook in, stay eager.

``packed=True`` (``batch.packing``) runs the same forward without padding: the real tokens of every
row are laid end to end in one sequence, positions restart at 0 for each row and attention stays
inside each row (HF's packed-sequence masks, detected from the restarting position ids), routes
are replayed and recorded per packed position. The log-probs equal the padded forward's up to
float round-off.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from stablerl.models import decoder_layers, is_moe, position_ids_from_mask
from stablerl.moe import compilable
from stablerl.rollout.base import RolloutBatch
from stablerl.routing import NO_ROUTE, active_replay, capture_routes, moe_routers, replay_router_hooks, replay_routes


@cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in _forward_params(type(model))


def response_logp(
    model: nn.Module,
    batch: RolloutBatch,
    *,
    replay: torch.Tensor | None = None,
    capture: bool = False,
    temperature: float = 1.0,
    with_entropy: bool = False,
    packed: bool = False,
) -> dict[str, torch.Tensor]:
    """Log pi(y_t | x, y_<t) of every response token, ``[B, R]`` (0 at padding).

    The logits are divided by ``temperature`` so that pi is compared with the distribution the
    rollout engine sampled from (at temperature 1 this is the model's own distribution).
    ``replay`` (``[B, P+R, layers, top_k]``) fixes the experts; ``capture`` returns the routes
    this forward used under ``"routes"`` (``[B, P+R, layers, top_k]`` either way); ``with_entropy``
    adds the per-token entropy of pi; ``packed`` runs the forward without padding (module
    docstring).
    """
    mask = batch.response_mask
    layout = pack_layout(batch) if packed else None
    if layout is not None and replay is not None:
        replay = layout.pack(replay)
    capture_ctx = capture_routes(model) if capture else nullcontext()
    replay_ctx = replay_routes(model, replay) if replay is not None else nullcontext()
    with replay_ctx, capture_ctx as cap:
        if layout is None:
            logits = _padded_logits(model, batch)
        else:
            logits = _packed_logits(model, batch, layout)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    if layout is None:
        logp = logp_all.gather(-1, batch.response_ids[..., None]).squeeze(-1)
        logp = torch.where(mask, logp, torch.zeros_like(logp))
    else:  # one row per response token, in the mask's row-major order
        logp = torch.zeros(mask.shape, dtype=logp_all.dtype, device=logp_all.device).masked_scatter(
            mask, logp_all.gather(-1, batch.response_ids[mask][:, None]).squeeze(-1)
        )
    result = {"logp": logp}
    if with_entropy:  # a diagnostic: kept out of the autograd graph
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            if layout is None:
                result["entropy"] = torch.where(mask, entropy, torch.zeros_like(entropy))
            else:
                result["entropy"] = torch.zeros(mask.shape, dtype=entropy.dtype, device=entropy.device).masked_scatter(
                    mask, entropy
                )
    if capture:
        result["routes"] = cap.routes if layout is None else layout.unpack(cap.routes, NO_ROUTE)
    return result


def _padded_logits(model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """``[B, R, V]``: the logits that predict each response column."""
    R = batch.response_ids.shape[1]
    # only positions P-1 .. P+R-2 predict response tokens: skip the LM head everywhere else
    keep = {"logits_to_keep": R + 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
        use_cache=False,
        **keep,
    )
    # position t predicts token t+1: the logits for response token j sit at position P + j - 1
    return out.logits[:, -(R + 1) : -1]


def _packed_logits(model: nn.Module, batch: RolloutBatch, layout: PackLayout) -> torch.Tensor:
    """``[n, V]``: the logits that predict each response token (``response_mask``'s row-major
    order), from one forward over the packed sequence."""
    use_packed_attention(model)
    keep = {"logits_to_keep": layout.predicts} if _accepts_logits_to_keep(model) else {}
    # HF passes the sequence boundaries (its flash-attention varlen keywords) down to every
    # attention call; attention_mask=None and restarting positions keep any other path exact too
    out = model(
        input_ids=layout.pack(batch.input_ids),
        position_ids=layout.position_ids,
        attention_mask=None,
        use_cache=False,
        cu_seq_lens_q=layout.cu_seq_lens,
        cu_seq_lens_k=layout.cu_seq_lens,
        max_length_q=layout.max_length,
        max_length_k=layout.max_length,
        **keep,
    )
    logits = out.logits[0]
    return logits if keep else logits[layout.predicts]


PACKED_ATTENTION = "stablerl_packed_sdpa"


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
):
    """HF's sdpa attention, and for a packed forward (``cu_seq_lens_q`` given) causal sdpa over
    each sequence on its own: a dense mask over the packed length would cost T^2 where the
    sequences need the sum of their squared lengths (CPU torch has no varlen kernel)."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        kwargs.pop(name, None)
    return _per_sequence_sdpa(module, query, key, value, cu_seq_lens_q, *args, **kwargs), None


@torch.compiler.disable  # a loop over data-dependent bounds: under train.compile it stays eager
def _per_sequence_sdpa(module, query, key, value, cu_seq_lens_q, *args, **kwargs) -> torch.Tensor:
    bounds = cu_seq_lens_q.tolist()
    outs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, *args, **kwargs)[0]
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(outs, dim=1)


def use_packed_attention(model: nn.Module) -> None:
    """Switch ``model`` (once, idempotent) to :func:`packed_sdpa_attention`, which is HF's sdpa
    for every unpacked forward."""
    config = model.config
    if config._attn_implementation == PACKED_ATTENTION:
        return
    if config._attn_implementation != "sdpa":
        raise ValueError(
            f"batch.packing needs a model with sdpa attention; this one uses {config._attn_implementation!r}"
        )
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    config._attn_implementation = PACKED_ATTENTION


@dataclass(frozen=True)
class PackLayout:
    """Where the real tokens of a padded ``[B, W]`` batch sit in one packed ``[1, T]`` sequence."""

    real: torch.Tensor  # [T]: flat indices (row * W + column) of the real tokens, row by row
    shape: tuple[int, int]  # (B, W)
    position_ids: torch.Tensor  # [1, T]: 0 at each row's first real token
    predicts: torch.Tensor  # [n]: packed positions whose logits predict a response token
    cu_seq_lens: torch.Tensor  # [B + 1]: where each row's tokens start in the packed sequence, then T
    max_length: int  # the longest row

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, W, ...]`` -> ``[1, T, ...]``: the real positions, padding dropped."""
        return t.flatten(0, 1)[self.real.to(t.device)][None]

    def unpack(self, t: torch.Tensor, fill) -> torch.Tensor:
        """``[1, T, ...]`` -> ``[B, W, ...]``, ``fill`` at padding."""
        out = t.new_full((self.shape[0] * self.shape[1], *t.shape[2:]), fill)
        out[self.real.to(t.device)] = t[0]
        return out.unflatten(0, self.shape)


def pack_layout(batch: RolloutBatch) -> PackLayout:
    """The packed layout of ``batch``: every row's real tokens (the prompt without its left padding,
    the response without its right padding: contiguous) end to end."""
    am = batch.attention_mask.bool()
    B, W = am.shape
    lengths = am.sum(-1)
    real = am.flatten().nonzero().squeeze(-1)
    starts = torch.cumsum(lengths, 0) - lengths
    position_ids = torch.arange(len(real), device=real.device) - torch.repeat_interleave(starts, lengths)
    # the packed index of every flat position, then of each response token; its logits sit one earlier
    where = torch.full((B * W,), -1, dtype=torch.long, device=real.device)
    where[real] = torch.arange(len(real), device=real.device)
    cols = batch.prompt_width + torch.arange(batch.response_mask.shape[1], device=real.device)
    flat = (torch.arange(B, device=real.device)[:, None] * W + cols[None, :])[batch.response_mask]
    predicts = where[flat] - 1
    same_row = position_ids[1:] > 0
    gaps = bool(((real[1:] - real[:-1])[same_row] != 1).any())
    if gaps or bool((where[flat] <= 0).any()) or bool((position_ids[where[flat]] == 0).any()):
        raise ValueError(
            "packing needs each row's real tokens to be contiguous (a left-padded prompt followed by "
            "a right-padded response) and every response token to be a real token"
        )
    cu_seq_lens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    return PackLayout(real, (B, W), position_ids[None], predicts, cu_seq_lens, int(lengths.max()))


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder layer of ``model`` (in place): a forward with gradients keeps
    only each layer's input and recomputes the layer during the backward (PyTorch's
    non-reentrant ``torch.utils.checkpoint``). Forwards without gradients are unchanged.

    Routing replay must hold in the recompute too, or the backward would differentiate a layer
    that routed its tokens live while the forward replayed them — a different function, and
    silently wrong gradients. The replay context has closed by the time the backward runs, so
    each checkpoint takes the routes open at its forward (``routing.active_replay``) and replays
    them again around its recompute. The wrapper sits inside the layer's ``__call__``, so FSDP's
    per-layer hooks stay outside it (the order torchtitan uses)."""
    for layer in decoder_layers(model):
        if "forward" in layer.__dict__:  # already checkpointed
            continue
        layer.forward = partial(_checkpointed, layer.forward, model)
    return model


def compile_router_free_parts(model: nn.Module) -> list[str]:
    """``torch.compile`` (in place, dynamic shapes) every part of each decoder layer that holds
    no MoE router — attention, norms, the experts, a dense MLP — and return their names.

    What stays eager, and why: the routers and the modules above them (the MoE block, the layer),
    because routing replay and route capture install hooks on the routers for one forward at a
    time (``stablerl.routing``), which a compiled graph would not see change; the layer's own call,
    where FSDP's hooks and the activation-checkpointing wrapper live; and experts the compiler
    cannot trace (``moe.compilable``). The per-sequence loop of a packed forward's attention runs
    eager inside the compiled attention (a graph break). A compiled part computes the same
    function in another operation order (fused elementwise kernels): results equal eager up to
    float round-off. Shapes are symbolic, so micro-batches of new lengths reuse the graphs."""
    routers = {id(r) for r in moe_routers(model)} if is_moe(model) else set()
    compiled: list[str] = []

    def holds_router(module: nn.Module) -> bool:
        return any(id(m) in routers for m in module.modules())

    def visit(name: str, module: nn.Module) -> None:
        if not holds_router(module):
            if compilable(module):
                module.compile(dynamic=True)
                compiled.append(name)
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}", child)

    for i, layer in enumerate(decoder_layers(model)):
        for child_name, child in layer.named_children():
            visit(f"layers.{i}.{child_name}", child)
    return compiled


def _checkpointed(forward, model: nn.Module, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=partial(_recompute_contexts, model), **kwargs)


def _recompute_contexts(model: nn.Module):
    """(context of the first forward, context of the recompute): the recompute replays what the
    forward replayed."""
    routes = active_replay(model)
    return nullcontext(), (replay_router_hooks(model, routes) if routes is not None else nullcontext())


def micro_batches(
    rows: torch.Tensor,
    response_lengths: torch.Tensor,
    prompt_width: int,
    max_rows: int,
    max_tokens: int | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``rows`` cut, in order, into micro-batches of at most ``max_rows`` rows and, with
    ``max_tokens``, at most that many tokens in the padded forward a micro-batch runs (its rows x
    (``prompt_width`` + its longest response); ``RolloutBatch.trim``) or, given ``prompt_lengths``
    (packed forwards, ``batch.packing``), in its real tokens (the sum of its prompts' and responses'
    lengths). A row that alone exceeds ``max_tokens`` is a micro-batch of its own. The cut never
    changes the update: the loss's normalizer is the mini-batch's and gradients accumulate
    (objectives.py)."""
    if max_tokens is None:
        return list(rows.split(max_rows))
    pieces, current, longest, total = [], [], 0, 0
    for r in rows.tolist():
        if prompt_lengths is None:  # padded: every row as wide as the longest
            width = prompt_width + int(response_lengths[r])
            size = (len(current) + 1) * max(longest, width)
        else:  # packed: the real tokens only
            width = int(prompt_lengths[r]) + int(response_lengths[r])
            size = total + width
        if current and (len(current) == max_rows or size > max_tokens):
            pieces.append(torch.tensor(current, dtype=rows.dtype))
            current, longest, total = [], 0, 0
        current.append(r)
        longest, total = max(longest, width), total + width
    if current:
        pieces.append(torch.tensor(current, dtype=rows.dtype))
    return pieces
