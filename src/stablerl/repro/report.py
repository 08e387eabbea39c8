"""Tables and figures for `stablerl repro` from the runs' metrics.jsonl.

Collapse (precise definition): a run collapsed at step c if the 20-step moving average of its
training reward, after step 20, falls below half of its running peak at step c and never gets
back above that half until the run ends; a run stopped for non-finite steps also collapsed (at
the step it stopped). The table reports, per variant over seeds: final and peak held-out sampled
accuracy (mean ± std), the training reward averaged over the last 20 steps, how many seeds
collapsed and at which steps, the mean training-inference KL over all steps, and the mean wall
time of one run; then diagnostics: the largest training-inference KL of each seed and how many
steps it spent above ``KL_SPIKE`` (5e-3, ~5x its usual level here), the mean routing agreement
between training and inference, the mean fraction of all-wrong groups (zero advantage) and the
mean fraction of tokens whose IS weight was truncated.
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

CURVES = (("reward_mean", "training reward", 10), ("eval/sampled_acc", "held-out accuracy (sampled)", 1),
          ("entropy", "token entropy", 10), ("train_infer_kl", "training-inference KL", 10),
          ("route_agreement/train_infer", "routing agreement (train vs infer)", 10))


def collapse_step(rows: list[dict], aborted: bool = False, window: int = 20) -> int | None:
    steps = [r["step"] for r in rows if "reward_mean" in r]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    if aborted:
        return steps[-1] + 1 if steps else 0
    ma = moving_average(rewards, window)
    peak, below_since = 0.0, None
    for s, v in zip(steps, ma):
        peak = max(peak, v)
        if s <= window:
            continue
        if v < 0.5 * peak:
            below_since = s if below_since is None else below_since
        else:
            below_since = None
    return below_since


def finished_runs(name: str, out: Path, seeds: int) -> dict[str, list[tuple[dict, list[dict]]]]:
    """Per variant, ``(summary, metrics rows)`` of every finished run (one with a summary.json),
    read once for both the table and the figure."""
    runs = {}
    for variant in EXPERIMENTS[name]["variants"]:
        dirs = [run_dir_of(out, name, variant, s) for s in range(seeds)]
        runs[variant] = [(json.loads((d / "summary.json").read_text()), read_metrics(d))
                         for d in dirs if (d / "summary.json").exists()]
    return runs


def run_stats(summary: dict, rows: list[dict]) -> dict:
    evals = [r["eval/sampled_acc"] for r in rows if "eval/sampled_acc" in r]
    kls = [r["train_infer_kl"] for r in rows if "train_infer_kl" in r]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r][-20:]

    def mean_of(key: str) -> float:
        vals = [r[key] for r in rows if key in r and r[key] == r[key]]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"final_acc": evals[-1] if evals else float("nan"), "peak_acc": max(evals) if evals else float("nan"),
            "initial_acc": evals[0] if evals else float("nan"),
            "final_reward": sum(rewards) / len(rewards) if rewards else float("nan"),
            "collapse_step": collapse_step(rows, bool(summary.get("aborted"))),
            "mean_train_infer_kl": sum(kls) / len(kls) if kls else float("nan"),
            "seconds": summary.get("seconds", float("nan")),
            "max_kl": max(kls) if kls else float("nan"), "kl_spikes": sum(k > KL_SPIKE for k in kls),
            "route_agreement": mean_of("route_agreement/train_infer"),
            "groups_all_wrong": mean_of("groups_all_wrong"), "is_frac_truncated": mean_of("is_frac_truncated")}


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _mean_seconds(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    return f"{statistics.mean(xs):.0f}" if xs else "n/a"


def experiment_table(runs: dict[str, list[tuple[dict, list[dict]]]]) -> list[dict]:
    table = []
    for variant, finished in runs.items():
        stats = [run_stats(summary, rows) for summary, rows in finished]
        if not stats:
            continue
        collapsed = [s["collapse_step"] for s in stats if s["collapse_step"] is not None]
        table.append({
            "variant": variant, "seeds": len(stats),
            "initial_acc": _mean_std([s["initial_acc"] for s in stats]),
            "final_acc": _mean_std([s["final_acc"] for s in stats]),
            "peak_acc": _mean_std([s["peak_acc"] for s in stats]),
            "final_reward": _mean_std([s["final_reward"] for s in stats]),
            "collapsed": f"{len(collapsed)}/{len(stats)}",
            "collapse_steps": ",".join(map(str, collapsed)) or "-",
            "mean_train_infer_kl": f"{statistics.mean(s['mean_train_infer_kl'] for s in stats):.2e}",
            "run_seconds": _mean_seconds([s["seconds"] for s in stats]),
            "max_train_infer_kl": ",".join(f"{s['max_kl']:.1e}" for s in stats),
            "kl_spike_steps": ",".join(str(s["kl_spikes"]) for s in stats),
            "route_agreement": f"{statistics.mean(s['route_agreement'] for s in stats):.4f}",
            "groups_all_wrong": f"{statistics.mean(s['groups_all_wrong'] for s in stats):.2f}",
            "is_frac_truncated": f"{statistics.mean(s['is_frac_truncated'] for s in stats):.1e}",
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
    return paths


def plot_experiment(name: str, runs: dict[str, list[tuple[dict, list[dict]]]], path: Path) -> None:
    """One row of panels per group of variants (``EXPERIMENTS[name]["rows"]``, e.g. one per N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(EXPERIMENTS[name]["variants"])
    rows = EXPERIMENTS[name].get("rows") or {"": variants}
    fig, grid = plt.subplots(len(rows), len(CURVES), figsize=(5 * len(CURVES), 4 * len(rows)),
                             constrained_layout=True, squeeze=False)
    for axes, (row_title, row_variants) in zip(grid, rows.items()):
        for variant in row_variants:
            vi = variants.index(variant)
            for ax, (key, title, smooth) in zip(axes, CURVES):
                series = []
                for _, metrics in runs[variant]:
                    pts = [(r["step"], r[key]) for r in metrics if key in r and r[key] == r[key]]
                    if pts:
                        xs, ys = zip(*pts)
                        series.append((list(xs), moving_average(list(ys), smooth)))
                if not series:
                    continue
                n = min(len(s[0]) for s in series)
                xs = series[0][0][:n]
                cols = list(zip(*[s[1][:n] for s in series]))
                mean = [sum(c) / len(c) for c in cols]
                ax.plot(xs, mean, color=f"C{vi % 10}", label=variant, lw=1.5)
                ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=f"C{vi % 10}", alpha=0.15)
        for ax, (_, title, _) in zip(axes, CURVES):
            ax.set_title(f"{row_title}: {title}" if row_title else title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{EXPERIMENTS[name]['title']} (mean over seeds, band = min..max)")
    fig.savefig(path, dpi=64)
    plt.close(fig)
