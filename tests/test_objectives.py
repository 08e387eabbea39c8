"""policy_loss checked against independent computations: hand-derived gradient formulas,
finite differences, the on-policy identity, hand-built clip/IS cases and micro-batch splits."""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablerl.config import LossConfig
from stablerl.objectives import aggregation_normalizer, policy_loss


@pytest.fixture(autouse=True)
def _float64():
    # exact comparisons need double precision; restore the default for other test modules
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def make_batch(B=4, T=6, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    rollout_logp = -torch.rand(B, T, generator=g) * 2 - 0.1
    old_logp = rollout_logp + spread * torch.randn(B, T, generator=g)
    logp = old_logp + spread * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old_logp.clamp(max=-1e-3), rollout_logp, adv, mask


def grad_of(cfg, logp, old, roll, adv, mask, **kw):
    x = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(x, old, roll, adv, mask, cfg, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g, metrics


def hand_gradient(cfg, logp, old, roll, adv, mask):
    """dLoss/dlogp derived on paper, token_sum aggregation with the default normalizer."""
    B, T = logp.shape
    N = B * T
    m = mask.double()
    A = adv[:, None].expand(B, T)
    w = (old - roll).exp()
    if cfg.is_mode == "token_truncate":
        w = w.clamp(max=cfg.is_cap)
    elif cfg.is_mode == "none":
        w = torch.ones_like(w)
    r = (logp - old).exp()
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    if cfg.algorithm in ("minirl", "grpo"):
        M = ~(((A > 0) & (r > hi)) | ((A < 0) & (r < lo)))
        return -(M * w * r * A * m) / N
    if cfg.algorithm == "cispo":
        return -(r.clamp(lo, hi) * w * A * m) / N
    if cfg.algorithm == "reinforce":
        return -(w * A * m) / N
    if cfg.algorithm == "gspo":
        L = m.sum(-1, keepdim=True)
        s = (((logp - old) * m).sum(-1, keepdim=True) / L).exp()
        M = ~(((A > 0) & (s > hi)) | ((A < 0) & (s < lo)))
        return -(M * s * A * (w * m).sum(-1, keepdim=True) / L * m) / N
    raise AssertionError


@pytest.mark.parametrize("algorithm", ["minirl", "grpo", "cispo", "gspo", "reinforce"])
@pytest.mark.parametrize("is_mode", ["none", "token_truncate"])
def test_gradient_matches_hand_formula(algorithm, is_mode):
    cfg = LossConfig(algorithm=algorithm, is_mode=is_mode, is_cap=1.2, aggregation="token_sum")
    batch = make_batch(seed=1, spread=0.4)
    _, g, metrics = grad_of(cfg, *batch)
    expected = hand_gradient(cfg, *batch)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
    # the batch must exercise clipping / truncation, or the comparison proves little
    if algorithm in ("minirl", "grpo", "cispo"):
        assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0
    if is_mode == "token_truncate":
        assert metrics["is_frac_truncated"] > 0


# CISPO is left out on purpose: its weight sg[clip(r)] is a stop-gradient of a function of logp
# itself, so the derivative of its loss *value* is not its defined gradient (the hand formula
# above checks CISPO's gradient instead).
@pytest.mark.parametrize("algorithm", ["minirl", "grpo", "gspo", "reinforce"])
@pytest.mark.parametrize("aggregation", ["token_sum", "token_mean", "seq_mean_token_mean"])
def test_gradient_matches_finite_differences(algorithm, aggregation):
    cfg = LossConfig(algorithm=algorithm, aggregation=aggregation, is_mode="token_truncate", is_cap=1.3)
    logp, old, roll, adv, mask = make_batch(seed=2, spread=0.25)
    _, g, _ = grad_of(cfg, logp, old, roll, adv, mask)
    h = 1e-6
    fd = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            e = torch.zeros_like(logp)
            e[i, t] = h
            lp, _ = policy_loss(logp + e, old, roll, adv, mask, cfg)
            lm, _ = policy_loss(logp - e, old, roll, adv, mask, cfg)
            fd[i, t] = (lp - lm) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8)


def test_on_policy_minirl_gradient_is_reinforce():
    logp, _, _, adv, mask = make_batch(seed=3)
    old = logp.clone()
    roll = logp.clone()
    for aggregation in ("token_sum", "token_mean", "seq_mean_token_mean"):
        _, g_mini, m = grad_of(LossConfig(algorithm="minirl", aggregation=aggregation), logp, old, roll, adv, mask)
        _, g_pg, _ = grad_of(LossConfig(algorithm="reinforce", aggregation=aggregation), logp, old, roll, adv, mask)
        torch.testing.assert_close(g_mini, g_pg, rtol=1e-12, atol=1e-14)
        assert m["clip_frac_low"] == m["clip_frac_high"] == 0.0
        assert m["train_infer_kl"] == pytest.approx(0.0, abs=1e-15)
        assert m["staleness_kl"] == pytest.approx(0.0, abs=1e-15)
    # and, spelled out, REINFORCE's gradient is -A/N on every response token
    _, g, _ = grad_of(LossConfig(algorithm="minirl"), logp, old, roll, adv, mask)
    torch.testing.assert_close(g, -(adv[:, None] * mask) / mask.numel())


def test_clip_mask_pattern_hand_built():
    # one response per advantage sign; ratios r = exp(logp - old) chosen around the bounds
    cfg = LossConfig(algorithm="minirl", is_mode="none", eps_low=0.2, eps_high=0.28)
    r = torch.tensor([[0.7, 0.9, 1.1, 1.3], [0.7, 0.9, 1.1, 1.3]])
    old = torch.full((2, 4), -1.0)
    logp = old + r.log()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    _, g, m = grad_of(cfg, logp, old, old, adv, mask)
    # A>0 stops r>1.28 only; A<0 stops r<0.8 only
    expected_kept = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(g != 0, expected_kept)
    assert m["clip_frac_high"] == pytest.approx(1 / 8)
    assert m["clip_frac_low"] == pytest.approx(1 / 8)
    assert m["n_tokens_contrib"] == 6
    # clip=False: every token contributes
    _, g, m = grad_of(cfg.model_copy(update={"clip": False}), logp, old, old, adv, mask)
    assert bool((g != 0).all()) and m["n_tokens_contrib"] == 8


def test_is_modes_hand_built():
    # one response of 3 tokens with w = pi_old/mu_old = (0.25, 1, 4); on-policy otherwise (r = 1)
    w = torch.tensor([[0.25, 1.0, 4.0]])
    roll = torch.full((1, 3), -2.0)
    old = roll + w.log()
    logp = old.clone()
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 3, dtype=torch.bool)
    N = 3.0

    def g(**kw):
        cfg = LossConfig(algorithm="minirl", **kw)
        return grad_of(cfg, logp, old, roll, adv, mask)

    _, gr, m = g(is_mode="none")
    torch.testing.assert_close(gr, -torch.ones(1, 3) / N)
    _, gr, m = g(is_mode="token_truncate", is_cap=2.0)
    torch.testing.assert_close(gr, -torch.tensor([[0.25, 1.0, 2.0]]) / N)
    assert m["is_frac_truncated"] == pytest.approx(1 / 3)
    assert (m["is_weight_min"], m["is_weight_max"]) == pytest.approx((0.25, 4.0))
    _, gr, m = g(is_mode="token_mask", is_low=0.5, is_cap=2.0)
    torch.testing.assert_close(gr, -torch.tensor([[0.0, 1.0, 0.0]]) / N)
    assert m["is_frac_masked"] == pytest.approx(2 / 3) and m["n_tokens_contrib"] == 1
    # sequence modes: geometric mean of (0.25, 1, 4) is 1 -> untouched by a cap of 2
    _, gr, m = g(is_mode="sequence_truncate", is_cap=2.0)
    torch.testing.assert_close(gr, -torch.ones(1, 3) / N)
    assert m["is_weight_mean"] == pytest.approx(1.0)
    # ... and with a cap of 0.5 the whole response is truncated to 0.5 / masked
    _, gr, m = g(is_mode="sequence_truncate", is_cap=0.5)
    torch.testing.assert_close(gr, -0.5 * torch.ones(1, 3) / N)
    assert m["is_frac_truncated"] == 1.0
    _, gr, m = g(is_mode="sequence_mask", is_low=0.1, is_cap=0.5)
    assert bool((gr == 0).all()) and m["is_frac_masked"] == 1.0


def test_sequence_is_weight_is_length_invariant():
    # the same per-token discrepancy on a short and a long response gives the same weight
    roll = torch.full((2, 8), -1.0)
    old = roll + 0.1
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :] = True
    cfg = LossConfig(algorithm="minirl", is_mode="sequence_truncate", is_cap=10.0, aggregation="seq_mean_token_mean")
    _, g, m = grad_of(cfg, old.clone(), old, roll, torch.tensor([1.0, 1.0]), mask)
    assert m["is_weight_min"] == pytest.approx(math.exp(0.1)) and m["is_weight_max"] == pytest.approx(math.exp(0.1))


def test_kl_metrics_match_direct_k3():
    logp, old, roll, adv, mask = make_batch(seed=4)
    _, m = policy_loss(logp, old, roll, adv, mask, LossConfig())
    lw = (old - roll)[mask]
    lr = (logp - old)[mask]
    assert m["train_infer_kl"] == pytest.approx(float((lw.exp() - 1 - lw).mean()), rel=1e-12)
    assert m["staleness_kl"] == pytest.approx(float((lr.exp() - 1 - lr).mean()), rel=1e-12)
    assert m["n_tokens"] == float(mask.sum())
    assert m["train_infer_kl_k1"] == pytest.approx(float((roll - old)[mask].mean()), rel=1e-12)


def test_k1_and_k3_estimate_the_exact_kl():
    """Tokens drawn from mu: the mean of log mu - log pi (k1, as the paper plots it) and of k3
    both estimate KL(mu || pi), here computed exactly over a 5-token vocabulary."""
    g = torch.Generator().manual_seed(0)
    log_mu = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    log_pi = torch.log_softmax(log_mu + 0.3 * torch.randn(5, generator=g, dtype=torch.float64), -1)
    exact = float((log_mu.exp() * (log_mu - log_pi)).sum())
    tokens = torch.multinomial(log_mu.exp(), 400_000, replacement=True, generator=g).view(400, 1000)
    roll, old = log_mu[tokens], log_pi[tokens]
    mask = torch.ones_like(roll, dtype=torch.bool)
    _, m = policy_loss(old.clone(), old, roll, torch.ones(400, dtype=torch.float64), mask, LossConfig())
    assert m["train_infer_kl_k1"] == pytest.approx(exact, rel=0.05)
    assert m["train_infer_kl"] == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("algorithm", ["minirl", "grpo", "cispo", "gspo", "reinforce"])
@pytest.mark.parametrize("aggregation", ["token_sum", "token_mean", "seq_mean_token_mean"])
def test_micro_batch_accumulation_is_exact(algorithm, aggregation):
    cfg = LossConfig(algorithm=algorithm, aggregation=aggregation, is_mode="token_truncate")
    logp, old, roll, adv, mask = make_batch(B=6, T=5, seed=5, spread=0.3)
    _, g_full, _ = grad_of(cfg, logp, old, roll, adv, mask)
    norm = aggregation_normalizer(mask, aggregation)
    x = logp.clone().requires_grad_(True)
    for rows in ([0, 1], [2], [3, 4, 5]):
        sub = [t[rows] for t in (old, roll, adv, mask)]
        # trim the micro-batch's padding to its own longest response, as a trainer would
        T = int(sub[3].sum(-1).max())
        loss, _ = policy_loss(
            x[rows][:, :T],
            sub[0][:, :T],
            sub[1][:, :T],
            sub[2],
            sub[3][:, :T],
            cfg,
            normalizer=aggregation_normalizer(mask, aggregation, max_response_len=mask.shape[1])
            if aggregation == "token_sum"
            else norm,
        )
        loss.backward()
    torch.testing.assert_close(x.grad, g_full, rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    split=st.lists(st.integers(1, 3), min_size=1, max_size=8),
    algorithm=st.sampled_from(["minirl", "grpo", "cispo", "gspo", "reinforce"]),
)
def test_micro_batch_accumulation_property(seed, split, algorithm):
    B = sum(split)
    cfg = LossConfig(algorithm=algorithm)
    logp, old, roll, adv, mask = make_batch(B=B, T=4, seed=seed)
    _, g_full, _ = grad_of(cfg, logp, old, roll, adv, mask)
    norm = aggregation_normalizer(mask, cfg.aggregation)
    x = logp.clone().requires_grad_(True)
    start = 0
    for n in split:
        sl = slice(start, start + n)
        start += n
        loss, _ = policy_loss(x[sl], old[sl], roll[sl], adv[sl], mask[sl], cfg, normalizer=norm)
        loss.backward()
    torch.testing.assert_close(x.grad, g_full, rtol=1e-12, atol=1e-15)


def test_per_token_advantages_and_padding_garbage_ignored():
    logp, old, roll, adv, mask = make_batch(seed=6)
    adv_bt = adv[:, None].expand_as(logp).clone()
    l1, _ = policy_loss(logp, old, roll, adv, mask, LossConfig())
    # garbage (inf/NaN) in padding positions must not leak into the loss or its gradient
    pad = ~mask
    logp2, old2, roll2 = logp.clone(), old.clone(), roll.clone()
    logp2[pad], old2[pad], roll2[pad] = float("nan"), float("-inf"), float("inf")
    adv_bt[pad] = float("nan")
    x = logp2.clone().requires_grad_(True)
    l2, _ = policy_loss(x, old2, roll2, adv_bt, mask, LossConfig())
    l2.backward()
    assert float(l1) == pytest.approx(float(l2.detach()), rel=1e-14)
    assert bool(torch.isfinite(x.grad).all()) and bool((x.grad[pad] == 0).all())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.__setitem__(1, b[1][:, :-1]), "old_logp has shape"),
        (lambda b: b.__setitem__(3, torch.ones(2, 2)), "advantages must have shape"),
        (lambda b: b.__setitem__(4, torch.zeros_like(b[4])), "mask has no response tokens"),
        (lambda b: b[0].__setitem__((0, 0), float("nan")), "logp has 1 NaN/inf"),
        (lambda b: b[2].__setitem__((0, 0), float("inf")), "rollout_logp has 1 NaN/inf"),
        (lambda b: b.__setitem__(3, torch.tensor([float("nan"), 0, 0, 0])), "advantages has"),
        (lambda b: b.__setitem__(4, b[4].double() * 2), "mask must be boolean"),
        (lambda b: b.__setitem__(0, b[0][0]), "logp must have shape"),
    ],
)
def test_bad_input_is_a_named_value_error(mutate, message):
    batch = list(make_batch())
    mutate(batch)
    with pytest.raises(ValueError, match=message):
        policy_loss(*batch, LossConfig())


def test_bad_config_names_the_key_and_allowed_values():
    with pytest.raises(ValueError, match="algorithm") as e:
        LossConfig(algorithm="ppo2")
    assert "minirl" in str(e.value) and "cispo" in str(e.value)
    with pytest.raises(ValueError, match="is_mode"):
        LossConfig(is_mode="tokens")
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="is_low"):
        LossConfig(is_mode="token_mask", is_low=3.0, is_cap=2.0)
    with pytest.raises(ValueError, match="eps_low"):
        LossConfig(eps_low=1.5)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(*make_batch(), LossConfig(), normalizer=0.0)


def test_overflowing_ratio_is_loud_not_nan():
    logp, old, roll, adv, mask = make_batch()
    logp = logp.float()
    logp[0, 0] = old[0, 0].float() + 200.0  # r = e^200: overflows fp32
    cfg = LossConfig(clip=False, is_mode="none")
    with pytest.raises(FloatingPointError, match="not finite"):
        policy_loss(logp, old.float(), roll.float(), adv.float(), mask, cfg)
    # with clipping the overflowing token is stopped (A>0 there) and the loss stays finite
    adv = adv.float().abs()
    loss, _ = policy_loss(logp, old.float(), roll.float(), adv, mask, LossConfig(is_mode="none"))
    assert bool(torch.isfinite(loss))


def test_the_readme_loss_snippet_runs_as_pasted():
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "policy_loss" in b)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    assert namespace["logp"].grad is not None and torch.isfinite(namespace["logp"].grad).all()


@pytest.mark.parametrize(
    "estimator,grad",
    [
        ("k1", lambda d: 1.0),
        ("k2", lambda d: d),
        ("k3", lambda d: 1 - math.exp(-d)),  # d/dlogp [e^{-d} - 1 + d], d = logp - ref
    ],
)
def test_kl_penalty_gradient_by_hand(estimator, grad):
    from stablerl.config import LossConfig
    from stablerl.objectives import policy_loss

    d = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    ref = -torch.ones(1, 3, dtype=torch.float64)
    logp = (ref + d).requires_grad_(True)
    cfg = LossConfig(kl_beta=0.5, kl_estimator=estimator, is_mode="none")
    adv = torch.zeros(1, dtype=torch.float64)  # no policy-gradient term: only the penalty
    loss, m = policy_loss(
        logp, logp.detach(), logp.detach(), adv, torch.ones(1, 3, dtype=torch.bool), cfg, normalizer=3.0, ref_logp=ref
    )
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.5 * grad(float(x)) / 3.0 for x in d[0]])
    assert m["kl_ref"] > 0 if estimator != "k1" else True
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(1, 3, dtype=torch.bool), cfg)
