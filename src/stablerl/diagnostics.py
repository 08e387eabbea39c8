"""Stability diagnostics computed from tensors the training loop already has (docs/formulation.md s.4-5, 7).

All functions are pure and cheap; they return tensors or plain floats for logging.
"""

from __future__ import annotations

import torch


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimate of KL(q || p) from ``log(p/q)`` at samples drawn from q:
    ``ratio - 1 - log ratio`` (>= 0, unbiased, low variance; Schulman's "approximating KL").

    Computed as ``expm1(x) - x`` in float64: ``exp(x) - 1 - x`` in float32 cancels to noise (or
    exactly 0) for the small log-ratios of a well-matched engine (|x| ~ 1e-4 gives ~5e-9, below
    float32's resolution near 1), so a small mismatch would be rounded away instead of measured."""
    x = log_ratio.double()
    return torch.expm1(x) - x


def train_infer_kl(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Training-inference mismatch: k3 estimate of KL(mu_old || pi_old) per sampled token."""
    mask = mask.bool()
    return float(k3((old_logp - rollout_logp)[mask]).mean())


def is_weight_stats(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> dict[str, float]:
    """The distribution of the token IS weight w = pi_old / mu_old over sampled tokens:
    mean, min, max, quantiles, and the fractions outside [1/cap, cap]."""
    w = (old_logp - rollout_logp)[mask.bool()].double().exp()
    q = torch.quantile(w, torch.tensor([0.01, 0.5, 0.99], dtype=w.dtype))
    return {
        "is_weight_mean": float(w.mean()),
        "is_weight_min": float(w.min()),
        "is_weight_max": float(w.max()),
        "is_weight_p01": float(q[0]),
        "is_weight_p50": float(q[1]),
        "is_weight_p99": float(q[2]),
        "is_weight_frac_above_cap": float((w > cap).double().mean()),
        "is_weight_frac_below_inv_cap": float((w < 1 / cap).double().mean()),
    }


def first_order_gap(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per response, ``| prod_t rho_t - (1 + sum_t (rho_t - 1)) |`` with ``rho_t = pi_theta / mu_old``.

    How far the sequence-level ratio is from the first-order expansion the token-level surrogate
    uses (docs/formulation.md s.3): 0 when every token ratio is 1, growing with the products of deviations
    the surrogate drops. Returns ``[B]`` float64; the log sequence ratio is capped at 30 so a
    runaway response reads as huge rather than inf.
    """
    mask = mask.bool()
    log_rho = torch.where(mask, logp.double() - rollout_logp.double(), torch.zeros((), dtype=torch.float64))
    seq = log_rho.sum(-1).clamp(max=30).exp()
    first = 1 + ((log_rho.exp() - 1) * mask).sum(-1)
    return (seq - first).abs()


def route_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-layer fraction of positions whose top-k expert *set* is identical in ``a`` and ``b``
    (both ``[B, T, layers, top_k]``, as ``stablerl.routing.capture_routes`` records them).

    Positions where either side has no route (-1) are left out. Returns ``[layers]`` float32,
    NaN for a layer with no comparable position.
    """
    if a.shape != b.shape:
        raise ValueError(f"route tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    valid = (a[..., 0] >= 0) & (b[..., 0] >= 0)  # [B, T, L]
    same = (a.sort(-1).values == b.sort(-1).values).all(-1)
    n = valid.sum(dim=(0, 1)).to(torch.float)
    return (same & valid).sum(dim=(0, 1)).to(torch.float) / n


def route_agreement_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[2, layers]``: per layer, positions with the same top-k set, and comparable positions —
    the numerator and denominator of ``route_agreement``, which sum exactly over micro-batches
    and ranks."""
    if a.shape != b.shape:
        raise ValueError(f"route tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    valid = (a[..., 0] >= 0) & (b[..., 0] >= 0)
    same = (a.sort(-1).values == b.sort(-1).values).all(-1)
    return torch.stack([(same & valid).sum(dim=(0, 1)), valid.sum(dim=(0, 1))]).double()


def route_agreement_from_counts(counts: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix: mean over layers, prefix/layer_i: per layer}`` from summed ``route_agreement_counts``."""
    per_layer = counts[0] / counts[1]
    out = {prefix: float(per_layer.nanmean())}
    out.update({f"{prefix}/layer_{i}": float(v) for i, v in enumerate(per_layer)})
    return out
