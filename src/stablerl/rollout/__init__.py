"""Rollout engines: the inference policy mu_old that samples responses."""

from stablerl.rollout.base import RolloutBatch, RolloutEngine
from stablerl.rollout.local import LocalEngine

__all__ = ["RolloutBatch", "RolloutEngine", "LocalEngine"]
