"""DPPO (loss.algorithm=dppo) against independent computations: a hand-built mask pattern, a
hand-written re-implementation of its gradient in prime-rl's form (pi_theta/mu A grad log pi on
the tokens its probability-difference mask keeps), its binary-KL variant, and finite differences."""

import math

import pytest
import torch

from stablerl.config import LossConfig
from stablerl.objectives import policy_loss


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def batch(seed=0, B=6, T=7):
    """Probabilities spread over (0, 1) so that |pi_theta - mu| crosses 0.2 on some tokens."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(B, T, generator=g) * 0.9 + 0.05
    pi_old = (mu + 0.2 * torch.randn(B, T, generator=g)).clamp(0.02, 0.98)
    pi = (pi_old + 0.2 * torch.randn(B, T, generator=g)).clamp(0.02, 0.98)
    adv = torch.randn(B, generator=g)
    mask = torch.arange(T)[None, :] < torch.randint(2, T + 1, (B,), generator=g)[:, None]
    return pi.log(), pi_old.log(), mu.log(), adv, mask


def hand_dppo_gradient(logp, old, roll, adv, mask, low, high, divergence="tv"):
    """d(-objective)/d logp written out: a kept token's gradient is -(pi/pi_old)(pi_old/mu) A / N
    (IS uncapped), with the mask computed here from the probabilities directly."""
    p, q = logp.exp(), roll.exp()
    A = adv[:, None].expand_as(logp)
    if divergence == "tv":
        up, down = p - q > high, p - q < -low
    else:
        kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
        up, down = (p > q) & (kl > high), (p < q) & (kl > low)
    keep = mask & ~((A > 0) & up) & ~((A < 0) & down)
    N = logp.numel()  # token_sum: responses x the longest response
    return -(keep * (p / q) * A) / N, keep


def grad(cfg, logp, old, roll, adv, mask):
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, roll, adv, mask, cfg)
    (g,) = torch.autograd.grad(loss, x)
    return g, m


@pytest.mark.parametrize("divergence,low,high", [("tv", 0.2, 0.2), ("tv", 0.1, 0.3), ("binary_kl", 0.05, 0.08)])
def test_dppo_gradient_equals_a_hand_written_reimplementation(divergence, low, high):
    cfg = LossConfig(algorithm="dppo", dppo_divergence=divergence, dppo_delta_low=low, dppo_delta_high=high, is_cap=1e9)
    data = batch(seed=0)
    g, m = grad(cfg, *data)
    expected, keep = hand_dppo_gradient(*data, low, high, divergence)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-13)
    logp, _, _, adv, mask = data
    # the case must mask tokens of both signs, and keep some
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and bool(keep.any())
    assert m["n_tokens_contrib"] == float(keep.sum())


def test_dppo_mask_pattern_hand_built():
    """p - q = [+.3, +.1, -.3, -.1, -.3, +.3] with A = [+, +, -, -, +, -]: only the moves past 0.2 in
    the advantage's own direction are masked (t0, t2); the wrong-side moves (t4, t5) are kept."""
    q = torch.full((6, 1), 0.5)
    p = q + torch.tensor([0.3, 0.1, -0.3, -0.1, -0.3, 0.3])[:, None]
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    cfg = LossConfig(algorithm="dppo", is_mode="none")
    g, m = grad(cfg, p.log(), p.log(), q.log(), adv, torch.ones(6, 1, dtype=torch.bool))
    assert (g[:, 0] != 0).tolist() == [False, True, False, True, True, True]
    assert m["clip_frac_high"] == pytest.approx(1 / 6) and m["clip_frac_low"] == pytest.approx(1 / 6)


def test_dppo_gradient_matches_finite_differences():
    cfg = LossConfig(algorithm="dppo", is_mode="token_truncate", is_cap=1.3, aggregation="token_mean")
    logp, old, roll, adv, mask = batch(seed=5)
    g, _ = grad(cfg, logp, old, roll, adv, mask)
    h = 1e-6
    fd = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            e = torch.zeros_like(logp)
            e[i, t] = h
            fd[i, t] = (
                policy_loss(logp + e, old, roll, adv, mask, cfg)[0]
                - policy_loss(logp - e, old, roll, adv, mask, cfg)[0]
            ) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8)
    assert not math.isnan(float(g.abs().sum())) and float(g.abs().sum()) > 0


def test_dppo_options_are_validated():
    with pytest.raises(ValueError, match="dppo_divergence"):
        LossConfig(algorithm="dppo", dppo_divergence="js")
    with pytest.raises(ValueError, match="dppo_delta_low"):
        LossConfig(algorithm="dppo", dppo_delta_low=0)
