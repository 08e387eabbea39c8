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


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """The shortest trailing path of each run directory that tells them all apart (runs/a/seed0 and
    runs/b/seed0 become a/seed0 and b/seed0)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def reward_is_accuracy(run_dir: str | Path) -> bool:
    """Whether the run's held-out score is an accuracy (a 0/1 verifier) rather than a weighted
    reward of the user's functions, which can exceed 1."""
    import json

    from stablerl.rundir import RunDir

    try:
        task = json.loads(RunDir(run_dir).config.read_text()).get("task", {})
    except (OSError, ValueError):
        return True
    return not task.get("reward_fns") and not task.get("reward_weights")


def plot_runs(run_dirs: list[str | Path], out: str | Path, smooth: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = run_labels(run_dirs)
    runs = {label: read_metrics(Path(d)) for label, d in zip(labels, run_dirs)}
    score = "accuracy" if all(reward_is_accuracy(d) for d in run_dirs) else "reward"
    panels = [p for p in PANELS if any(any(p[0] in r for r in rows) for rows in runs.values())]
    cols = 3
    fig, axes = plt.subplots(
        -(-len(panels) // cols),
        cols,
        figsize=(15, 3.2 * -(-len(panels) // cols)),
        constrained_layout=True,
        squeeze=False,
    )
    for ax, (key, title, smoothed) in zip(axes.flat, panels):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(
                    xs,
                    moving_average(list(ys), smooth) if smoothed else ys,
                    label=name,
                    marker=None if smoothed else "o",
                    ms=3,
                )
        title = title.replace("accuracy", score)
        ax.set_title(f"{title} (moving average, {smooth} steps)" if smoothed and smooth > 1 else title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
