"""The routing replay decision: what ``train.routing_replay`` means for one run and every forward
of its training steps (docs/formulation.md s.5). Nothing else decodes the mode.

The mechanism (hooks that capture and replay expert indices) is routing.py's; this module only
decides which routes each forward replays and records:

- **R2** replays the routes the training engine chose while computing ``old_logp``: it removes
  the staleness part of routing drift and changes nothing on-policy.
- **R3** replays the routes the inference engine chose while sampling: it removes the
  discrepancy part too, and biases even the first mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # config validation builds a plan: keep torch out of that light import
    import torch

Mode = Literal["none", "R2", "R3"]


@dataclass(frozen=True)
class Forward:
    """One training forward's routing: ``replay`` ``"old"`` (the training routes recorded in the
    pi_old pass: R2) or ``"rollout"`` (the inference engine's: R3) or None (route live);
    ``capture`` records this forward's live routes for a diagnostic: ``"train_infer"`` (they are
    pi_old's routes, compared with the rollout's) or ``"stale"`` (current routes, compared with
    pi_old's)."""

    replay: Literal["old", "rollout"] | None = None
    capture: Literal["train_infer", "stale"] | None = None

    def routes(
        self, old_routes: torch.Tensor | None, rows: torch.Tensor, rollout_routes: torch.Tensor | None, width: int
    ) -> torch.Tensor | None:
        """The routes this forward replays over rows ``rows`` of the rank's batch, trimmed to
        ``width`` positions: pi_old's training routes (R2), the rollout's (R3, already the part's
        own rows), or none."""
        if self.replay == "old":
            return None if old_routes is None else old_routes[rows][:, :width]
        return rollout_routes if self.replay == "rollout" else None


@dataclass(frozen=True)
class RoutingPlan:
    """What ``train.routing_replay`` means for every forward of one training step.

    A step is: (N > 1) one no-grad pass for pi_old, then N mini-batches, one gradient forward
    each. With N = 1 there is no pi_old pass: pi_old is ``sg[pi_theta]`` of the gradient forward.

    - none: every forward routes live.
    - R2 replays pi_old's training routes, so it needs the pi_old pass; with N = 1 the gradient
      forward *is* pi_old's and there is nothing to replay (it changes nothing on-policy).
    - R3 replays the rollout's routes in every forward, the pi_old pass included (under R3 pi_old
      is the training engine's policy on the inference engine's routes).
    - With the bypass (``loss.proximal=rollout``) there is no pi_old pass at all: pi_old is mu.
    """

    mode: Mode
    moe: bool
    minibatches: int
    bypass: bool = False  # loss.proximal=rollout: pi_old := mu, never recomputed (no R2 with it)

    def __post_init__(self) -> None:
        if self.bypass and self.mode == "R2":
            raise ValueError(
                "loss.proximal=rollout (bypass) with train.routing_replay=R2: R2 replays the routes of "
                "the recomputed pi_old, which the bypass skips; use loss.proximal=recompute, or R3"
            )

    @classmethod
    def of(cls, cfg, moe: bool) -> RoutingPlan:
        """The plan of a run config (``train.routing_replay``, N, ``loss.proximal``)."""
        return cls(cfg.train.routing_replay, moe, cfg.batch.minibatches_per_step, bypass=cfg.loss.proximal == "rollout")

    @property
    def replays(self) -> bool:
        """Whether any forward of a step replays routes (a mode that does nothing here does not)."""
        return any(f is not None and f.replay for f in [self.old_pass(), *map(self.minibatch, range(self.minibatches))])

    @property
    def replays_rollout(self) -> bool:
        """Whether a policy evaluated on the rollout's tokens routes as the rollout did (R3): a
        diagnostic forward outside the update (``log.lag_kl``) must then replay the same routes."""
        return self.moe and self.mode == "R3"

    def check(self, model_type: str) -> list[str]:
        """Errors (raised) for a mode that cannot work on this model; warnings for one that does
        nothing here."""
        if self.mode != "none" and not self.moe:
            raise ValueError(
                f"train.routing_replay={self.mode} needs a Mixture-of-Experts model, but "
                f"{model_type!r} is dense; use train.routing_replay=none"
            )
        if self.mode == "R2" and not self.replays:
            return [
                "train.routing_replay=R2 does nothing on-policy (batch.minibatches_per_step=1): it replays "
                "pi_old's routes, which the gradient forward takes anyway; use R3 to replay the rollout's"
            ]
        return []

    def old_pass(self) -> Forward | None:
        """The pi_old pass before any update (None when N = 1, or with the bypass)."""
        if self.minibatches == 1 or self.bypass:
            return None
        if self.mode == "R3":
            return Forward(replay="rollout")
        return Forward(capture="train_infer" if self.moe else None)

    @property
    def diagnostic_pass(self) -> bool:
        """Whether one extra no-grad forward records the live training routes: under R3 every
        other forward replays, and the train-vs-infer agreement needs the training engine's own."""
        return self.moe and self.mode == "R3"

    def minibatch(self, k: int) -> Forward:
        """The gradient forward of mini-batch ``k`` (0-based)."""
        if not self.moe:
            return Forward()
        if self.mode == "R3":
            return Forward(replay="rollout")
        if self.mode == "R2" and self.minibatches > 1:
            return Forward(replay="old")
        if self.minibatches == 1:  # this forward is pi_old's (R2 included: nothing to replay)
            return Forward(capture="train_infer")
        if self.bypass:  # no pi_old pass: the first gradient forward routes as pi_old would
            return Forward(capture="train_infer" if k == 0 else None)
        # mini-batch 0 routes exactly as the pi_old pass did; later ones have moved
        return Forward(capture="stale" if k > 0 else None)
