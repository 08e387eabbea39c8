"""Policy objectives: pure tensor functions, no model code (docs/formulation.md sections 3-6).

Naming follows the paper: ``logp`` = log pi_theta (carries grad), ``old_logp`` = log pi_old
(training engine, before this round of updates), ``rollout_logp`` = log mu_old (the inference
engine that sampled the tokens). Two ratios decompose pi_theta / mu_old:

    w = pi_old / mu_old       training-inference discrepancy, corrected by IS (always stop-grad)
    r = pi_theta / pi_old     policy staleness, bounded by clipping

Every algorithm is a function ``(ctx) -> (token_term, clip_low, clip_high, active)`` registered in
``ALGORITHMS`` by name; ``policy_loss`` validates inputs, computes the IS weight, calls the
algorithm, aggregates with a constant or per-response normalizer and returns ``-objective``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from stablerl.config import AGGREGATIONS, IS_MODES, LossConfig
from stablerl.config import ALGORITHMS as ALGORITHM_NAMES
from stablerl.corrections import m2_tokens, opsm_sequences, reject_sequences, response_mean
from stablerl.diagnostics import k3
from stablerl.metrics import STALENESS_KL, TRAIN_INFER_KL, TRAIN_INFER_KL_K1, Reduce

__all__ = [
    "LossConfig",
    "policy_loss",
    "aggregation_normalizer",
    "importance_weights",
    "ALGORITHMS",
    "METRIC_REDUCTION",
]

# how policy_loss's metrics combine over micro-batches and ranks (the rest: token-weighted means)
METRIC_REDUCTION = {
    "loss": Reduce.SUM,
    "n_tokens": Reduce.SUM,
    "n_tokens_contrib": Reduce.SUM,
    "n_responses": Reduce.SUM,
    "is_weight_min": Reduce.MIN,
    "is_weight_max": Reduce.MAX,
    "ratio_max": Reduce.MAX,
}
# what each correction removed: masked/<technique> is a fraction of tokens, masked_responses/<technique>
# a fraction of responses (those that lost at least one token to it)
TECHNIQUES = ("is", "reject", "opsm", "m2")
METRIC_REDUCTION.update({f"masked_responses/{t}": Reduce.RESPONSE_MEAN for t in TECHNIQUES})


# --------------------------------------------------------------------------------------------
# Input validation: bad input is a ValueError naming the argument, never a silent NaN loss.
# --------------------------------------------------------------------------------------------
def _validate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and values; return (bool mask [B, T], advantages broadcast to [B, T])."""
    named = {"logp": logp, "old_logp": old_logp, "rollout_logp": rollout_logp, "advantages": advantages, "mask": mask}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    for name in ("old_logp", "rollout_logp", "mask"):
        if named[name].shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(named[name].shape)}, expected {tuple(logp.shape)} like logp")
    for name in ("logp", "old_logp", "rollout_logp"):
        if not named[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {named[name].dtype}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or contain only 0 and 1")
        mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("mask has no response tokens: there is nothing to compute a loss on")
    B, T = logp.shape
    if advantages.shape == (B,):
        advantages = advantages[:, None].expand(B, T)
    elif advantages.shape != (B, T):
        raise ValueError(f"advantages must have shape [B]=({B},) or [B, T]=({B}, {T}), got {tuple(advantages.shape)}")
    # Padding positions may hold anything (engines pad with 0, -inf or garbage); only the values
    # that enter the loss must be finite.
    for name in ("logp", "old_logp", "rollout_logp", "advantages"):
        t = advantages if name == "advantages" else named[name]
        bad = (~torch.isfinite(t.detach())) & mask
        if bool(bad.any()):
            raise ValueError(f"{name} has {int(bad.sum())} NaN/inf values at response-mask positions")
    return mask, advantages


# --------------------------------------------------------------------------------------------
# IS correction of the training-inference discrepancy.
# --------------------------------------------------------------------------------------------


def importance_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IS weight on w = pi_old/mu_old for every token, stop-gradient.

    Returns ``(weight, truncated, dropped)``, all ``[B, T]``: the weight to multiply each token
    term by (0 for dropped tokens) and boolean maps of the tokens whose weight was truncated or
    that were dropped. The sequence modes use one weight per response, the geometric mean of its
    token ratios ``exp(mean_t log w_t)``: unlike the product it does not explode or vanish with
    response length, so one cap fits responses of every length.
    """
    log_w = torch.where(mask, old_logp.detach() - rollout_logp.detach(), torch.zeros_like(old_logp))
    if cfg.is_mode.startswith("sequence"):
        log_w = response_mean(log_w, mask)[:, None].expand_as(log_w)
    w = log_w.exp()
    no = torch.zeros_like(mask)
    if cfg.is_mode == "none":
        return torch.ones_like(w), no, no
    if cfg.is_mode.endswith("truncate"):
        truncated = (w > cfg.is_cap) & mask
        return w.clamp(max=cfg.is_cap), truncated, no
    if cfg.is_mode.endswith("mask"):
        keep = (w >= cfg.is_low) & (w <= cfg.is_cap)
        return torch.where(keep, w, torch.zeros_like(w)), no, (~keep) & mask
    raise ValueError(f"unknown is_mode {cfg.is_mode!r}; allowed: {', '.join(IS_MODES)}")


# --------------------------------------------------------------------------------------------
# The algorithms. Each returns the per-token objective term whose gradient is the algorithm's
# gradient, plus where the clip is active and which tokens can carry gradient.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ctx:
    logp: torch.Tensor  # log pi_theta, grad, zero at padding
    log_r: torch.Tensor  # log pi_theta - sg[log pi_old], grad
    adv: torch.Tensor  # [B, T]
    is_weight: torch.Tensor  # [B, T], no grad
    mask: torch.Tensor  # [B, T] bool
    cfg: LossConfig
    rollout_logp: torch.Tensor | None = None  # [B, T] log mu_old, no grad (DPPO's anchor)

    @property
    def lo(self) -> float:
        return 1.0 - self.cfg.eps_low if self.cfg.clip else 0.0

    @property
    def hi(self) -> float:
        return 1.0 + self.cfg.eps_high if self.cfg.clip else float("inf")


Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _ppo_clip_masks(ratio: torch.Tensor, ctx: _Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that PPO's clip stops: moved past the bound in the advantage's direction."""
    ratio = ratio.detach()
    low = (ctx.adv < 0) & (ratio < ctx.lo) & ctx.mask
    high = (ctx.adv > 0) & (ratio > ctx.hi) & ctx.mask
    return low, high


def _minirl(ctx: _Ctx) -> Terms:
    """docs/formulation.md s.6: M * sg[w] * r * A. Gradient of a kept token: w * r * A * grad log pi."""
    r = ctx.log_r.exp()
    low, high = _ppo_clip_masks(r, ctx)
    keep = ctx.mask & ~low & ~high
    # where (not multiply) so an overflowing ratio on a stopped token cannot turn into 0 * inf.
    term = torch.where(keep, ctx.is_weight * r * ctx.adv, torch.zeros_like(r))
    return term, low, high, keep & (ctx.is_weight != 0)


def _clipped_surrogate(ratio: torch.Tensor, ctx: _Ctx) -> Terms:
    """sg[w] * min(ratio A, clip(ratio) A): PPO's clipped surrogate on a per-token ratio (GRPO) or
    on a per-response ratio broadcast to its tokens (GSPO)."""
    low, high = _ppo_clip_masks(ratio, ctx)
    clipped = ratio.clamp(min=ctx.lo, max=ctx.hi)
    term = ctx.is_weight * torch.minimum(ratio * ctx.adv, clipped * ctx.adv)
    keep = ctx.mask & ~low & ~high
    return torch.where(ctx.mask, term, torch.zeros_like(term)), low, high, keep & (ctx.is_weight != 0)


def _grpo(ctx: _Ctx) -> Terms:
    """sg[w] * min(r A, clip(r) A): the PPO/GRPO clipped surrogate (same gradient as MiniRL)."""
    return _clipped_surrogate(ctx.log_r.exp(), ctx)


def _cispo(ctx: _Ctx) -> Terms:
    """sg[clip(r)] * sg[w] * A * log pi: clips the weight, never the gradient of a token."""
    r = ctx.log_r.detach().exp()
    low = (r < ctx.lo) & ctx.mask
    high = (r > ctx.hi) & ctx.mask
    term = r.clamp(min=ctx.lo, max=ctx.hi) * ctx.is_weight * ctx.adv * ctx.logp
    return torch.where(ctx.mask, term, torch.zeros_like(term)), low, high, ctx.mask & (ctx.is_weight != 0)


def _gspo(ctx: _Ctx) -> Terms:
    """Sequence-level ratio s = exp(mean_t log r_t) with PPO clipping, broadcast to tokens.

    With ``seq_mean_token_mean`` this is GSPO's per-response objective min(s A, clip(s) A);
    with ``token_sum`` every token carries s A, i.e. gradient s * A * sum_t grad log pi_t.
    """
    s = response_mean(ctx.log_r, ctx.mask).exp()[:, None].expand_as(ctx.log_r)
    return _clipped_surrogate(s, ctx)


def _reinforce(ctx: _Ctx) -> Terms:
    """sg[w] * A * log pi: plain policy gradient with IS correction, no staleness ratio."""
    term = ctx.is_weight * ctx.adv * ctx.logp
    no = torch.zeros_like(ctx.mask)
    return torch.where(ctx.mask, term, torch.zeros_like(term)), no, no, ctx.mask & (ctx.is_weight != 0)


def dppo_divergence(logp: torch.Tensor, rollout_logp: torch.Tensor, divergence: str) -> torch.Tensor:
    """DPPO's signed divergence of each sampled token between pi_theta and mu (no gradient): tv is
    the probability difference p - q (p = pi_theta, q = mu); binary_kl is KL(Bernoulli(q) ||
    Bernoulli(p)) of the token, with the sign of p - q (the direction it moved)."""
    p, q = logp.detach().exp(), rollout_logp.detach().exp()
    if divergence == "tv":
        return p - q
    if divergence == "binary_kl":
        # q log(q/p) + (1-q) log((1-q)/(1-p)); log1p(-x) keeps 1 - p accurate near p = 0
        one_minus = torch.log1p(-q.clamp(max=1 - 1e-7)) - torch.log1p(-p.clamp(max=1 - 1e-7))
        kl = q * (rollout_logp.detach() - logp.detach()) + (1 - q) * one_minus
        return torch.sign(p - q) * kl.clamp(min=0)
    raise ValueError(f"unknown dppo_divergence {divergence!r}; allowed: tv, binary_kl")


def _dppo(ctx: _Ctx) -> Terms:
    """DPPO: M * sg[w] * r * A, where M drops a token whose divergence from mu (``dppo_divergence``)
    moved past the threshold in its advantage's direction — pi_theta - mu > delta_high for A > 0,
    < -delta_low for A < 0 — in place of PPO's ratio clip. Gradient of a kept token: w r A grad log
    pi (with w = pi_old/mu uncapped, that is pi_theta/mu A grad log pi, prime-rl's)."""
    cfg = ctx.cfg
    d = dppo_divergence(ctx.logp, ctx.rollout_logp, cfg.dppo_divergence)
    low = (ctx.adv < 0) & (d < -cfg.dppo_delta_low) & ctx.mask
    high = (ctx.adv > 0) & (d > cfg.dppo_delta_high) & ctx.mask
    r = ctx.log_r.exp()
    keep = ctx.mask & ~low & ~high
    term = torch.where(keep, ctx.is_weight * r * ctx.adv, torch.zeros_like(r))
    return term, low, high, keep & (ctx.is_weight != 0)


# the registry: algorithm ``name`` is the function ``_name`` of this module; the names themselves
# are defined once, in ``stablerl.config.ALGORITHMS`` (which the config validates against)
ALGORITHMS: dict[str, Callable[[_Ctx], Terms]] = {name: globals()[f"_{name}"] for name in ALGORITHM_NAMES}


# --------------------------------------------------------------------------------------------
# Aggregation. The normalizer is a property of the whole (mini-)batch, so gradient accumulation
# over micro-batches is exact when every micro-batch is given the same normalizer.
# --------------------------------------------------------------------------------------------
def aggregation_normalizer(mask: torch.Tensor, aggregation: str, max_response_len: int | None = None) -> float:
    """The denominator ``aggregation`` uses, computed over a whole (mini-)batch.

    token_sum: responses x max response length (a constant: per-response length normalization
    would break the first-order argument, docs/formulation.md s.6); token_mean: response tokens;
    seq_mean_token_mean: responses with at least one token. Compute it once on the batch that
    makes one optimizer step and pass it to every micro-batch's ``policy_loss`` call.
    """
    if aggregation == "token_sum":
        return float(mask.shape[0] * (max_response_len or mask.shape[1]))
    if aggregation == "token_mean":
        return float(mask.sum())
    if aggregation == "seq_mean_token_mean":
        return float((mask.sum(-1) > 0).sum())
    raise ValueError(f"unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


def _aggregate(term: torch.Tensor, mask: torch.Tensor, aggregation: str, normalizer: float) -> torch.Tensor:
    if aggregation == "seq_mean_token_mean":
        return response_mean(term, mask).sum() / normalizer
    return (term * mask.to(term.dtype)).sum() / normalizer


# --------------------------------------------------------------------------------------------
# The public entry point.
# --------------------------------------------------------------------------------------------
def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    normalizer: float | None = None,
    m2_mask: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss (= -objective, to minimise) and metrics for one batch of sampled tokens.

    Args:
        logp: ``[B, T]`` log pi_theta of the sampled tokens; carries the gradient.
        old_logp: ``[B, T]`` log pi_old (training engine, weights before this round of updates).
        rollout_logp: ``[B, T]`` log mu_old (the inference engine that sampled the tokens).
        advantages: ``[B]`` (one per response) or ``[B, T]``.
        mask: ``[B, T]`` bool or 0/1; True at response tokens. Values at other positions are
            ignored (they may be NaN/inf).
        cfg: a :class:`LossConfig`.
        normalizer: the aggregation's denominator. Pass ``aggregation_normalizer(...)`` of the
            whole mini-batch when this call sees one micro-batch of it; ``None`` computes it on
            this call's batch.
        m2_mask: ``[B, T]`` the tokens M2PO masks (``corrections.m2_tokens`` of the whole
            mini-batch) when this call sees part of one; ``None`` computes it on this call's
            batch (with ``cfg.m2_threshold`` set).
        ref_logp: ``[B, T]`` log pi_ref of the frozen reference policy; required when
            ``cfg.kl_beta > 0`` (the KL penalty), reported as ``kl_ref`` whenever given.

    Metrics: see ``METRICS_DOC``; token fractions are over the response tokens of this call.
    """
    logp, old_logp, rollout_logp, adv, mask, normalizer = _inputs(
        logp, old_logp, rollout_logp, advantages, mask, cfg, normalizer
    )

    is_weight, truncated, dropped = importance_weights(old_logp, rollout_logp, mask, cfg)
    removed = _corrections(logp, old_logp, rollout_logp, adv, mask, cfg, m2_mask)
    present, kept = _present_and_kept(mask, removed, dropped)
    removed["is"] = dropped
    is_weight = torch.where(kept, is_weight, torch.zeros_like(is_weight))
    ctx = _Ctx(logp, logp - old_logp, adv, is_weight, mask=present, cfg=cfg, rollout_logp=rollout_logp)
    term, clip_low, clip_high, active = _algorithm(cfg.algorithm)(ctx)
    # where, not the zero weight alone: an overflowing ratio of a dropped token must not become 0 * inf
    term = torch.where(kept, term, torch.zeros_like(term))
    loss = -_aggregate(term, mask, cfg.aggregation, normalizer)
    kl = _reference_kl(logp, ref_logp, mask, cfg)
    if kl is not None and cfg.kl_beta > 0:  # every response token, dropped or clipped or not: a regularizer
        loss = loss + cfg.kl_beta * _aggregate(kl, mask, cfg.aggregation, normalizer)
    _check_finite(loss, ctx.log_r, mask)
    metrics = _metrics(
        loss, replace(ctx, mask=mask), old_logp, rollout_logp, truncated, dropped, clip_low, clip_high, active
    )
    metrics.update(_removal_metrics(removed, mask))
    if kl is not None:
        metrics["kl_ref"] = float(kl.detach()[mask].mean())
    return loss, metrics


METRICS_DOC = """``n_tokens``, ``n_tokens_contrib`` (tokens whose gradient weight is non-zero),
``clip_frac_low``/``clip_frac_high``, ``is_weight_mean/min/max`` (raw w over response tokens,
per-response geometric means in the sequence modes), ``is_frac_truncated``/``is_frac_masked``,
``train_infer_kl`` (k3 estimate of KL(mu_old || pi_old)), ``train_infer_kl_k1`` (its k1
estimate, mean of log mu_old - log pi_old, as the paper plots it), ``staleness_kl`` (k3 estimate of
KL(pi_old || pi_theta)), ``ratio_mean``/``ratio_max`` (r)."""


def _inputs(logp, old_logp, rollout_logp, advantages, mask, cfg, normalizer):
    """The checked inputs with every non-response position zeroed (so NaN/inf there is harmless),
    the log-probs of pi_old and mu and the advantages detached, and the aggregation's normalizer."""
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a stablerl LossConfig, got {type(cfg).__name__}")
    mask, adv = _validate(logp, old_logp, rollout_logp, advantages, mask)
    if normalizer is None:
        normalizer = aggregation_normalizer(mask, cfg.aggregation)
    if not (isinstance(normalizer, (int, float)) and normalizer > 0 and normalizer != float("inf")):
        raise ValueError(f"normalizer must be a positive finite number, got {normalizer!r}")
    zeros = torch.zeros_like(logp)
    logp = torch.where(mask, logp, zeros)
    old_logp = torch.where(mask, old_logp.detach(), zeros)
    rollout_logp = torch.where(mask, rollout_logp.detach(), zeros)
    adv = torch.where(mask, adv.detach().to(logp.dtype), zeros)
    return logp, old_logp, rollout_logp, adv, mask, normalizer


def _algorithm(name: str):
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(ALGORITHMS)}") from None


def _check_finite(loss: torch.Tensor, log_r: torch.Tensor, mask: torch.Tensor) -> None:
    """Inputs were finite, so a non-finite loss means the ratio overflowed (log r > ~88 in fp32):
    say so, loudly."""
    if not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError(
            f"policy_loss is not finite ({float(loss)}): max log-ratio log(pi_theta/pi_old) = "
            f"{float(log_r.detach()[mask].max()):.3g}; enable clipping or lower the learning rate"
        )


def _present_and_kept(mask, removed: dict, is_dropped) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the algorithm sees — a token the corrections removed is gone (GSPO's sequence
    ratio included), while is_mode's masked tokens keep their place with weight 0, as they always
    have — and of those, the ones that carry a weight."""
    present = mask.clone()
    for r in removed.values():
        present &= ~r
    return present, present & ~is_dropped


def _reference_kl(logp, ref_logp, mask, cfg: LossConfig) -> torch.Tensor | None:
    """The per-token KL to the reference (0 at padding), or None when there is no reference."""
    if ref_logp is None and cfg.kl_beta == 0:
        return None
    if ref_logp is None:
        raise ValueError(f"loss.kl_beta={cfg.kl_beta} needs ref_logp, the reference policy's log-probs")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)}, expected {tuple(logp.shape)} like logp")
    zeros = torch.zeros_like(logp)
    kl = kl_to_reference(logp, torch.where(mask, ref_logp.detach(), zeros), cfg.kl_estimator)
    return torch.where(mask, kl, zeros)


def _removal_metrics(removed: dict, mask) -> dict[str, float]:
    n_tokens, n_resp = mask.sum().clamp(min=1), mask.any(-1)
    out = {"n_responses": float(n_resp.sum())}
    for name, r in removed.items():
        out[f"masked/{name}"] = float((r & mask).sum() / n_tokens)
        out[f"masked_responses/{name}"] = float((r & mask).any(-1)[n_resp].float().mean())
    return out


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) at the sampled tokens, with pi_theta's gradient
    (Schulman's k1, k2, k3; k3 = ref/pi - 1 - log(ref/pi) is GRPO's)."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown kl_estimator {estimator!r}; allowed: k1, k2, k3")


def _corrections(
    logp, old_logp, rollout_logp, advantages, mask, cfg: LossConfig, m2_mask: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """``[B, T]`` maps of the tokens each dropping correction removes (``stablerl.corrections``)."""
    none = torch.zeros_like(mask)
    out = {"reject": none, "opsm": none, "m2": none}
    if cfg.reject == "sequence_geo":
        out["reject"] = reject_sequences(old_logp, rollout_logp, mask, cfg.reject_low, cfg.reject_high)[:, None] & mask
    if cfg.opsm_delta is not None:
        out["opsm"] = opsm_sequences(logp, rollout_logp, advantages, mask, cfg.opsm_delta)[:, None] & mask
    if m2_mask is not None:
        if m2_mask.shape != mask.shape:
            raise ValueError(f"m2_mask has shape {tuple(m2_mask.shape)}, expected {tuple(mask.shape)} like logp")
        out["m2"] = m2_mask.bool() & mask
    elif cfg.m2_threshold is not None:
        out["m2"] = m2_tokens(logp, rollout_logp, mask, cfg.m2_threshold)
    return out


@torch.no_grad()
def _metrics(loss, ctx, old_logp, rollout_logp, truncated, dropped, clip_low, clip_high, active) -> dict[str, float]:
    mask = ctx.mask
    n = float(mask.sum())
    log_w = (old_logp - rollout_logp)[mask]
    log_r = ctx.log_r.detach()[mask]
    if ctx.cfg.is_mode.startswith("sequence"):
        # the weight a sequence mode applies: one geometric mean per non-empty response
        w_shown = response_mean(old_logp - rollout_logp, mask).exp()[mask.any(-1)]
    else:
        w_shown = log_w.exp()

    r = log_r.exp()
    return {
        "loss": float(loss.detach()),
        "n_tokens": n,
        "n_tokens_contrib": float(active.sum()),
        "clip_frac_low": float(clip_low.sum()) / n,
        "clip_frac_high": float(clip_high.sum()) / n,
        "is_weight_mean": float(w_shown.mean()),
        "is_weight_min": float(w_shown.min()),
        "is_weight_max": float(w_shown.max()),
        "is_frac_truncated": float(truncated.sum()) / n,
        "is_frac_masked": float(dropped.sum()) / n,
        TRAIN_INFER_KL: float(k3(log_w).mean()),
        # k1 = E_mu[log mu_old - log pi_old]: the estimate the paper plots (unbiased, but its
        # per-batch value can be negative); k3 above is the low-variance one we warn on
        TRAIN_INFER_KL_K1: float((-log_w).mean()),
        STALENESS_KL: float(k3(log_r).mean()),
        "ratio_mean": float(r.mean()),
        "ratio_max": float(r.max()),
    }
