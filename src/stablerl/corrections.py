"""Corrections that *drop* tokens or whole responses from the objective: pure tensor functions,
composed by ``objectives.policy_loss`` with every IS mode and algorithm (docs/objectives.md).

All three look only at stop-gradient quantities, so they change which terms carry gradient, never
the gradient of a kept term. A dropped token's weight is 0; the aggregation's normalizer is left
as it is (the same rule as ``is_mode=token_mask``): dropping never rescales the tokens kept.

- ``reject_sequences`` (``loss.reject=sequence_geo``): rejection sampling of whole responses by
  the geometric mean of their IS weights, exp(mean_t log w_t), w = pi_old / mu_old.
- ``opsm_sequences`` (``loss.opsm_delta``): off-policy sequence masking — a response with a
  negative advantage whose mean_t (log mu_old - log pi_theta) exceeds delta is dropped: the
  policy has moved away from what sampled it and the update would push it further.
- ``m2_tokens`` (``loss.m2_threshold``): M2PO's second-moment mask — the tokens with the largest
  (log pi_theta - log mu_old)^2 are masked until the mean over the rest is at most the threshold.
  The mask is a property of a whole mini-batch (every rank, every micro-batch): the learner
  computes it once per mini-batch and passes it in.
"""

from __future__ import annotations

import torch


def response_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response mean over response tokens, [B, T] -> [B]; empty rows give 0."""
    maskf = mask.to(x.dtype)
    return (x * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)


def reject_sequences(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """``[B]`` True for a response whose geometric-mean weight exp(mean_t log(pi_old/mu_old)) lies
    outside ``[low, high]`` (responses without tokens are never rejected)."""
    geo = response_mean(old_logp.detach().double() - rollout_logp.detach().double(), mask).exp()
    return ((geo < low) | (geo > high)) & mask.any(-1)


def opsm_sequences(
    logp: torch.Tensor, rollout_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, delta: float
) -> torch.Tensor:
    """``[B]`` True for a response with a negative advantage (its mean over its tokens, for
    token-level advantages) whose mean_t (log mu_old - log pi_theta) exceeds ``delta``."""
    drift = response_mean(rollout_logp.detach().double() - logp.detach().double(), mask)
    adv = advantages if advantages.dim() == 1 else response_mean(advantages.double(), mask)
    return (adv < 0) & (drift > delta) & mask.any(-1)


def m2_tokens(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, T]`` True for the tokens M2PO masks: the largest d = (log pi_theta - log mu_old)^2,
    removed one by one until the (``weight``-weighted) mean of d over the remaining tokens is at
    most ``threshold``; all of them when even the smallest exceeds it.

    Ties: tokens of equal d are removed in row-major order (row, then position), so the mask of a
    batch whose rows are in a fixed order (the learner orders by global row) is unique.
    """
    mask = mask.bool()
    d = (logp.detach().double() - rollout_logp.detach().double()).pow(2)[mask]
    w = torch.ones_like(d) if weight is None else weight.expand_as(mask).double()[mask]
    out = torch.zeros_like(mask)
    if d.numel() == 0:
        return out
    order = torch.sort(d, descending=True, stable=True).indices
    dw, ws = (d * w)[order], w[order]
    # remaining mean after removing the k largest, k = 0..n-1 (float64: no cancellation worth a token)
    removed_dw = torch.cat([dw.new_zeros(1), dw.cumsum(0)[:-1]])
    removed_w = torch.cat([ws.new_zeros(1), ws.cumsum(0)[:-1]])
    remaining = (dw.sum() - removed_dw) / (ws.sum() - removed_w).clamp(min=1e-300)
    ok = torch.nonzero(remaining <= threshold)
    k = int(ok[0]) if len(ok) else len(d)
    flat = torch.zeros_like(d, dtype=torch.bool)
    flat[order[:k]] = True
    out[mask] = flat
    return out
