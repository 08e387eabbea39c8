import pytest
import torch

from stablerl.advantages import group_advantages


def test_group_mean_baseline_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 7, 7, 7])
    adv = group_advantages(rewards, groups)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))


def test_std_normalization_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    groups = torch.tensor([1, 1, 2, 2])
    adv = group_advantages(rewards, groups, std_normalize=True, eps=0.0 + 1e-12)
    # group 1: mean .5, population std .5 -> +-1 ; group 2: all equal -> 0
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_interleaved_groups_and_errors():
    rewards = torch.tensor([1.0, 5.0, 0.0, 7.0])
    groups = torch.tensor([3, 9, 3, 9])
    torch.testing.assert_close(group_advantages(rewards, groups), torch.tensor([0.5, -1.0, -0.5, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(rewards, groups[:3])
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))
