"""Group advantages: A_i = R_i - mean_group(R), optionally divided by the group's std.

MiniRL (docs/formulation.md s.6) uses the mean baseline only; GRPO divides by the group std.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std_normalize: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages ``[B]`` for rewards ``[B]`` of responses grouped by prompt (``group_ids`` ``[B]``).

    The baseline is the mean reward of the response's own group (its G samples of one prompt).
    With ``std_normalize`` the result is divided by the group's (population) std + ``eps``;
    a group whose rewards are all equal gets advantage 0 either way.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape [B]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN/inf")
    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards) / count
    adv = rewards - mean[inverse]
    if std_normalize:
        var = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, adv**2) / count
        adv = adv / (var.sqrt()[inverse] + eps)
    return adv
