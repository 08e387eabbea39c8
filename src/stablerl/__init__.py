"""stablerl: stable reinforcement learning of LLMs (PAPER.md), Mixture-of-Experts first."""

from stablerl.advantages import group_advantages
from stablerl.config import LossConfig
from stablerl.objectives import aggregation_normalizer, policy_loss

__all__ = ["LossConfig", "policy_loss", "aggregation_normalizer", "group_advantages"]
__version__ = "0.1.0"
