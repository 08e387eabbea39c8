"""Learning signal: which groups and mini-batches carry any, and the warning when almost none do
(docs/training.md "Steps without signal").

A group whose responses all got the same reward has advantages of exactly zero, so it adds
nothing to the policy gradient; a mini-batch made only of such groups has a gradient of exactly
zero. Rank-blind: the learner reduces the flags over ranks (``distributed``).
"""

from __future__ import annotations

import torch

# the share of groups without signal, averaged over the run, above which the run is flagged
NO_SIGNAL_THRESHOLD = 0.8


def groups_without_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group (``rewards`` in group order, ``group_size`` each): True when all its rewards are equal."""
    per_group = rewards.view(-1, group_size)
    return per_group.max(1).values == per_group.min(1).values


def has_signal(advantages: torch.Tensor, response_mask: torch.Tensor) -> bool:
    """Whether any response with at least one trained token has a non-zero advantage (these rows
    only; the caller reduces the flag over ranks)."""
    return bool(((advantages != 0) & response_mask.any(-1)).any())


def no_signal_warning(shares: list[float], threshold: float = NO_SIGNAL_THRESHOLD) -> str | None:
    """A warning when the mean share of groups without signal over ``shares`` (one per step)
    reaches ``threshold``, naming the share and what to do about it; else None."""
    if not shares:
        return None
    mean = sum(shares) / len(shares)
    if mean < threshold:
        return None
    return (
        f"{mean:.0%} of the groups had the same reward for every response (no learning signal) over "
        f"{len(shares)} steps: little or nothing was learned. Use an easier task or a cold start "
        "(sft.steps) so that some responses succeed, more samples per prompt (batch.group_size), or "
        "dynamic sampling (batch.filter_groups=true)"
    )
