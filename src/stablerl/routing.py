"""Capture and replay of MoE expert indices for HF ``transformers`` models (docs/formulation.md s.5).

Routes are one integer tensor ``[B, T, num_moe_layers, top_k]`` (int16) aligned with the
``input_ids`` of a forward pass; ``-1`` marks a position without a route (padding, or a token an
engine could not report), and such positions fall back to live routing on replay.

Routing Replay fixes *which* experts a token uses, not *how much* it trusts them: under replay
the routing weights are recomputed from the current router logits by the family's own scoring at
the replayed indices (e.g. softmax, gather, renormalise), so the router keeps its gradient.

- **R2** (vanilla routing replay) replays the routes the training engine chose while computing
  ``old_logp``: it removes the staleness part of routing drift and changes nothing on the first
  mini-batch of a step.
- **R3** (rollout routing replay) replays the routes the inference engine chose while sampling:
  it removes the discrepancy part too, but biases even the first mini-batch.

The paper (s.7): on-policy, R3 brought no gain; off-policy, R2 was best with few mini-batches
per step and R3 with many.

Implementation: every supported family (``stablerl.families.FAMILIES``) has a router module
returning ``(router_logits, routing_weights, expert_indices)``; capture and replay are forward
hooks on it, and replay recomputes the weights with the family's own scoring.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from stablerl.families import family_of, softmax_weights, unsupported_error
from stablerl.families import replay_weights as family_weights

ROUTE_DTYPE = torch.int16
NO_ROUTE = -1

_ROUTER_CACHE: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The router modules of ``model`` in layer order; a clear error for anything unsupported.

    Cached per model (a module walk on every hooked forward is measurable at tiny-model speeds)."""
    cached = _ROUTER_CACHE.get(model)
    if cached is not None:
        return cached
    config = getattr(model, "config", None)
    family = family_of(config)
    if family is None:
        raise ValueError(unsupported_error(config))
    routers = [m for m in model.modules() if type(m).__name__ == family.router]
    if not routers:
        raise ValueError(f"{type(model).__name__} ({config.model_type}) has no MoE layers ({family.router} modules)")
    _ROUTER_CACHE[model] = routers
    return routers


def moe_layer_indices(model: nn.Module) -> list[int]:
    """The decoder-layer index of each MoE layer, in route order (dense layers have no routes)."""
    routers = {id(r) for r in moe_routers(model)}
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return [i for i, layer in enumerate(layers) if any(id(m) in routers for m in layer.modules())]


def route_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_moe_layers, top_k, num_experts) of ``model``."""
    routers = moe_routers(model)
    return len(routers), int(routers[0].top_k), int(routers[0].num_experts)


def _input_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise ValueError("routing hooks need input_ids or inputs_embeds to align routes with positions")
    return int(ids.shape[0]), int(ids.shape[1])


class RouteCapture:
    """Holds the routes recorded by :func:`capture_routes`: ``routes`` is the last forward's."""

    def __init__(self) -> None:
        self.all_routes: list[torch.Tensor] = []

    @property
    def routes(self) -> torch.Tensor:
        if not self.all_routes:
            raise RuntimeError("no forward pass ran inside capture_routes()")
        return self.all_routes[-1]


@contextmanager
def capture_routes(model: nn.Module) -> Iterator[RouteCapture]:
    """After a forward inside this context, ``.routes`` is ``[B, T, num_moe_layers, top_k]``.

    Positions where the forward's 2-D ``attention_mask`` is 0 (padding) are marked -1. Every
    forward inside the context is kept in ``.all_routes`` (e.g. one per generation step).
    """
    routers = moe_routers(model)
    cap = RouteCapture()
    state: dict = {}

    def pre_hook(_module, args, kwargs):
        B, T = _input_shape(args, kwargs)
        am = kwargs.get("attention_mask")
        state.update(
            shape=(B, T), layers=[], pad=(am == 0) if am is not None and am.dim() == 2 and am.shape == (B, T) else None
        )

    def router_hook(_module, _args, output):
        B, T = state["shape"]
        indices = output[2]
        if indices.shape[0] != B * T:
            raise RuntimeError(f"router saw {indices.shape[0]} tokens for an input of shape [{B}, {T}]")
        state["layers"].append(indices.reshape(B, T, -1).to(ROUTE_DTYPE))

    def post_hook(_module, _args, _output):
        routes = torch.stack(state["layers"], dim=2)
        if state["pad"] is not None:
            routes = routes.masked_fill(state["pad"][:, :, None, None], NO_ROUTE)
        cap.all_routes.append(routes)

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True), model.register_forward_hook(post_hook)]
    handles += [r.register_forward_hook(router_hook) for r in routers]  # after any replay hook
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def validate_routes(model: nn.Module, routes: torch.Tensor) -> None:
    layers, top_k, num_experts = route_shape(model)
    if not isinstance(routes, torch.Tensor) or routes.is_floating_point() or routes.dim() != 4:
        raise ValueError("routes must be an integer tensor [B, T, num_moe_layers, top_k]")
    if routes.shape[2:] != (layers, top_k):
        raise ValueError(f"routes have {tuple(routes.shape[2:])} (layers, top_k); the model has ({layers}, {top_k})")
    if bool(((routes < NO_ROUTE) | (routes >= num_experts)).any()):
        raise ValueError(f"route indices must be -1 (no route) or in [0, {num_experts})")
    missing = routes < 0
    if bool((missing.any(-1) != missing.all(-1)).any()):
        raise ValueError("a position must have all of its top_k experts or none (-1) in a layer")


def replay_weights(
    router_logits: torch.Tensor, indices: torch.Tensor, normalize: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Softmax routing weights over fixed experts, recomputed from live logits so the router has a
    gradient (``stablerl.families.softmax_weights``; every family's scoring: ``family_weights``)."""
    return softmax_weights(router_logits, indices, normalize).to(dtype)


@contextmanager
def replay_routes(model: nn.Module, routes: torch.Tensor) -> Iterator[None]:
    """Every forward inside this context uses ``routes`` ``[B, T, layers, top_k]`` as its experts.

    The forward's input must have shape ``[B, T]`` (a mismatch is a ValueError, never a silent
    misalignment). Positions whose route is -1 use the model's own top-k. A
    :func:`capture_routes` inside or outside this context records the replayed routes. While the
    context is open, :func:`active_replay` returns ``routes``: activation checkpointing reads it
    to replay the same routes when it recomputes a layer during the backward, after this context
    has closed (``forward.enable_activation_checkpointing``).
    """
    validate_routes(model, routes)
    routes = routes.to(torch.long)

    def pre_hook(_module, args, kwargs):
        shape = _input_shape(args, kwargs)
        if shape != tuple(routes.shape[:2]):
            raise ValueError(
                f"replayed routes are for inputs of shape {tuple(routes.shape[:2])}, the forward got {shape}"
            )

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    stack = model.__dict__.setdefault("_stablerl_replay", [])
    stack.append(routes)
    try:
        with replay_router_hooks(model, routes):
            yield
    finally:
        stack.pop()
        handle.remove()


def active_replay(model: nn.Module) -> torch.Tensor | None:
    """The routes the innermost open :func:`replay_routes` of ``model`` replays, or None."""
    stack = model.__dict__.get("_stablerl_replay")
    return stack[-1] if stack else None


@contextmanager
def replay_router_hooks(model: nn.Module, routes: torch.Tensor) -> Iterator[None]:
    """The routers of ``model`` return ``routes`` (already validated, ``[B, T, layers, top_k]``)
    as their experts: the part of :func:`replay_routes` that also serves a layer's recompute,
    where the model-level input check does not run."""
    routers = moe_routers(model)
    layer_of = {id(r): i for i, r in enumerate(routers)}
    family = family_of(model.config)

    def router_hook(module, _args, output):
        logits, live_weights, live_indices = output
        idx = routes[:, :, layer_of[id(module)]].reshape(-1, routes.shape[-1]).to(live_indices.device)
        missing = idx[:, :1] < 0
        idx = torch.where(missing, live_indices, idx)
        weights = family_weights(family, module, logits, idx, live_weights.dtype)
        return logits, weights, idx

    # prepend: replay rewrites the router output before any capture hook reads it
    handles = [r.register_forward_hook(router_hook, prepend=True) for r in routers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
