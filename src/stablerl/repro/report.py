"""Tables and figures for `stablerl repro`, from the runs' metrics.jsonl.

Collapse (the definition every table uses; it catches both directions the paper saw): a run
collapsed at step c when, from c to its end,

- its training reward (moving average over 20 optimizer steps' worth of rollouts, after the
  first 20 optimizer steps) stays below half of its running peak — whatever its entropy does: the report says whether the entropy *dropped*
  (below half its initial level, the paper's collapse without IS) or *blew up* (above twice it,
  off-policy without clipping or replay) by then; or
- its entropy (moving average over 10 optimizer steps' worth) stays above 3x its initial level
  (the median over the first 10 optimizer steps' worth): a policy dissolving into noise, even before the reward has fallen; or
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

import csv
import json
import statistics
from pathlib import Path

from stablerl.plot import moving_average
from stablerl.repro.experiments import EXPERIMENTS
from stablerl.repro.runner import run_dir_of
from stablerl.runlog import read_metrics

KL_SPIKE = 5e-3
REWARD_WINDOW, ENTROPY_WINDOW = 20, 10  # in optimizer steps (the same data at every N)

# (metric, title, moving-average window in optimizer steps)
CURVES = (("reward_mean", "training reward", 10), ("eval/sampled_acc", "held-out accuracy (sampled)", 1),
          ("entropy", "token entropy", 10), ("train_infer_kl", "training-inference KL (k3)", 10),
          ("route_agreement/train_infer", "routing agreement (train vs infer)", 10))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
    return ([s for s, _ in pts], [v for _, v in pts]) if pts else ([], [])


def _rollout_steps(optimizer_steps: int, n: int) -> int:
    return max(1, optimizer_steps // n)


def collapse(rows: list[dict], aborted: bool = False, window: int = REWARD_WINDOW, n: int = 1) -> tuple[int | None, str]:
    """``(optimizer step of the collapse or None, how)`` by the module's definition; ``rows`` are
    per rollout step, ``n`` is the run's mini-batches per rollout step and ``window`` is in
    optimizer steps (steps are reported as optimizer steps)."""
    steps, rewards = _series(rows, "reward_mean")
    if aborted:
        return ((steps[-1] + 1) * n if steps else 0), "stopped: non-finite"
    window = _rollout_steps(window, n)
    e_window = _rollout_steps(ENTROPY_WINDOW, n)
    e_steps, entropy = _series(rows, "entropy")
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


def collapse_step(rows: list[dict], aborted: bool = False, window: int = REWARD_WINDOW) -> int | None:
    return collapse(rows, aborted, window)[0]


def _minibatches(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "config.json").read_text())["batch"]["minibatches_per_step"])
    except (OSError, ValueError, KeyError):
        return 1


def finished_runs(name: str, out: Path, seeds: int) -> dict[str, list[tuple[dict, list[dict], int]]]:
    """Per variant, ``(summary, metrics rows, N)`` of every finished run (one with a
    summary.json), read once for the table and the figures."""
    runs = {}
    for variant in EXPERIMENTS[name]["variants"]:
        dirs = [run_dir_of(out, name, variant, s) for s in range(seeds)]
        runs[variant] = [(json.loads((d / "summary.json").read_text()), read_metrics(d), _minibatches(d))
                         for d in dirs if (d / "summary.json").exists()]
    return runs


def run_stats(summary: dict, rows: list[dict], n: int = 1) -> dict:
    evals = [r["eval/sampled_acc"] for r in rows if "eval/sampled_acc" in r]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r][-_rollout_steps(REWARD_WINDOW, n):]

    def values(key: str) -> list[float]:
        return [r[key] for r in rows if key in r and r[key] == r[key]]

    def mean_of(key: str) -> float:
        vals = values(key)
        return sum(vals) / len(vals) if vals else float("nan")

    kls = values("train_infer_kl")
    step, how = collapse(rows, bool(summary.get("aborted")), n=n)
    return {"final_acc": evals[-1] if evals else float("nan"), "peak_acc": max(evals) if evals else float("nan"),
            "initial_acc": evals[0] if evals else float("nan"),
            "final_reward": sum(rewards) / len(rewards) if rewards else float("nan"),
            "collapse_step": step, "collapse_how": how,
            "mean_train_infer_kl": mean_of("train_infer_kl"), "mean_train_infer_kl_k1": mean_of("train_infer_kl_k1"),
            "seconds": summary.get("seconds", float("nan")),
            "max_kl": max(kls) if kls else float("nan"), "kl_spikes": sum(k > KL_SPIKE for k in kls),
            "route_agreement": mean_of("route_agreement/train_infer"), "entropy": mean_of("entropy"),
            "groups_all_wrong": mean_of("groups_all_wrong"), "is_frac_truncated": mean_of("is_frac_truncated")}


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def experiment_table(runs: dict[str, list[tuple[dict, list[dict], int]]]) -> list[dict]:
    table = []
    for variant, finished in runs.items():
        stats = [run_stats(summary, rows, n) for summary, rows, n in finished]
        if not stats:
            continue
        collapsed = [s for s in stats if s["collapse_step"] is not None]
        table.append({
            "variant": variant, "seeds": len(stats),
            "initial_acc": _mean_std([s["initial_acc"] for s in stats]),
            "final_acc": _mean_std([s["final_acc"] for s in stats]),
            "peak_acc": _mean_std([s["peak_acc"] for s in stats]),
            "final_reward": _mean_std([s["final_reward"] for s in stats]),
            "collapsed": f"{len(collapsed)}/{len(stats)}",
            "collapse_steps": ",".join(str(s["collapse_step"]) for s in collapsed) or "-",
            "collapse_how": "; ".join(sorted({s["collapse_how"] for s in collapsed})) or "-",
            "mean_train_infer_kl": f"{_mean([s['mean_train_infer_kl'] for s in stats]):.2e}",
            "mean_train_infer_kl_k1": f"{_mean([s['mean_train_infer_kl_k1'] for s in stats]):.2e}",
            "run_seconds": f"{_mean([s['seconds'] for s in stats]):.0f}",
            "max_train_infer_kl": ",".join(f"{s['max_kl']:.1e}" for s in stats),
            "kl_spike_steps": ",".join(str(s["kl_spikes"]) for s in stats),
            "route_agreement": f"{_mean([s['route_agreement'] for s in stats]):.4f}",
            "entropy": f"{_mean([s['entropy'] for s in stats]):.3f}",
            "groups_all_wrong": f"{_mean([s['groups_all_wrong'] for s in stats]):.2f}",
            "is_frac_truncated": f"{_mean([s['is_frac_truncated'] for s in stats]):.1e}",
        })
    return table


def write_report(name: str, out: Path, seeds: int) -> dict[str, Path]:
    runs = finished_runs(name, out, seeds)
    table = experiment_table(runs)
    dest = out / name
    dest.mkdir(parents=True, exist_ok=True)
    paths = {"csv": dest / "table.csv", "json": dest / "table.json", "md": dest / "table.md",
             "png": dest / "curves.png"}
    if table:
        with paths["csv"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        paths["json"].write_text(json.dumps(table, indent=1))
        head = "| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]) + "\n"
        paths["md"].write_text(head + "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n" for row in table))
        plot_experiment(name, runs, paths["png"])
        if name == "dose-response":
            from stablerl.repro.dose import dose_points, dose_table, plot_dose_response

            points = dose_points(runs)
            paths["dose_md"] = dest / "dose_table.md"
            paths["dose_md"].write_text(dose_table(points))
            paths["dose_png"] = plot_dose_response(points, dest / "dose_response.png")
    return paths


def plot_experiment(name: str, runs: dict[str, list[tuple[dict, list[dict], int]]], path: Path) -> None:
    """One row of panels per group of variants (``EXPERIMENTS[name]["rows"]``, e.g. one per N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(EXPERIMENTS[name]["variants"])
    rows = EXPERIMENTS[name].get("rows") or {"": variants}
    fig, grid = plt.subplots(len(rows), len(CURVES), figsize=(5 * len(CURVES), 4 * len(rows)),
                             constrained_layout=True, squeeze=False)
    for axes, (row_title, row_variants) in zip(grid, rows.items()):
        for vi, variant in enumerate(row_variants):
            for ax, (key, title, smooth) in zip(axes, CURVES):
                series = []
                for _, metrics, n in runs[variant]:
                    xs, ys = _series(metrics, key)
                    if xs:
                        series.append(([x * n for x in xs], moving_average(ys, _rollout_steps(smooth, n))))
                if not series:
                    continue
                k = min(len(s[0]) for s in series)
                xs = series[0][0][:k]
                cols = list(zip(*[s[1][:k] for s in series]))
                label = variant.split("/")[-1]
                ax.plot(xs, [sum(c) / len(c) for c in cols], color=f"C{vi % 10}", label=label, lw=1.5)
                ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=f"C{vi % 10}", alpha=0.15)
                if key == "train_infer_kl":
                    ax.set_yscale("log")
        for ax, (_, title, _) in zip(axes, CURVES):
            ax.set_title(f"{row_title}: {title}" if row_title else title)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{EXPERIMENTS[name]['title']} (mean over seeds, band = min..max)")
    fig.savefig(path, dpi=56)
    plt.close(fig)
