"""Metric names that more than one module reads, and how per-micro-batch metrics combine.

A metric is produced in one place (objectives, the learner, the loop, evaluation) and read in
others (the progress line, the collapse warning, plots, the run summary, the repro report). The
names those readers depend on are defined here once. A producer declares how each of its
metrics combines over micro-batches and ranks (``Reduce``) next to the code that computes it;
``reduce_metrics`` applies those declarations.
"""

from __future__ import annotations

from enum import Enum

# --- names read outside the module that produces them ---------------------------------------
REWARD_MEAN = "reward_mean"
ENTROPY = "entropy"
TRAIN_INFER_KL = "train_infer_kl"  # k3 estimate of KL(mu_old || pi_old) per token
TRAIN_INFER_KL_K1 = "train_infer_kl_k1"  # k1 estimate, as the paper plots it
STALENESS_KL = "staleness_kl"  # k3 estimate of KL(pi_old || pi_theta) per token
STALENESS_MEAN = "staleness/mean"  # policy versions between the sampler and pi_old (lag)
STALENESS_MAX = "staleness/max"
IN_FLIGHT_TOKENS = "staleness/in_flight_tokens"  # share of tokens sampled by a version newer than the step's oldest
# log.lag_kl: the training-inference mismatch split into the engine's and the lag's parts
LAG_ENGINE_KL = "lag/engine_kl"  # k3 of KL(mu || pi_v), v = the sampler's version
LAG_ENGINE_KL_K1 = "lag/engine_kl_k1"
LAG_KL_K1 = "lag/lag_kl_k1"  # k1 of KL(pi_v || pi_old) on mu's samples: train_infer_kl_k1 - engine
FIRST_ORDER_GAP = "first_order_gap"
# per response: sum_t log w_t = sum_t (log pi_old - log mu) over its tokens (the per-sequence
# mismatch; without IS the damage comes from its lower tail, w << 1): mean, 1st/5th percentile, min
SEQ_LOG_W_MEAN, SEQ_LOG_W_P01, SEQ_LOG_W_P05, SEQ_LOG_W_MIN = (
    "seq_log_w/mean",
    "seq_log_w/p01",
    "seq_log_w/p05",
    "seq_log_w/min",
)
GRAD_NORM = "grad_norm"
CLIP_FRAC_HIGH = "clip_frac_high"
IS_FRAC_TRUNCATED = "is_frac_truncated"
RESPONSE_LEN_MEAN = "response_len_mean"
GROUPS_ALL_WRONG = "groups_all_wrong"
# learning signal: groups whose rewards are all equal (zero advantages), and mini-batches without
# any non-zero advantage that took no optimizer step (optim.skip_empty_steps)
GROUPS_WITHOUT_SIGNAL = "groups_without_signal"
STEPS_SKIPPED = "steps_skipped"
ROUTE_TRAIN_INFER = "route_agreement/train_infer"  # training vs inference routes of the same tokens
ROUTE_STALE = "route_agreement/stale"  # current vs pi_old's training routes
EVAL_GREEDY = "eval/greedy_acc"
EVAL_SAMPLED = "eval/sampled_acc"
TRAIN_TOKENS = "train_tokens"


class Reduce(str, Enum):  # noqa: UP042 - str(member) is the member's name, which logs rely on
    """How one metric combines over micro-batches (and ranks)."""

    MEAN = "mean"  # a per-token quantity: weighted by the tokens it was measured on
    RESPONSE_MEAN = "response_mean"  # a per-response quantity: weighted by the responses it was measured on
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    SAME = "same"  # identical on every rank (e.g. a global gradient norm): rank 0's mean


def reduce_metrics(parts: list[dict[str, list]], rules: dict[str, Reduce]) -> dict[str, float]:
    """Combine ``{key: [(value, weight), ...]}`` of every rank, each key by its rule in
    ``rules`` (weighted mean when it has none); NaN entries are left out of means."""
    merged: dict[str, list] = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    out = {}
    for key, values in merged.items():
        rule = rules.get(key, Reduce.MEAN)
        if rule is Reduce.MIN:
            out[key] = min(v for v, _ in values)
        elif rule is Reduce.MAX:
            out[key] = max(v for v, _ in values)
        elif rule is Reduce.SUM:
            out[key] = sum(v for v, _ in values)
        elif rule is Reduce.SAME:
            own = parts[0].get(key, [])
            out[key] = sum(v for v, _ in own) / len(own) if own else float("nan")
        else:
            values = [(v, w) for v, w in values if v == v]
            total = sum(w for _, w in values)
            out[key] = sum(v * w for v, w in values) / total if total else float("nan")
    return out
