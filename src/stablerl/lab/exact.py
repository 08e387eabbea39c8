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
    if cfg.aggregation == "token_sum":
        normalizer = 1.0
    elif cfg.aggregation == "seq_mean_token_mean":
        normalizer = 1.0 / float((mu * space.lengths).sum())
    else:
        raise ValueError(f"the lab compares token_sum and seq_mean_token_mean, not {cfg.aggregation!r}")
    logp = token_logp(policy, space)
    loss, _ = policy_loss(logp, old_logp, rollout_logp, mu * advantage, space.mask, cfg, normalizer=normalizer)
    return -flat_grad(loss, policy)


def compare(g: torch.Tensor, g_true: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and relative error ||g - g*|| / ||g*|| against the true gradient."""
    cos = float(g @ g_true / (g.norm() * g_true.norm()).clamp(min=1e-300))
    rel = float((g - g_true).norm() / g_true.norm().clamp(min=1e-300))
    return {"cosine": cos, "rel_error": rel}
