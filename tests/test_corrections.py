"""Rejection, OPSM and M2PO (stablerl.corrections, composed by policy_loss): hand-worked
examples, an independent re-implementation in plain Python, composition with every algorithm and
clipping, invariance to micro-batch size, and bad values rejected with the key named."""

import math

import pytest
import torch

from stablerl.config import LossConfig, RunConfig
from stablerl.config_io import build_config
from stablerl.corrections import m2_tokens, opsm_sequences, reject_sequences
from stablerl.objectives import policy_loss

ALGOS = ["minirl", "grpo", "cispo", "gspo", "reinforce"]


# ---------------------------------------------------------------------------------------------
# hand-worked examples
# ---------------------------------------------------------------------------------------------
def test_m2po_removes_the_largest_squared_deviations_until_the_mean_fits():
    # d = [0.5, 0.1, 0.1, 0.01]: mean 0.1775 > 0.1; without 0.5: (0.1 + 0.1 + 0.01) / 3 = 0.07 <= 0.1
    logp = torch.tensor([[math.sqrt(0.5), math.sqrt(0.1)], [math.sqrt(0.1), 0.1]])
    drop = m2_tokens(logp, torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), 0.1)
    assert drop.tolist() == [[True, False], [False, False]]
    # ties go in row-major order: d = [0.3, 0.3, 0, 0] -> removing one 0.3 leaves mean 0.1 <= 0.1
    logp = torch.tensor([[0.0, math.sqrt(0.3)], [math.sqrt(0.3), 0.0]], dtype=torch.float64)
    drop = m2_tokens(logp, torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool), 0.1 + 1e-12)
    assert drop.tolist() == [[False, True], [False, False]]
    # padding never counts, and when even the smallest exceeds the threshold everything goes
    mask = torch.tensor([[True, False], [True, True]])
    assert m2_tokens(torch.ones(2, 2), torch.zeros(2, 2), mask, 0.5).tolist() == [[True, False], [True, True]]


def test_m2po_weights_make_it_an_expectation():
    # weights 3 and 1 on d = [1, 0]: weighted mean 0.75 > 0.5 -> drop d = 1
    logp = torch.tensor([[1.0, 0.0]])
    drop = m2_tokens(
        logp, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.5, weight=torch.tensor([[3.0, 1.0]])
    )
    assert drop.tolist() == [[True, False]]
    drop = m2_tokens(
        logp, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.8, weight=torch.tensor([[3.0, 1.0]])
    )
    assert drop.tolist() == [[False, False]]


def test_rejection_by_geometric_mean_and_the_minirl_loss_by_hand():
    old = torch.tensor([[0.1, -0.1], [0.2, 0.2]])  # log w: response 0 geo 1.0, response 1 geo e^0.2
    roll = torch.zeros(2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert reject_sequences(old, roll, mask, 0.95, 1.05).tolist() == [False, True]
    logp = old.clone().requires_grad_(True)  # pi_theta = pi_old: r = 1
    adv = torch.tensor([1.0, -1.0])
    cfg = LossConfig(reject="sequence_geo")
    loss, m = policy_loss(logp, old, roll, adv, mask, cfg, normalizer=4.0)
    # only response 0 remains: its tokens carry w = e^0.1 and e^-0.1 (token_truncate, cap 5), r = 1, A = 1
    assert float(loss.detach()) == pytest.approx(-(math.exp(0.1) + math.exp(-0.1)) / 4)
    loss.backward()
    assert logp.grad[1].abs().sum() == 0 and logp.grad[0].abs().sum() > 0
    assert m["masked_responses/reject"] == 0.5 and m["masked/reject"] == 0.5


def test_opsm_drops_only_negative_advantage_responses_that_drifted():
    roll = torch.zeros(3, 2)
    logp = torch.tensor([[-0.5, -0.5], [-0.1, -0.1], [-0.9, -0.9]])  # mean(log mu - log pi): 0.5, 0.1, 0.9
    adv = torch.tensor([-1.0, -1.0, 1.0])
    mask = torch.ones(3, 2, dtype=torch.bool)
    assert opsm_sequences(logp, roll, adv, mask, 0.3).tolist() == [True, False, False]
    _, m = policy_loss(logp, logp, roll, adv, mask, LossConfig(opsm_delta=0.3, is_mode="none"))
    assert m["masked_responses/opsm"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# an independent re-implementation: masks by loops, MiniRL by its formula
# ---------------------------------------------------------------------------------------------
def _reference_minirl(logp, old, roll, adv, mask, cfg, normalizer, aggregation):
    B, T = logp.shape
    total = 0.0
    tokens = [[t for t in range(T) if mask[i, t]] for i in range(B)]
    m2 = _reference_m2(logp, roll, tokens, cfg.m2_threshold)
    for i in range(B):
        if not tokens[i]:
            continue
        geo = math.exp(sum(float(old[i, t] - roll[i, t]) for t in tokens[i]) / len(tokens[i]))
        if cfg.reject == "sequence_geo" and not cfg.reject_low <= geo <= cfg.reject_high:
            continue
        drift = sum(float(roll[i, t] - logp[i, t]) for t in tokens[i]) / len(tokens[i])
        if cfg.opsm_delta is not None and adv[i] < 0 and drift > cfg.opsm_delta:
            continue
        resp = 0.0
        for t in tokens[i]:
            if (i, t) in m2:
                continue
            w = min(math.exp(float(old[i, t] - roll[i, t])), cfg.is_cap)
            r = math.exp(float(logp[i, t] - old[i, t]))
            if (adv[i] > 0 and r > 1 + cfg.eps_high) or (adv[i] < 0 and r < 1 - cfg.eps_low):
                continue
            resp += w * r * float(adv[i])
        total += resp / len(tokens[i]) if aggregation == "seq_mean_token_mean" else resp
    return -total / normalizer


@pytest.mark.parametrize("aggregation", ["token_sum", "token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("seed", range(4))
def test_every_correction_together_matches_a_plain_python_reference(aggregation, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 5
    roll = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = roll + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    cfg = LossConfig(
        reject="sequence_geo",
        reject_low=0.9,
        reject_high=1.1,
        opsm_delta=0.1,
        m2_threshold=0.05,
        aggregation=aggregation,
    )
    loss, m = policy_loss(logp, old, roll, adv, mask, cfg, normalizer=7.0)
    assert float(loss) == pytest.approx(
        _reference_minirl(logp.detach(), old, roll, adv, mask, cfg, 7.0, aggregation), rel=1e-10, abs=1e-12
    )
    # the gradient, by central finite differences of the reference in each kept coordinate
    loss.backward()
    eps = 1e-6
    for i, t in [(i, t) for i in range(B) for t in range(T) if mask[i, t]][::3]:
        up, down = logp.detach().clone(), logp.detach().clone()
        up[i, t] += eps
        down[i, t] -= eps
        # the masks are fixed at logp (stop-gradient): evaluate the reference with them held
        fd = (
            _fixed(up, logp, old, roll, adv, mask, cfg, aggregation)
            - _fixed(down, logp, old, roll, adv, mask, cfg, aggregation)
        ) / (2 * eps)
        assert float(logp.grad[i, t]) == pytest.approx(fd, rel=1e-5, abs=1e-8)
    assert 0 <= m["masked/m2"] <= 1 and m["n_responses"] == B


def _fixed(x, at, old, roll, adv, mask, cfg, aggregation):
    """The reference objective at ``x`` with every stop-gradient decision (masks, clipping) taken at ``at``."""
    B, T = x.shape
    base = _reference_terms(at.detach(), old, roll, adv, mask, cfg)
    total = 0.0
    for i in range(B):
        n = int(mask[i].sum())
        resp = sum(base[i][t] * math.exp(float(x[i, t] - old[i, t])) for t in base[i])
        total += resp / n if aggregation == "seq_mean_token_mean" else resp
    return -total / 7.0


def _reference_terms(logp, old, roll, adv, mask, cfg):
    """Per kept token, the coefficient c with term = c * r (MiniRL: w * A)."""
    B, T = logp.shape
    out = {}
    tokens = [[t for t in range(T) if mask[i, t]] for i in range(B)]
    m2 = _reference_m2(logp, roll, tokens, cfg.m2_threshold)
    for i in range(B):
        out[i] = {}
        geo = math.exp(sum(float(old[i, t] - roll[i, t]) for t in tokens[i]) / len(tokens[i]))
        drift = sum(float(roll[i, t] - logp[i, t]) for t in tokens[i]) / len(tokens[i])
        if not cfg.reject_low <= geo <= cfg.reject_high or (adv[i] < 0 and drift > cfg.opsm_delta):
            continue
        for t in tokens[i]:
            r = math.exp(float(logp[i, t] - old[i, t]))
            if (i, t) in m2 or (adv[i] > 0 and r > 1 + cfg.eps_high) or (adv[i] < 0 and r < 1 - cfg.eps_low):
                continue
            out[i][t] = min(math.exp(float(old[i, t] - roll[i, t])), cfg.is_cap) * float(adv[i])
    return out


def _reference_m2(logp, roll, tokens, threshold) -> set:
    """M2PO by its definition, with loops: the largest d = (log pi - log mu)^2 (ties by row, then
    position) removed one by one while the mean of the rest exceeds the threshold."""
    if threshold is None:
        return set()
    d_all = sorted(
        ((float(logp[i, t] - roll[i, t]) ** 2, i, t) for i in range(len(tokens)) for t in tokens[i]),
        key=lambda x: (-x[0], x[1], x[2]),
    )
    vals = [x[0] for x in d_all]
    k = 0
    while k < len(vals) and sum(vals[k:]) / (len(vals) - k) > threshold:
        k += 1
    return {(i, t) for _, i, t in d_all[:k]}


# ---------------------------------------------------------------------------------------------
# composition: every algorithm, clipping on and off; a dropped token has no gradient and the kept
# ones have exactly the gradient they have without the corrections
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("clip", [True, False])
def test_corrections_compose_with_every_algorithm(algorithm, clip):
    g = torch.Generator().manual_seed(1)
    B, T = 8, 6
    roll = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = roll + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    base_logp = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    on = LossConfig(
        algorithm=algorithm,
        clip=clip,
        reject="sequence_geo",
        reject_low=0.85,
        reject_high=1.15,
        opsm_delta=0.05,
        m2_threshold=0.04,
    )
    off = LossConfig(algorithm=algorithm, clip=clip)
    grads = []
    for cfg in (on, off):
        logp = base_logp.clone().requires_grad_(True)
        loss, m = policy_loss(logp, old, roll, adv, mask, cfg, normalizer=10.0)
        assert torch.isfinite(loss)
        loss.backward()
        grads.append((logp.grad, m))
    (g_on, m_on), (g_off, _) = grads
    dropped = (
        reject_sequences(old, roll, mask, 0.85, 1.15)[:, None]
        | opsm_sequences(base_logp, roll, adv, mask, 0.05)[:, None]
    )
    dropped = dropped | m2_tokens(base_logp, roll, mask, 0.04)
    assert dropped.any() and (~dropped).any()
    assert g_on[dropped].abs().sum() == 0
    if algorithm != "gspo":  # token-level algorithms: a kept token's gradient is untouched
        assert torch.allclose(g_on[~dropped], g_off[~dropped], rtol=1e-12, atol=1e-15)
    assert m_on["masked/reject"] + m_on["masked/opsm"] + m_on["masked/m2"] > 0


# ---------------------------------------------------------------------------------------------
# bad values name the key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,key",
    [
        ("loss.opsm_delta=-0.1", "loss.opsm_delta"),
        ("loss.m2_threshold=0", "loss.m2_threshold"),
        ("loss.reject=token", "loss.reject"),
        ("loss.reject_high=0.9", "reject_low"),
    ],
)
def test_bad_values_are_rejected_with_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_config(RunConfig, None, [override])


# ---------------------------------------------------------------------------------------------
# M2PO's mask is a property of the mini-batch: micro-batch size changes nothing
# ---------------------------------------------------------------------------------------------
def test_m2po_in_training_does_not_depend_on_micro_batch_size(sft_ckpt, tmp_path):
    from stablerl import checkpoint
    from stablerl.loop import Trainer
    from stablerl.runlog import read_metrics

    common = [
        f"model.path={sft_ckpt}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "task.levels=[1]",
        "task.eval_size=4",
        "eval.every=5",
        "log.progress=false",
        "log.tensorboard=false",
        "train.steps=2",
        "batch.minibatches_per_step=2",
        "loss.m2_threshold=1e-6",
        "optim.lr=1e-3",
        "loss.opsm_delta=0.001",
    ]
    rows, weights = [], []
    for micro in (128, 3):
        run = tmp_path / f"m{micro}"
        cfg = build_config(RunConfig, None, [*common, f"run_dir={run}", f"batch.micro_batch_size={micro}"])
        Trainer(cfg, run, log=lambda *_: None).run()
        rows.append(read_metrics(run))
        weights.append(checkpoint.load_model_weights(checkpoint.latest(run)))
    assert any(r.get("masked/m2", 0) > 0 for r in rows[0][1:])  # it did mask something
    for a, b in zip(*rows):
        for k in ("masked/m2", "masked_responses/m2", "masked/opsm", "n_tokens_contrib"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    for k in weights[0]:
        assert float((weights[0][k] - weights[1][k]).norm()) <= 1e-5 * float(weights[0][k].norm()), k
