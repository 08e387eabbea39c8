"""`stablerl plot RUN_DIR [RUN_DIR ...]`: PNG curves comparing runs, from their metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from stablerl.runlog import read_metrics

PANELS = (
    ("reward_mean", "training reward", True),
    ("eval/greedy_acc", "held-out accuracy (greedy)", False),
    ("eval/sampled_acc", "held-out accuracy (sampled)", False),
    ("entropy", "token entropy", True),
    ("train_infer_kl", "training-inference KL (k3)", True),
    ("staleness_kl", "staleness KL (k3)", True),
    ("route_agreement/train_infer", "routing agreement train vs infer", True),
    ("first_order_gap", "first-order gap", True),
    ("clip_frac_high", "clip fraction (high)", True),
    ("is_frac_truncated", "IS truncated fraction", True),
    ("grad_norm", "grad norm", True),
    ("response_len_mean", "response length", True),
)


def moving_average(values: list[float], k: int) -> list[float]:
    """Trailing mean over the last ``k`` values (fewer at the start)."""
    out, window = [], []
    for v in values:
        window.append(v)
        window = window[-k:]
        out.append(sum(window) / len(window))
    return out


def plot_runs(run_dirs: list[str | Path], out: str | Path, smooth: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {str(d): read_metrics(Path(d)) for d in run_dirs}
    panels = [p for p in PANELS if any(any(p[0] in r for r in rows) for rows in runs.values())]
    cols = 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(15, 3.2 * -(-len(panels) // cols)),
                             constrained_layout=True, squeeze=False)
    for ax, (key, title, smoothed) in zip(axes.flat, panels):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, moving_average(list(ys), smooth) if smoothed else ys, label=Path(name).name,
                        marker=None if smoothed else "o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
