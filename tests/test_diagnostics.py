"""Diagnostics against hand-worked values."""

import math

import pytest
import torch

from stablerl.diagnostics import first_order_gap, is_weight_stats, k3, route_agreement, train_infer_kl


def test_first_order_gap_hand_worked():
    # token ratios rho = (2, 0.5): product 1, first-order 1 + (1 - 0.5) = 1.5 -> gap 0.5
    # a one-token response has no higher-order terms -> gap 0
    rollout = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.tensor([[math.log(2), math.log(0.5)], [math.log(3), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    gap = first_order_gap(logp, rollout, mask)
    assert gap.tolist() == pytest.approx([0.5, 0.0], abs=1e-12)
    # rho = (1.1, 1.1, 1.1): 1.331 vs 1.3
    g = first_order_gap(torch.full((1, 3), math.log(1.1)), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    assert float(g) == pytest.approx(0.031, abs=1e-6)


def test_route_agreement_hand_worked():
    a = torch.tensor([[[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [2, 3]]]], dtype=torch.int16)  # [1, 3, 2, 2]
    b = a.clone()
    b[0, 0, 0] = torch.tensor([1, 0])  # same set, other order: agrees
    b[0, 1, 1] = torch.tensor([6, 5])  # one expert differs: disagrees
    b[0, 2, 0] = torch.tensor([-1, -1])  # no route: left out
    agree = route_agreement(a, b)
    assert agree.tolist() == pytest.approx([1.0, 2 / 3])
    with pytest.raises(ValueError, match="shape"):
        route_agreement(a, b[:, :2])


def test_kl_and_is_weight_stats():
    old = torch.log(torch.tensor([[0.5, 0.25, 0.2, 0.1]]))
    roll = torch.log(torch.tensor([[0.25, 0.25, 0.4, 0.1]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    w = torch.tensor([2.0, 1.0, 0.5, 1.0])
    assert train_infer_kl(old, roll, mask) == pytest.approx(float((w - 1 - w.log()).mean()), rel=1e-6)
    assert float(k3(torch.zeros(3)).abs().max()) == 0.0
    s = is_weight_stats(old, roll, mask, cap=1.5)
    assert (s["is_weight_min"], s["is_weight_max"], s["is_weight_mean"]) == pytest.approx((0.5, 2.0, 1.125))
    assert s["is_weight_frac_above_cap"] == 0.25 and s["is_weight_frac_below_inv_cap"] == 0.25


def test_k3_measures_small_log_ratios_instead_of_rounding_them_away():
    x = torch.tensor([1e-4, -3e-5, 2e-3], dtype=torch.float32)
    exact = [float(v) ** 2 / 2 + float(v) ** 3 / 6 for v in x.double()]  # the series to third order
    got = k3(x)
    for g, e in zip(got.tolist(), exact):
        assert g == pytest.approx(e, rel=1e-4)
    assert float((x.exp() - 1 - x)[1]) != pytest.approx(exact[1], rel=0.1)  # what float32 used to give
