"""`stablerl plot RUN_DIR [RUN_DIR ...]`: PNG curves comparing runs, from their metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from stablerl import metrics as M
from stablerl.runlog import read_metrics

PANELS = (
    (M.REWARD_MEAN, "training reward", True),
    (M.EVAL_GREEDY, "held-out accuracy (greedy)", False),
    (M.EVAL_SAMPLED, "held-out accuracy (sampled)", False),
    (M.ENTROPY, "token entropy", True),
    (M.TRAIN_INFER_KL, "training-inference KL (k3)", True),
    (M.STALENESS_KL, "staleness KL (k3)", True),
    (M.ROUTE_TRAIN_INFER, "routing agreement train vs infer", True),
    (M.FIRST_ORDER_GAP, "first-order gap", True),
    (M.CLIP_FRAC_HIGH, "clip fraction (high)", True),
    (M.IS_FRAC_TRUNCATED, "IS truncated fraction", True),
    (M.GRAD_NORM, "grad norm", True),
    (M.RESPONSE_LEN_MEAN, "response length", True),
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
