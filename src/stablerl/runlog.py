"""Run logging: one JSON object per step in RUN_DIR/metrics.jsonl, TensorBoard scalars, a live
progress line, and the collapse warning."""

from __future__ import annotations

import json
import math
import statistics
import sys
import uuid
from collections import deque
from pathlib import Path

from stablerl import metrics as M
from stablerl.config import LogConfig
from stablerl.learning_signal import no_signal_warning
from stablerl.rundir import RunDir, RunState, append_line, write_json_atomic

# the figures shown on the progress line, in order
PROGRESS_KEYS = (
    ("reward", M.REWARD_MEAN, ".2f"),
    ("acc", M.EVAL_GREEDY, ".2f"),
    ("H", M.ENTROPY, ".3f"),
    ("KL_ti", M.TRAIN_INFER_KL, ".1e"),
    ("route", M.ROUTE_TRAIN_INFER, ".3f"),
    ("lag", M.STALENESS_MAX, "d"),
)  # the lag only where there is one (rollout.max_staleness)


# what a collapse looks like in each watched metric (docs/formulation.md "What the paper found"):
# entropy jumps either way (a blow-up off-policy, a sharp drop without IS), the training-inference
# KL rises, the reward falls. A fall of the KL or a rise of the reward is good news, never flagged.
WATCHED = {M.ENTROPY: "both", M.TRAIN_INFER_KL: "up", M.REWARD_MEAN: "down"}
# a change must also exceed this in absolute terms (a KL going 1e-9 -> 1e-8 is no collapse)
ABS_FLOOR = {M.ENTROPY: 0.02, M.TRAIN_INFER_KL: 1e-3, M.REWARD_MEAN: 0.1}


class CollapseDetector:
    """Flags an abrupt, sustained change of a metric, from the first steps of a run on.

    The baseline is the median of up to ``window`` values before the last ``sustain`` steps (one
    value is enough). The metric is flagged when each of the last ``sustain`` values lies beyond
    ``factor`` times the baseline in the metric's collapse direction (``WATCHED``) and beyond it by
    more than ``ABS_FLOOR``: a sustained jump, as in a collapse, not a one-batch spike of a
    heavy-tailed estimate (the k3 KL of one batch often spikes 10x and falls back). Flags once
    per episode.
    """

    def __init__(self, window: int, factor: float, sustain: int = 3):
        self.window, self.factor, self.sustain = window, factor, sustain
        self.history: dict[str, deque] = {}
        self.active: dict[str, bool] = {}

    def update(self, key: str, value: float) -> str | None:
        """Add a value; returns a description of the change when it becomes a collapse, else None."""
        hist = self.history.setdefault(key, deque(maxlen=self.window + self.sustain))
        if math.isfinite(value):
            hist.append(value)
        if len(hist) < 1 + self.sustain:
            return None
        values = list(hist)
        base = statistics.median(values[: -self.sustain][-self.window :])
        recent = values[-self.sustain :]
        direction, floor = WATCHED.get(key, "up"), ABS_FLOOR.get(key, 0.0)
        up = all(v > self.factor * base and v - base > floor for v in recent)
        down = all(v < base / self.factor and base - v > floor for v in recent)
        jumped = (up and direction in ("up", "both")) or (down and direction in ("down", "both"))
        first = jumped and not self.active.get(key, False)
        self.active[key] = jumped
        if not first:
            return None
        word = "rose" if up else "fell"
        return f"{key} {word} from {base:.4g} to {recent[-1]:.4g} and stayed there for {self.sustain} steps"


def check_wandb(cfg: LogConfig) -> None:
    """With ``log.wandb``: wandb must be importable (checked before any training work)."""
    if not cfg.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(
            "log.wandb=true needs the wandb package: pip install 'stablerl[wandb]' (or set log.wandb=false)"
        ) from None


class WandbLog:
    """Weights & Biases beside metrics.jsonl and TensorBoard. The W&B run id is kept in
    RUN_DIR/wandb_id, so a resumed run continues the same W&B run; the resolved config is
    attached to it. ``log.wandb_mode=offline`` writes RUN_DIR/wandb/ without any network."""

    def __init__(self, run_dir: Path, cfg: LogConfig, config: dict | None):
        import wandb

        id_file = RunDir(run_dir).wandb_id
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.wandb_run_name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config or {},
            mode=cfg.wandb_mode,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(
            {
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            },
            step=step,
        )

    def close(self) -> None:
        self.run.finish()


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LogConfig, total_steps: int, start_step: int, config: dict | None = None):
        self.run_dir, self.cfg = RunDir(run_dir), cfg
        self.metrics_path = self.run_dir.metrics
        self.collapse = CollapseDetector(cfg.collapse_window, cfg.collapse_factor, cfg.collapse_sustain)
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its last checkpoint
            self.tb = SummaryWriter(str(self.run_dir.tensorboard), purge_step=start_step + 1 if start_step else None)
        self.progress = None
        self.total_steps = total_steps
        # a live bar needs a terminal; elsewhere (nohup, Slurm, CI) it would be redrawn into the log
        self.plain = cfg.progress and not sys.stdout.isatty()
        if cfg.progress and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.progress.start()
            self.task_id = self.progress.add_task("", total=total_steps, completed=start_step)
        self.last_eval: dict[str, float] = {}
        self.wandb = WandbLog(self.run_dir.path, cfg, config) if cfg.wandb else None

    def watch(self, step: int, metrics: dict) -> list[str]:
        """Feed the collapse detector; returns its warnings for this step."""
        found = [self.collapse.update(key, metrics[key]) for key in WATCHED if key in metrics]
        return [f"step {step}: {w} (possible collapse)" for w in found if w]

    def log_step(self, step: int, metrics: dict) -> list[str]:
        """Append one step; returns collapse warnings (also printed)."""
        warnings = self.watch(step, metrics)
        metrics = {"step": step, **metrics, "collapse_warning": bool(warnings)}
        append_line(self.metrics_path, json.dumps(metrics))
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, metrics)
        self.last_eval.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
        for w in warnings:
            self.print(f"[yellow]WARNING[/yellow] {w}")
        shown = {**metrics, **self.last_eval}
        desc = "  ".join(
            f"{name} {shown[key]:{fmt}}"
            for name, key, fmt in PROGRESS_KEYS
            if key in shown and (key != M.STALENESS_MAX or shown[key])
        )
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, description=desc)
        elif self.plain and (step % self.cfg.print_every == 0 or step == self.total_steps):
            print(f"[train] step {step}/{self.total_steps}  {desc}", flush=True)
        return warnings

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        elif not sys.stdout.isatty():  # a log file: the plain text, whole (rich would wrap it at 80 columns)
            from rich.text import Text

            print(Text.from_markup(text).plain, flush=True)
        else:
            from rich import print as rprint

            rprint(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def read_metrics(run_dir: Path, tolerant: bool = False) -> list[dict]:
    """Every step's metrics. A half-written *last* line (a run killed mid-write) is skipped; a bad
    line anywhere else is an error naming the file and line — or, ``tolerant``, skipped too (the
    run's own summary and history replay must survive what something else wrote into the log)."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        raise ValueError(f"{run_dir} has no {path.name} (not a run directory, or a run that has not logged yet)")
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) or tolerant:
                continue  # the write a kill interrupted, or (tolerant) a line something else damaged
            raise ValueError(f"{path}: line {n} is not valid JSON (the log is damaged)") from None
    return rows


def replay_history(logger: RunLogger, run_dir: Path) -> None:
    """On resume, feed the steps already logged to the collapse detector (nothing is printed)."""
    if RunDir(run_dir).metrics.exists():
        for row in read_metrics(run_dir, tolerant=True):
            logger.watch(row.get("step", 0), row)


def summarize(run_dir: Path, state: RunState | None = None) -> dict:
    """The run's summary: steps, held-out accuracy before and after, whether it collapsed."""
    rows = read_metrics(run_dir, tolerant=True)
    out: dict = {"run_dir": str(run_dir), "steps": rows[-1]["step"] if rows else 0}
    evals = [r for r in rows if M.EVAL_GREEDY in r or M.EVAL_SAMPLED in r]
    if evals:
        first, last = evals[0], evals[-1]
        for mode, key in (("greedy", M.EVAL_GREEDY), ("sampled", M.EVAL_SAMPLED)):
            if key in first and key in last:
                out[f"{mode}_before"], out[f"{mode}_after"] = first[key], last[key]
    warnings = list(state.collapse) if state else []
    out["collapsed"] = bool(warnings)
    out["collapse_warnings"] = warnings
    shares = [r[M.GROUPS_WITHOUT_SIGNAL] for r in rows if M.GROUPS_WITHOUT_SIGNAL in r]
    if shares:
        out[M.GROUPS_WITHOUT_SIGNAL] = sum(shares) / len(shares)
        warning = no_signal_warning(shares)
        if warning:
            out["no_signal_warning"] = warning
    if state:
        for key in ("nonfinite_total", "steps_skipped", "reward_errors", "reward_timeouts", "reward_crashes"):
            out[key] = getattr(state, key)
        if state.aborted is not None:
            out["aborted"] = state.aborted
        if state.interrupted:
            out["interrupted"] = True
    return out


def write_summary(run_dir: Path, state: RunState) -> dict:
    summary = summarize(run_dir, state)
    write_json_atomic(RunDir(run_dir).summary, summary)
    return summary
