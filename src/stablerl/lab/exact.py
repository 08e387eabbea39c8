"""Exact gradients by enumeration: the true sequence-level gradient and the expected gradient of
any token-level surrogate from ``stablerl.objectives``, with no sampling noise.

True objective (docs/formulation.md s.2):        J(theta) = sum_y pi_theta(y) R(y)
Expected surrogate gradient (s.3-6):  E_{y ~ mu_old}[ grad of the surrogate's per-response term ]

The surrogate is evaluated with the library's own ``policy_loss`` over the whole response space:
passing advantages ``mu_old(y) * A(y)`` makes its sum over responses the expectation under
mu_old. This is exact because every algorithm is positively homogeneous in A and its clip mask
depends only on A's sign.
"""

from __future__ import annotations

import torch

from stablerl.config import LossConfig
from stablerl.corrections import m2_tokens
from stablerl.lab.policy import EnumerablePolicy, ResponseSpace, token_logp
from stablerl.objectives import policy_loss


def flat_grad(value: torch.Tensor, policy: EnumerablePolicy) -> torch.Tensor:
    grads = torch.autograd.grad(value, list(policy.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def true_objective(policy: EnumerablePolicy, space: ResponseSpace) -> torch.Tensor:
    return (token_logp(policy, space).sum(-1).exp() * space.reward).sum()


def true_gradient(policy: EnumerablePolicy, space: ResponseSpace) -> torch.Tensor:
    """grad_theta J_seq(theta), exactly."""
    return flat_grad(true_objective(policy, space), policy)


def _normalizer(cfg: LossConfig, mu: torch.Tensor, space: ResponseSpace) -> float:
    if cfg.aggregation == "token_sum":
        return 1.0
    if cfg.aggregation == "seq_mean_token_mean":
        return 1.0 / float((mu * space.lengths).sum())
    raise ValueError(f"the lab compares token_sum and seq_mean_token_mean, not {cfg.aggregation!r}")


def _m2_mask(
    cfg: LossConfig, logp: torch.Tensor, rollout_logp: torch.Tensor, mu: torch.Tensor, space: ResponseSpace
) -> torch.Tensor | None:
    """M2PO's mask of the *expected* mini-batch: tokens weighted by the probability mu_old gives
    their response, so the mean it bounds is E_mu[sum_t d_t] / E_mu[|y|]."""
    if cfg.m2_threshold is None:
        return None
    return m2_tokens(logp.detach(), rollout_logp, space.mask, cfg.m2_threshold, weight=mu[:, None])


def surrogate_gradient(
    policy: EnumerablePolicy,
    space: ResponseSpace,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    cfg: LossConfig,
) -> torch.Tensor:
    """E_{y~mu_old}[gradient of the surrogate objective] for responses sampled from mu_old.

    The advantage is the infinite-group baseline A(y) = R(y) - E_mu[R]. Scale: ``token_sum``
    gives E_mu[sum_t term_t] (the scale of the true gradient); per-response length-normalized
    aggregations are multiplied by E_mu[|y|], the constant that would make them agree with
    ``token_sum`` if all responses had the same length, so relative errors compare like with like.
    """
    mu = rollout_logp.sum(-1).exp()
    advantage = space.reward - (mu * space.reward).sum()
    logp = token_logp(policy, space)
    loss, _ = policy_loss(
        logp,
        old_logp,
        rollout_logp,
        mu * advantage,
        space.mask,
        cfg,
        normalizer=_normalizer(cfg, mu, space),
        m2_mask=_m2_mask(cfg, logp, rollout_logp, mu, space),
    )
    return -flat_grad(loss, policy)


def policy_forward(policy: EnumerablePolicy, space: ResponseSpace) -> dict[str, torch.Tensor]:
    """What ``gradient_moments`` needs of one policy, computed once for every surrogate."""
    with torch.no_grad():
        h = torch.tanh(space.features @ policy.w1.T + policy.b1)  # [N, L, H]
        probs = torch.softmax(h @ policy.w2.T + policy.b2, dim=-1)  # [N, L, V]
        onehot = torch.nn.functional.one_hot(space.tokens.clamp(min=0), probs.shape[-1]).double()
        return {
            "h": h,
            "dlogp_dlogits": (onehot - probs) * space.mask[..., None],
            "gram_h": h @ h.transpose(1, 2),
            "gram_x": space.features @ space.features.transpose(1, 2),
        }


def gradient_moments(
    policy: EnumerablePolicy,
    space: ResponseSpace,
    coef: torch.Tensor,
    weight: torch.Tensor,
    forward: dict | None = None,
) -> tuple[torch.Tensor, float]:
    """With g(y) = sum_t coef[y, t] * grad_theta log pi(y_t | y_<t): ``sum_y weight(y) g(y)`` (flat,
    in ``flat_grad``'s parameter order) and ``sum_y weight(y) ||g(y)||^2``, worked out by hand for
    the lab's MLP. No per-response gradient is materialized: a weight matrix's per-response
    gradient is sum_t a_t x_t^T, whose squared norm is sum_{t,t'} (a_t . a_t')(x_t . x_t')."""
    x = space.features
    f = forward or policy_forward(policy, space)
    h = f["h"]
    with torch.no_grad():
        g_logits = coef[..., None] * f["dlogp_dlogits"]  # d(coef . log pi) / d logits
        g_pre = (g_logits @ policy.w2) * (1 - h * h)  # back through tanh
        wg_pre, wg_logits = g_pre * weight[:, None, None], g_logits * weight[:, None, None]
        mean = torch.cat(
            [
                (wg_pre.flatten(0, 1).T @ x.flatten(0, 1)).reshape(-1),
                wg_pre.sum((0, 1)),
                (wg_logits.flatten(0, 1).T @ h.flatten(0, 1)).reshape(-1),
                wg_logits.sum((0, 1)),
            ]
        )
        square = (
            (g_pre @ g_pre.transpose(1, 2) * f["gram_x"]).sum((1, 2))
            + g_pre.sum(1).pow(2).sum(1)
            + (g_logits @ g_logits.transpose(1, 2) * f["gram_h"]).sum((1, 2))
            + g_logits.sum(1).pow(2).sum(1)
        )
    return mean, float((weight * square).sum())


def surrogate_estimator(
    policy: EnumerablePolicy,
    space: ResponseSpace,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    cfg: LossConfig,
    logp: torch.Tensor | None = None,
    forward: dict | None = None,
) -> tuple[torch.Tensor, float]:
    """The surrogate's exact expected gradient (as ``surrogate_gradient``) and the total variance
    (trace of the covariance) of its one-sample estimator: the gradient of one response y ~ mu_old
    with the infinite-group advantage. Batch-level decisions (M2PO's mask) are those of the
    expected batch, held fixed."""
    mu = rollout_logp.sum(-1).exp()
    advantage = space.reward - (mu * space.reward).sum()
    logp = (token_logp(policy, space) if logp is None else logp).detach().requires_grad_(True)
    loss, _ = policy_loss(
        logp,
        old_logp,
        rollout_logp,
        advantage,
        space.mask,
        cfg,
        normalizer=_normalizer(cfg, mu, space),
        m2_mask=_m2_mask(cfg, logp, rollout_logp, mu, space),
    )
    coef = -torch.autograd.grad(loss, logp)[0]  # d (sum_y objective(y)) / d log pi(y_t)
    mean, second = gradient_moments(policy, space, coef, mu, forward)
    return mean, max(second - float(mean.pow(2).sum()), 0.0)


def compare(g: torch.Tensor, g_true: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and relative error ||g - g*|| / ||g*|| against the true gradient."""
    cos = float(g @ g_true / (g.norm() * g_true.norm()).clamp(min=1e-300))
    rel = float((g - g_true).norm() / g_true.norm().clamp(min=1e-300))
    return {"cosine": cos, "rel_error": rel}
