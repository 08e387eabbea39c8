"""Per-run statistics for `stablerl repro`'s tables and figures, from the runs' metrics.jsonl.

Collapse (the definition every table uses; it catches both directions the paper saw): a run
collapsed at step c when, from c to its end,

- its training reward (moving average over 20 optimizer steps' worth of rollouts, after the
  first 20 optimizer steps) stays below half of its running peak — whatever its entropy does: the
  report says whether the entropy *dropped* (below half its initial level, the paper's collapse
  without IS) or *blew up* (above twice it, off-policy without clipping or replay) by then; or
- its entropy (moving average over 10 optimizer steps' worth) stays above 3x its initial level
  (the median over the first 10 optimizer steps' worth): a policy dissolving into noise, even before
  the reward has fallen; or
- it was stopped for non-finite steps (collapsed at the step it stopped).

All steps and windows in the tables and figures are *optimizer* steps (rollout step x N), so
runs at different N, which make the same number of updates on the same amount of data, line up:
a window of W optimizer steps is W / N rollout steps of N mini-batches each, the same number of
responses at every N.

Per variant over seeds: final and peak held-out sampled accuracy (mean ± std), the training
reward averaged over the last 20 optimizer steps' worth of rollouts, how many seeds collapsed, at
which steps and how, the mean training-inference KL over all steps (k3, and k1 as the paper plots it), the mean wall
time of one run; then diagnostics: the largest KL of each seed and how many steps it spent above
``KL_SPIKE``, the mean routing agreement between training and inference, the mean fraction of
all-wrong groups (zero advantage) and of IS-truncated tokens.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from stablerl import metrics as M
from stablerl.plot import moving_average
from stablerl.repro.experiments import EXPERIMENTS
from stablerl.repro.records import read_record, record_path
from stablerl.repro.runner import run_dir_of
from stablerl.rundir import RunDir
from stablerl.runlog import read_metrics

KL_SPIKE = 5e-3
REWARD_WINDOW, ENTROPY_WINDOW = 20, 10  # in optimizer steps (the same data at every N)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
    return ([s for s, _ in pts], [v for _, v in pts]) if pts else ([], [])


def rollout_steps(optimizer_steps: int, n: int) -> int:
    return max(1, optimizer_steps // n)


def _stopped(rows: list[dict], n: int) -> tuple[int, str]:
    """Where a run stopped for non-finite steps collapsed: the step after its last logged one."""
    steps, _ = series(rows, M.REWARD_MEAN)
    return ((steps[-1] + 1) * n if steps else 0), "stopped: non-finite"


def collapse(
    rows: list[dict], aborted: bool = False, window: int = REWARD_WINDOW, n: int = 1
) -> tuple[int | None, str]:
    """``(optimizer step of the collapse or None, how)`` by the module's definition; ``rows`` are
    per rollout step, ``n`` is the run's mini-batches per rollout step and ``window`` is in
    optimizer steps (steps are reported as optimizer steps)."""
    if aborted:
        return _stopped(rows, n)
    steps, rewards = series(rows, M.REWARD_MEAN)
    window = rollout_steps(window, n)
    e_window = rollout_steps(ENTROPY_WINDOW, n)
    e_steps, entropy = series(rows, M.ENTROPY)
    e_ma = moving_average(entropy, e_window)
    h0 = statistics.median(entropy[:e_window]) if entropy else float("nan")

    def entropy_at(step: int) -> float:
        before = [v for s, v in zip(e_steps, e_ma) if s <= step]
        return before[-1] if before else float("nan")

    found: list[tuple[int, str]] = []
    ma = moving_average(rewards, window)
    peak, since = 0.0, None
    for s, v in zip(steps, ma):
        peak = max(peak, v)
        if s <= window:
            continue
        since = (s if since is None else since) if v < 0.5 * peak else None
    if since is not None:
        h = entropy_at(since)
        how = "reward fell" + (", entropy dropped" if h < 0.5 * h0 else ", entropy blew up" if h > 2 * h0 else "")
        found.append((since, how))
    since = None
    for s, v in zip(e_steps, e_ma):
        since = (s if since is None else since) if v > 3 * h0 else None
    if since is not None:
        found.append((since, "entropy blew up"))
    if not found:
        return None, ""
    step, how = min(found)
    return step * n, how


# ---------------------------------------------------------------------------------------------
# The pre-registered collapse definition (docs/notebook/preregistration.md s.3): C1, or C2 and C3.
# Steps in and out are optimizer steps; ``rows`` are per rollout step, ``n`` its mini-batches.
# ---------------------------------------------------------------------------------------------
C1_DROP, C1_HOLD = 0.15, 2  # accuracy below the running peak by this much, for this many evaluations
C2_FACTOR, C2_WINDOW = 10.0, 10  # k1 KL's running median this many times its early median
C3_BAND, C3_WINDOW, C3_SPAN = (0.5, 2.0), 10, 20  # entropy vs the reference run's, for this many steps


def _running_median(values: list[float], window: int) -> list[float]:
    return [statistics.median(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def collapse_c1(rows: list[dict], n: int = 1) -> int | None:
    """C1, performance collapse: the held-out sampled accuracy falls >= 0.15 below its running
    peak and stays below (that peak - 0.15) at every later evaluation, two evaluations at least."""
    steps, acc = series(rows, M.EVAL_SAMPLED)
    for i in range(1, len(acc)):
        peak = max(acc[:i])
        if len(acc) - i >= C1_HOLD and all(v <= peak - C1_DROP for v in acc[i:]):
            return steps[i] * n
    return None


def collapse_c2(rows: list[dict], n: int = 1) -> int | None:
    """C2, mismatch blow-up: the k1 training-inference KL's running median (10 optimizer steps)
    reaches >= 10x its median over the first 10 optimizer steps and stays there to the end."""
    steps, kl = series(rows, M.TRAIN_INFER_KL_K1)
    w = rollout_steps(C2_WINDOW, n)
    if len(kl) <= w:
        return None
    early = statistics.median(kl[:w])
    med = _running_median(kl, w)
    since = None
    for s, v in zip(steps[w:], med[w:]):
        since = (s if since is None else since) if early > 0 and v >= C2_FACTOR * early else None
    return None if since is None else since * n


def collapse_c3(rows: list[dict], reference: list[dict], n: int = 1) -> tuple[int | None, str]:
    """C3, entropy departure: the token entropy's running mean (10 optimizer steps) leaves
    [0.5x, 2x] the reference run's at the same step for >= 20 consecutive optimizer steps;
    ``(first step of the span, "drop" | "blow-up")``."""
    w, span = rollout_steps(C3_WINDOW, n), rollout_steps(C3_SPAN, n)
    steps, ent = series(rows, M.ENTROPY)
    ref_steps, ref = series(reference, M.ENTROPY)
    ref_at = dict(zip(ref_steps, moving_average(ref, w)))
    run = []
    for s, v in zip(steps, moving_average(ent, w)):
        r = ref_at.get(s)
        out = r is not None and r > 0 and not C3_BAND[0] * r <= v <= C3_BAND[1] * r
        run = run + [(s, v < r)] if out else []
        if len(run) >= span:
            return run[0][0] * n, "drop" if run[0][1] else "blow-up"
    return None, ""


def collapse_preregistered(
    rows: list[dict], reference: list[dict] | None, aborted: bool = False, n: int = 1
) -> tuple[int | None, str]:
    """The pre-registered definition: C1, or C2 and C3 (C3 needs the reference run; without one
    only C1 can decide). A run stopped for non-finite steps collapsed there."""
    if aborted:
        return _stopped(rows, n)
    c1 = collapse_c1(rows, n)
    if c1 is not None:
        return c1, "C1"
    c2 = collapse_c2(rows, n)
    c3, direction = collapse_c3(rows, reference, n) if reference is not None and c2 is not None else (None, "")
    if c2 is not None and c3 is not None:
        return max(c2, c3), f"C2+C3 ({direction})"
    return None, ""


def collapse_step(rows: list[dict], aborted: bool = False, window: int = REWARD_WINDOW) -> int | None:
    return collapse(rows, aborted, window)[0]


def minibatches_of(run_dir: Path) -> int:
    try:
        return int(json.loads(RunDir(run_dir).config.read_text())["batch"]["minibatches_per_step"])
    except (OSError, ValueError, KeyError):
        return 1


def finished_runs_by_seed(name: str, out: Path, seeds: int) -> dict[str, dict[int, tuple[dict, list[dict], int]]]:
    """Per variant and seed, ``(summary, metrics rows, N)`` of every finished run (one with a
    summary.json), read once for the tables and the figures: from its run directory, or, where
    that is gone, from its record (``stablerl.repro.records``)."""
    runs = {}
    for variant in EXPERIMENTS[name]["variants"]:
        runs[variant] = {}
        for s in range(seeds):
            d, record = run_dir_of(out, name, variant, s), record_path(out, name, variant, s)
            if RunDir(d).summary.exists():
                runs[variant][s] = (json.loads(RunDir(d).summary.read_text()), read_metrics(d), minibatches_of(d))
            elif record.is_file():
                runs[variant][s] = read_record(record)
    return runs


def finished_runs(name: str, out: Path, seeds: int) -> dict[str, list[tuple[dict, list[dict], int]]]:
    """Per variant, ``(summary, metrics rows, N)`` of every finished run, in seed order."""
    return {variant: list(by_seed.values()) for variant, by_seed in finished_runs_by_seed(name, out, seeds).items()}


def run_stats(summary: dict, rows: list[dict], n: int = 1) -> dict:
    evals = [r[M.EVAL_SAMPLED] for r in rows if M.EVAL_SAMPLED in r]
    rewards = [r[M.REWARD_MEAN] for r in rows if M.REWARD_MEAN in r][-rollout_steps(REWARD_WINDOW, n) :]

    def mean_of(key: str) -> float:
        return metric_mean(rows, key)

    kls = metric_values(rows, M.TRAIN_INFER_KL)
    step, how = collapse(rows, bool(summary.get("aborted")), n=n)
    return {
        "final_acc": evals[-1] if evals else float("nan"),
        "peak_acc": max(evals) if evals else float("nan"),
        "initial_acc": evals[0] if evals else float("nan"),
        "final_reward": sum(rewards) / len(rewards) if rewards else float("nan"),
        "collapse_step": step,
        "collapse_how": how,
        "mean_train_infer_kl": mean_of(M.TRAIN_INFER_KL),
        "mean_train_infer_kl_k1": mean_of(M.TRAIN_INFER_KL_K1),
        "seconds": summary.get("seconds", float("nan")),
        "max_kl": max(kls) if kls else float("nan"),
        "kl_spikes": sum(k > KL_SPIKE for k in kls),
        "route_agreement": mean_of(M.ROUTE_TRAIN_INFER),
        "entropy": mean_of(M.ENTROPY),
        "groups_all_wrong": mean_of(M.GROUPS_ALL_WRONG),
        "is_frac_truncated": mean_of(M.IS_FRAC_TRUNCATED),
        "staleness_max": max(metric_values(rows, M.STALENESS_MAX), default=float("nan")),
        # the pre-registered reading's per-run numbers (docs/notebook/preregistration.md s.3-4)
        "c1_step": collapse_c1(rows, n),
        "c2_step": collapse_c2(rows, n),
        "seq_log_w_p01": mean_of(M.SEQ_LOG_W_P01),
        "kl_spikes_per_opt_step": sum(k > KL_SPIKE for k in kls) / (len(kls) * n) if kls else float("nan"),
    }


def metric_values(rows: list[dict], key: str) -> list[float]:
    """A metric's logged values over a run's rows (rows without it, and NaNs, left out)."""
    return [r[key] for r in rows if key in r and r[key] == r[key]]


def metric_mean(rows: list[dict], key: str) -> float:
    """The mean of a metric over a run's rows (NaN when it was never logged)."""
    vals = metric_values(rows, key)
    return sum(vals) / len(vals) if vals else float("nan")


def mean_finite(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


# two-sided 95% quantiles of Student's t by degrees of freedom (1..10)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """Mean of per-seed paired differences and its 95% t-interval, or None below 2 pairs (no
    interval can be given from one pair)."""
    d = [x for x in diffs if x == x]
    if len(d) < 2:
        return None
    mean, half = statistics.mean(d), T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / len(d) ** 0.5
    return mean, mean - half, mean + half
