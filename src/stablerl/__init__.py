"""stablerl: stable reinforcement learning of LLMs (docs/formulation.md), Mixture-of-Experts first.

The public names are imported lazily, so that ``import stablerl.tasks`` (what the reward pool's
worker processes do) does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "train": "stablerl.api",
    "Trainer": "stablerl.loop",
    "TrainingAborted": "stablerl.errors",
    "RunConfig": "stablerl.config",
    "LossConfig": "stablerl.config",
    "policy_loss": "stablerl.objectives",
    "aggregation_normalizer": "stablerl.objectives",
    "group_advantages": "stablerl.advantages",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stablerl' has no attribute {name!r}")
