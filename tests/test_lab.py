"""The exact first-order lab: its machinery against independent computations, then the claims."""

import json
import time

import pytest
import torch

from stablerl.cli import main
from stablerl.config import LabConfig, LossConfig
from stablerl.lab import run_lab
from stablerl.lab.exact import surrogate_gradient, true_gradient, true_objective
from stablerl.lab.policy import EnumerablePolicy, enumerate_responses, token_logp
from stablerl.lab.sweep import perturbed
from stablerl.objectives import policy_loss


@pytest.fixture(scope="module")
def default_result():
    # one torch thread while it is timed: with two, the threads' spin-waits on a loaded machine
    # count as CPU time (3 CPU s alone on the Xeon, 75 beside two experiment runs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu0 = time.process_time()
        result = run_lab(LabConfig())
        result["_cpu_s"] = time.process_time() - cpu0
    finally:
        torch.set_num_threads(threads)
    return result


def test_enumeration_is_a_distribution_for_every_precision():
    space = enumerate_responses(5, 5, 7)
    assert space.tokens.shape == (1 + 5 + 25 + 125 + 625 + 3125, 5)
    policy = EnumerablePolicy(5, 5, 16, 1.5, seed=3)
    for precision in ("fp32", "bf16", "fp8"):
        total = token_logp(policy, space, precision).detach().sum(-1).exp().sum()
        assert float(total) == pytest.approx(1.0, abs=1e-12)
    # reward: ends with EOS and content sums to 7, counted by hand for lengths <= 4 over 1..5
    from itertools import product

    expected = sum(1 for n in range(5) for c in product(range(1, 6), repeat=n) if sum(c) == 7)
    assert int(space.reward.sum()) == expected


def test_true_gradient_matches_finite_differences():
    space = enumerate_responses(3, 4, 5)
    policy = EnumerablePolicy(3, 4, 8, 1.0, seed=1)
    g = true_gradient(policy, space)
    params = list(policy.parameters())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        h = 1e-6
        with torch.no_grad():
            for p, dp in zip(params, d):
                p.add_(h * dp)
            jp = float(true_objective(policy, space))
            for p, dp in zip(params, d):
                p.sub_(2 * h * dp)
            jm = float(true_objective(policy, space))
            for p, dp in zip(params, d):
                p.add_(h * dp)
        assert float(g @ torch.cat([x.reshape(-1) for x in d])) == pytest.approx((jp - jm) / (2 * h), rel=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(),
        LossConfig(is_mode="none", clip=False),
        LossConfig(aggregation="seq_mean_token_mean"),
        LossConfig(algorithm="gspo"),
    ],
)
def test_expected_surrogate_gradient_equals_per_response_sum(cfg):
    """The lab's one-call expectation (advantages scaled by mu) against an explicit loop:
    sum_y mu(y) * gradient of policy_loss on the single response y."""
    space = enumerate_responses(2, 3, 3)
    old = EnumerablePolicy(2, 3, 8, 1.0, seed=4)
    theta = perturbed(old, 0.3, seed=5)
    mu_policy = perturbed(old, 0.2, seed=6)
    old_logp = token_logp(old, space).detach()
    rollout_logp = token_logp(mu_policy, space).detach()
    fast = surrogate_gradient(theta, space, old_logp, rollout_logp, cfg)

    mu = rollout_logp.sum(-1).exp()
    adv = space.reward - (mu * space.reward).sum()
    mean_len = float((mu * space.lengths).sum())
    logp = token_logp(theta, space)
    slow = torch.zeros_like(fast)
    for i in range(space.tokens.shape[0]):
        row = slice(i, i + 1)
        loss, _ = policy_loss(
            logp[row], old_logp[row], rollout_logp[row], adv[row], space.mask[row], cfg, normalizer=1.0
        )
        scale = mean_len if cfg.aggregation == "seq_mean_token_mean" else 1.0
        grads = torch.autograd.grad(loss, list(theta.parameters()), retain_graph=True)
        slow -= mu[i] * scale * torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(),
        LossConfig(is_mode="sequence_mask"),
        LossConfig(algorithm="cispo"),
        LossConfig(algorithm="gspo", aggregation="seq_mean_token_mean"),
        LossConfig(reject="sequence_geo", reject_low=0.9, reject_high=1.1, opsm_delta=0.05),
    ],
)
def test_estimator_moments_equal_per_response_autograd(cfg):
    """The lab's hand-derived moments (mean gradient and E||g||^2 of the one-response estimator)
    against autograd on every single response."""
    from stablerl.lab.exact import surrogate_estimator

    space = enumerate_responses(2, 3, 3)
    old = EnumerablePolicy(2, 3, 8, 1.0, seed=4)
    theta = perturbed(old, 0.3, seed=5)
    old_logp = token_logp(old, space).detach()
    rollout_logp = token_logp(perturbed(old, 0.2, seed=6), space).detach()
    mean, variance = surrogate_estimator(theta, space, old_logp, rollout_logp, cfg)

    mu = rollout_logp.sum(-1).exp()
    adv = space.reward - (mu * space.reward).sum()
    scale = float((mu * space.lengths).sum()) if cfg.aggregation == "seq_mean_token_mean" else 1.0
    logp = token_logp(theta, space)
    # per response: its gradient alone (the batch-level decisions, here none, are per response)
    grads = []
    for i in range(space.tokens.shape[0]):
        row = slice(i, i + 1)
        loss, _ = policy_loss(
            logp[row], old_logp[row], rollout_logp[row], adv[row], space.mask[row], cfg, normalizer=1.0
        )
        g = torch.autograd.grad(loss, list(theta.parameters()), retain_graph=True)
        grads.append(-scale * torch.cat([x.reshape(-1) for x in g]))
    grads = torch.stack(grads)
    torch.testing.assert_close(mean, (mu[:, None] * grads).sum(0), rtol=1e-10, atol=1e-13)
    expected = float((mu * grads.pow(2).sum(1)).sum() - (mu[:, None] * grads).sum(0).pow(2).sum())
    assert variance == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(
        mean, surrogate_gradient(theta, space, old_logp, rollout_logp, cfg), rtol=1e-10, atol=1e-13
    )


def test_every_correction_is_ranked_and_exact_where_it_is_inactive(default_result):
    row = default_result["discrepancy"][0]  # no discrepancy, no staleness: nothing to correct or drop
    for name in ("icepop", "seq_truncate", "seq_mask", "reject_geo", "opsm", "m2po"):
        assert row["surrogates"][name]["rel_error"] < 1e-9
        assert row["surrogates"][name]["rel_std"] == pytest.approx(row["surrogates"]["minirl"]["rel_std"], rel=1e-9)
    assert all(s["rel_std"] > 0 for s in row["surrogates"].values())


def test_on_policy_surrogate_gradient_is_the_true_gradient(default_result):
    for row in (default_result["discrepancy"][0], default_result["staleness"][0]):
        assert row["train_infer_kl"] == 0 and row["staleness_kl"] == 0
        for name in ("minirl", "minirl_no_is", "minirl_no_clip", "cispo"):
            assert row["surrogates"][name]["cosine"] > 0.999999
            assert row["surrogates"][name]["rel_error"] < 1e-9


def test_error_grows_with_staleness_and_discrepancy(default_result):
    for sweep in ("discrepancy", "staleness"):
        first, last = default_result[sweep][0], default_result[sweep][-1]
        for name in ("minirl", "minirl_no_is", "minirl_no_clip"):
            assert last["surrogates"][name]["rel_error"] > first["surrogates"][name]["rel_error"] + 0.1
            assert last["surrogates"][name]["cosine"] < first["surrogates"][name]["cosine"]
        # the measured distances really grow along the sweep
        key = "train_infer_kl" if sweep == "discrepancy" else "staleness_kl"
        kls = [row[key] for row in default_result[sweep]]
        assert kls == sorted(kls) and kls[-1] > 1e-2


def test_is_correction_reduces_error_under_pure_discrepancy(default_result):
    # every non-zero noise level and both casts (docs/lab.md: the margin at noise 0.4 is small,
    # where the first-order approximation itself has broken down)
    for row in default_result["discrepancy"][1:] + default_result["casts"]:
        s = row["surrogates"]
        assert s["minirl"]["rel_error"] < s["minirl_no_is"]["rel_error"], row.get("noise", row.get("precision"))
        assert s["minirl"]["cosine"] > s["minirl_no_is"]["cosine"]


def test_length_normalization_is_biased_even_on_policy(default_result):
    assert default_result["discrepancy"][0]["surrogates"]["minirl_length_norm"]["cosine"] < 0.99


def test_default_lab_is_fast(default_result):
    # CPU seconds of this process (all its threads), not wall time: the bound is on the lab's
    # cost, which other jobs on the machine barely change (27 CPU s on an AVX2 EPYC beside two runs,
    # 40 s wall there; a wall bound failed at 78.7 s under a heavier load)
    assert default_result["_cpu_s"] < 60


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "lab"
    rc = main(["lab", "--out", str(out), "staleness_steps=[0,2]", "discrepancy_noise=[0.0,0.1]", "casts=[fp8]"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cosine(surrogate grad, true grad)" in printed and "noise 0.1" in printed
    data = json.loads((out / "lab.json").read_text())
    assert [r["steps"] for r in data["staleness"]] == [0, 2]
    assert (out / "lab.png").stat().st_size > 10_000
    rc = main(["lab", "--out", str(out), "--json", "staleness_steps=[0]", "discrepancy_noise=[0.0]", "casts=[]"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["responses"] == 3906


def test_cli_config_errors_name_the_key(tmp_path, capsys):
    assert main(["lab", "--out", str(tmp_path), "max_len=99"]) == 2
    assert "max_len" in capsys.readouterr().err
    assert main(["lab", "--out", str(tmp_path), "nosuchkey=1"]) == 2
    err = capsys.readouterr().err
    assert "nosuchkey" in err and "allowed here" in err and "staleness_lr" in err
    assert main(["lab", "--out", str(tmp_path), "staleness_steps=[3,1]"]) == 2
    assert "ascending" in capsys.readouterr().err
    cfg = tmp_path / "lab.yaml"
    cfg.write_text("seed: 2\ncasts: [bf17]\n")
    assert main(["lab", "--config", str(cfg), "--out", str(tmp_path)]) == 2
    assert "casts" in capsys.readouterr().err
