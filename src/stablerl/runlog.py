"""Run logging: one JSON object per step in RUN_DIR/metrics.jsonl, TensorBoard scalars, a live
progress line, and the collapse warning."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path

from stablerl.config import LogConfig

# the figures shown on the progress line, in order
PROGRESS_KEYS = (("reward", "reward_mean", ".2f"), ("acc", "eval/greedy_acc", ".2f"),
                 ("H", "entropy", ".3f"), ("KL_ti", "train_infer_kl", ".1e"), ("route", "route_agreement/train_infer", ".3f"))


class CollapseDetector:
    """Flags a metric that jumps far beyond its running range and stays there.

    Let the ``window`` values before the last ``sustain`` steps span [lo, hi]. The metric is
    flagged when each of the last ``sustain`` values exceeds ``hi + factor * (hi - lo)`` and
    ``2 * hi``: a sustained jump, as in a collapse, not a one-batch spike of a heavy-tailed
    estimate (the k3 KL of one batch often spikes 10x and falls back). Flags once per episode.
    """

    def __init__(self, window: int, factor: float, sustain: int = 5):
        self.window, self.factor, self.sustain = window, factor, sustain
        self.history: dict[str, deque] = {}
        self.active: dict[str, bool] = {}

    def update(self, key: str, value: float) -> bool:
        hist = self.history.setdefault(key, deque(maxlen=self.window + self.sustain))
        if math.isfinite(value):
            hist.append(value)
        if len(hist) < self.window + self.sustain:
            return False
        values = list(hist)
        base, recent = values[: self.window], values[self.window:]
        lo, hi = min(base), max(base)
        jumped = all(v > hi + self.factor * (hi - lo) and v > 2 * hi for v in recent)
        first = jumped and not self.active.get(key, False)
        self.active[key] = jumped
        return first


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LogConfig, total_steps: int, start_step: int):
        self.run_dir, self.cfg = run_dir, cfg
        self.metrics_path = run_dir / "metrics.jsonl"
        self.collapse = CollapseDetector(cfg.collapse_window, cfg.collapse_factor, cfg.collapse_sustain)
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its last checkpoint
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.progress = None
        if cfg.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"))
            self.progress.start()
            self.task_id = self.progress.add_task("", total=total_steps, completed=start_step)
        self.last_eval: dict[str, float] = {}

    def log_step(self, step: int, metrics: dict) -> list[str]:
        """Append one step; returns collapse warnings (also printed)."""
        warnings = [f"step {step}: {key} = {metrics[key]:.4g} has stayed far above its earlier range for "
                    f"{self.cfg.collapse_sustain} steps (possible collapse)"
                    for key in ("entropy", "train_infer_kl") if key in metrics and self.collapse.update(key, metrics[key])]
        metrics = {"step": step, **metrics, "collapse_warning": bool(warnings)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, step)
        self.last_eval.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
        for w in warnings:
            self.print(f"[yellow]WARNING[/yellow] {w}")
        if self.progress is not None:
            shown = {**metrics, **self.last_eval}
            desc = "  ".join(f"{name} {shown[key]:{fmt}}" for name, key, fmt in PROGRESS_KEYS if key in shown)
            self.progress.update(self.task_id, completed=step, description=desc)
        return warnings

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            from rich import print as rprint

            rprint(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
