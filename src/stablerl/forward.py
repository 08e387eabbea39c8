"""The training engine's forward over rollouts: log-probs of the sampled response tokens.

One function serves every place the trainer needs pi: ``old_logp`` (recording the training
routes for R2), ``logp`` with gradient, and replaying routes (R2: the recorded training routes,
R3: the rollout engine's routes).

``enable_activation_checkpointing`` (``train.activation_checkpointing``) recomputes each decoder
layer's forward during the backward instead of keeping its activations.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache, partial

import torch
from torch import nn

from torch.utils.checkpoint import checkpoint

from stablerl.models import decoder_layers, position_ids_from_mask
from stablerl.rollout.base import RolloutBatch
from stablerl.routing import active_replay, capture_routes, replay_router_hooks, replay_routes


@lru_cache(maxsize=None)
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
) -> dict[str, torch.Tensor]:
    """Log pi(y_t | x, y_<t) of every response token, ``[B, R]`` (0 at padding).

    The logits are divided by ``temperature`` so that pi is compared with the distribution the
    rollout engine sampled from (at temperature 1 this is the model's own distribution).
    ``replay`` (``[B, P+R, layers, top_k]``) fixes the experts; ``capture`` returns the routes
    this forward used under ``"routes"``; ``with_entropy`` adds the per-token entropy of pi.
    """
    P, R = batch.prompt_width, batch.response_ids.shape[1]
    # only positions P-1 .. P+R-2 predict response tokens: skip the LM head everywhere else
    keep = {"logits_to_keep": R + 1} if _accepts_logits_to_keep(model) else {}
    capture_ctx = capture_routes(model) if capture else nullcontext()
    replay_ctx = replay_routes(model, replay) if replay is not None else nullcontext()
    with replay_ctx, capture_ctx as cap:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False, **keep)
    # position t predicts token t+1: the logits for response token j sit at position P + j - 1
    logits = out.logits[:, -(R + 1):-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    mask = batch.response_mask
    result = {"logp": torch.where(mask, logp, torch.zeros_like(logp))}
    if with_entropy:  # a diagnostic: kept out of the autograd graph
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            result["entropy"] = torch.where(mask, entropy, torch.zeros_like(entropy))
    if capture:
        result["routes"] = cap.routes
    return result


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


def _checkpointed(forward, model: nn.Module, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=partial(_recompute_contexts, model), **kwargs)


def _recompute_contexts(model: nn.Module):
    """(context of the first forward, context of the recompute): the recompute replays what the
    forward replayed."""
    routes = active_replay(model)
    return nullcontext(), (replay_router_hooks(model, routes) if routes is not None else nullcontext())
