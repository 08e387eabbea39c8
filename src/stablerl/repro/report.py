"""Tables and figures for `stablerl repro`, from the runs' metrics.jsonl; the statistics of one
run, and the collapse definition every table uses, are in ``stablerl.repro.stats``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from stablerl import metrics as M
from stablerl.plot import moving_average
from stablerl.repro.dose import dose_points, dose_table, plot_dose_response
from stablerl.repro.experiments import EXPERIMENTS, reference_of
from stablerl.repro.reading import write_reading
from stablerl.repro.records import record_path, write_record
from stablerl.repro.stats import (
    finished_runs_by_seed,
    mean_finite,
    mean_std,
    paired_interval,
    rollout_steps,
    run_stats,
    series,
)

# (metric, title, moving-average window in optimizer steps)
CURVES = (
    (M.REWARD_MEAN, "training reward", 10),
    (M.EVAL_SAMPLED, "held-out accuracy (sampled)", 1),
    (M.ENTROPY, "token entropy", 10),
    (M.TRAIN_INFER_KL, "training-inference KL (k3)", 10),
    (M.ROUTE_TRAIN_INFER, "routing agreement (train vs infer)", 10),
)


def experiment_table(runs: dict[str, list[tuple[dict, list[dict], int]]]) -> list[dict]:
    table = []
    for variant, finished in runs.items():
        stats = [run_stats(summary, rows, n) for summary, rows, n in finished]
        if not stats:
            continue
        collapsed = [s for s in stats if s["collapse_step"] is not None]
        table.append(
            {
                "variant": variant,
                "seeds": len(stats),
                "initial_acc": mean_std([s["initial_acc"] for s in stats]),
                "final_acc": mean_std([s["final_acc"] for s in stats]),
                "peak_acc": mean_std([s["peak_acc"] for s in stats]),
                "final_reward": mean_std([s["final_reward"] for s in stats]),
                "collapsed": f"{len(collapsed)}/{len(stats)}",
                "collapse_steps": ",".join(str(s["collapse_step"]) for s in collapsed) or "-",
                "collapse_how": "; ".join(sorted({s["collapse_how"] for s in collapsed})) or "-",
                "mean_train_infer_kl": f"{mean_finite([s['mean_train_infer_kl'] for s in stats]):.2e}",
                "mean_train_infer_kl_k1": f"{mean_finite([s['mean_train_infer_kl_k1'] for s in stats]):.2e}",
                "run_seconds": f"{mean_finite([s['seconds'] for s in stats]):.0f}",
                "max_train_infer_kl": ",".join(f"{s['max_kl']:.1e}" for s in stats),
                "kl_spike_steps": ",".join(str(s["kl_spikes"]) for s in stats),
                "route_agreement": f"{mean_finite([s['route_agreement'] for s in stats]):.4f}",
                "entropy": f"{mean_finite([s['entropy'] for s in stats]):.3f}",
                "groups_all_wrong": f"{mean_finite([s['groups_all_wrong'] for s in stats]):.2f}",
                "is_frac_truncated": f"{mean_finite([s['is_frac_truncated'] for s in stats]):.1e}",
                "staleness_max": f"{mean_finite([s['staleness_max'] for s in stats]):g}",
                # the pre-registered definition's parts (C3 needs a reference run: reported per experiment)
                "c1_accuracy_collapse": f"{sum(s['c1_step'] is not None for s in stats)}/{len(stats)}",
                "c2_kl_blowup": f"{sum(s['c2_step'] is not None for s in stats)}/{len(stats)}",
                "seq_log_w_p01": f"{mean_finite([s['seq_log_w_p01'] for s in stats]):.3f}",
                "kl_spikes_per_opt_step": f"{mean_finite([s['kl_spikes_per_opt_step'] for s in stats]):.3f}",
            }
        )
    return table


def paired_table(
    by_seed: dict[str, dict[int, tuple[dict, list[dict], int]]],
    reference: str | dict[str, str],
    also: dict[str, str] | None = None,
) -> str:
    """Final held-out sampled accuracy of every variant minus its reference's (``reference_of``),
    paired by seed (``by_seed``: ``stats.finished_runs_by_seed``; interrupted runs left out):
    per-seed differences, their mean and 95% t-interval (none from a single seed). ``also``: further
    pre-registered comparisons within a row (variant name -> the name it is compared with), listed
    after the references'."""
    acc = {
        variant: {
            seed: run_stats(summary, rows, n)["final_acc"]
            for seed, (summary, rows, n) in runs.items()
            if not summary.get("interrupted")
        }
        for variant, runs in by_seed.items()
    }
    what = f"{reference}'s" if isinstance(reference, str) else "its reference's"
    lines = [
        f"Final held-out sampled accuracy minus {what}, paired by seed (95% t-interval over seeds)\n",
        "| variant | reference | seeds paired | per-seed differences | mean | 95% interval |",
        "|---|---|---|---|---|---|",
    ]
    pairs = [(variant, reference_of(variant, reference)) for variant in acc]
    pairs += [(variant, reference_of(variant, also)) for variant in acc] if also else []
    for variant, ref_name in pairs:
        accs = acc[variant]
        if ref_name is None or not accs:
            continue
        ref = acc.get(ref_name, {})
        seeds = sorted(set(accs) & set(ref))
        diffs = [accs[s] - ref[s] for s in seeds]
        ci = paired_interval(diffs)
        lines.append(
            f"| {variant} | {ref_name} | {len(seeds)} | {', '.join(f'{x:+.3f}' for x in diffs) or '-'} | "
            f"{(sum(diffs) / len(diffs)) if diffs else float('nan'):+.3f} | "
            f"{f'[{ci[1]:+.3f}, {ci[2]:+.3f}]' if ci else 'n/a (< 2 seeds)'} |"
        )
    return "\n".join(lines) + "\n"


def write_records(name: str, out: Path, by_seed: dict[str, dict[int, tuple[dict, list[dict], int]]]) -> int:
    """Keep a record of every finished run beside the report (an interrupted one resumes: no
    record); returns how many were written or changed."""
    return sum(
        write_record(record_path(out, name, variant, seed), *run)
        for variant, runs in by_seed.items()
        for seed, run in runs.items()
        if not run[0].get("interrupted")
    )


def write_report(name: str, out: Path, seeds: int) -> dict[str, Path]:
    """The tables, figures and readings of experiment ``name`` from the finished runs under
    ``out`` (run directories, else their records), and a record of each finished run."""
    by_seed = finished_runs_by_seed(name, out, seeds)
    write_records(name, out, by_seed)
    runs = {variant: list(r.values()) for variant, r in by_seed.items()}
    table = experiment_table(runs)
    dest = out / name
    dest.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": dest / "table.csv",
        "json": dest / "table.json",
        "md": dest / "table.md",
        "png": dest / "curves.png",
    }
    if table:
        with paths["csv"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        paths["json"].write_text(json.dumps(table, indent=1))
        head = "| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]) + "\n"
        paths["md"].write_text(
            head + "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n" for row in table)
        )
        plot_experiment(name, runs, paths["png"])
        if EXPERIMENTS[name].get("reference"):
            paths["paired_md"] = dest / "paired.md"
            paths["paired_md"].write_text(
                paired_table(by_seed, EXPERIMENTS[name]["reference"], EXPERIMENTS[name].get("also_compare"))
            )
        if EXPERIMENTS[name].get("preregistered"):
            other = EXPERIMENTS[name].get("c3_from")  # C3's reference runs live in that experiment
            pool = {**finished_runs_by_seed(other, out, seeds), **by_seed} if other else None
            paths.update(write_reading(name, by_seed, dest, pool))
        if name == "dose-response":
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
    # only the rows that have a finished run (experiments 3 and 4 run one rung of six)
    rows = {title: vs for title, vs in rows.items() if any(runs.get(v) for v in vs)} or rows
    fig, grid = plt.subplots(
        len(rows), len(CURVES), figsize=(5 * len(CURVES), 4 * len(rows)), constrained_layout=True, squeeze=False
    )
    for axes, (row_title, row_variants) in zip(grid, rows.items()):
        for vi, variant in enumerate(row_variants):
            for ax, (key, _title, smooth) in zip(axes, CURVES):
                curves = []
                for _, metrics, n in runs[variant]:
                    xs, ys = series(metrics, key)
                    if xs:
                        curves.append(([x * n for x in xs], moving_average(ys, rollout_steps(smooth, n))))
                if not curves:
                    continue
                k = min(len(c[0]) for c in curves)
                xs = curves[0][0][:k]
                cols = list(zip(*[c[1][:k] for c in curves]))
                label = variant.split("/")[-1]
                ax.plot(xs, [sum(c) / len(c) for c in cols], color=f"C{vi % 10}", label=label, lw=1.5)
                ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=f"C{vi % 10}", alpha=0.15)
                if key == M.TRAIN_INFER_KL:
                    ax.set_yscale("log")
        for ax, (_, title, _) in zip(axes, CURVES):
            ax.set_title(f"{row_title}: {title}" if row_title else title)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7)
        else:  # a row none of whose variants has run yet (a partly run experiment)
            axes[0].text(0.5, 0.5, "not run", transform=axes[0].transAxes, ha="center", va="center")
    fig.suptitle(f"{EXPERIMENTS[name]['title']} (mean over seeds, band = min..max)")
    fig.savefig(path, dpi=56)
    plt.close(fig)
