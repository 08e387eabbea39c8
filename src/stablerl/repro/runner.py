"""Run an experiment's variants x seeds; interrupted runs resume, finished runs are skipped."""

from __future__ import annotations

import json
import time
from pathlib import Path

from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.repro.experiments import EXPERIMENTS
from stablerl.repro.records import record_path
from stablerl.rundir import RunDir, RunLocked, is_run_dir, write_json_atomic


def run_dir_of(out: Path, experiment: str, variant: str, seed: int) -> Path:
    return out / experiment / variant / f"seed{seed}"


def is_done(run_dir: Path) -> bool:
    """A run is done when it wrote its summary and was not interrupted (a run stopped by Ctrl-C
    is resumed, never counted; one stopped for non-finite steps is a result)."""
    path = RunDir(run_dir).summary
    if not path.is_file():
        return False
    try:
        return not json.loads(path.read_text()).get("interrupted", False)
    except (OSError, ValueError):
        return False


def has_record_only(out: Path, experiment: str, variant: str, seed: int) -> bool:
    """The run finished elsewhere (or on a lost machine): no run directory here, its record kept."""
    return (
        not run_dir_of(out, experiment, variant, seed).exists()
        and record_path(out, experiment, variant, seed).is_file()
    )


def is_finished(out: Path, experiment: str, variant: str, seed: int) -> bool:
    """Done here (``is_done``) or elsewhere (``has_record_only``)."""
    return is_done(run_dir_of(out, experiment, variant, seed)) or has_record_only(out, experiment, variant, seed)


def _run_one(exp: dict, name: str, variant: str, seed: int, run_dir: Path, extra, log) -> dict | None:
    """Train (or resume) one run of an experiment; its summary, with the variant, seed, abort
    reason and wall time added (None: another process holds it)."""
    # the trainer (torch, transformers) only when runs are made: `stablerl repro --help` and the
    # report stay light
    from stablerl.loop import Trainer, TrainingAborted
    from stablerl.runlog import summarize

    train_seed = seed + exp.get("seed_offset", 0)
    run_keys = [f"train.seed={train_seed}", f"run_dir={run_dir}"]
    overrides = exp["base"] + exp["variants"][variant] + run_keys + list(extra)
    cfg = build_config(RunConfig, None, overrides)
    t0 = time.perf_counter()
    aborted = None
    try:
        trainer = Trainer(cfg, run_dir, resume=is_run_dir(run_dir), log=lambda *_: None)
    except RunLocked:  # another `stablerl repro` process is running it: share the work
        log(f"[repro {name}] {variant} seed {seed}: running in another process, skipped")
        return None
    try:
        trainer.run()
    except TrainingAborted as e:
        aborted = str(e)
    summary_path = RunDir(run_dir).summary
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else summarize(run_dir)
    summary.update({"variant": variant, "seed": seed, "aborted": aborted, "seconds": time.perf_counter() - t0})
    write_json_atomic(summary_path, summary)
    return summary


def run_experiment(
    name: str, out: Path, seeds: int | list[int], extra: list[str] = (), log=print, variants: list[str] | None = None
) -> list[Path]:
    """Run every variant of ``name`` for ``seeds`` (a count: 0..K-1, or a list); returns the
    run directories. A run with a summary.json is done and skipped, and so is one whose directory
    is gone but whose record is kept (a lost machine, records copied back from docs/results/: the
    report reads it from the record, so rerunning it would only make a second draw of a finished
    run); one started before resumes
    from its last checkpoint (or restarts if it had none); one that another process is running
    (its run directory is locked) is left to it, so several `stablerl repro` processes started
    on the same --out share the work."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; allowed: {', '.join(EXPERIMENTS)}, all")
    exp = EXPERIMENTS[name]
    unknown = sorted(set(variants or ()) - set(exp["variants"]))
    if unknown:
        raise ValueError(f"unknown variant(s) of {name}: {', '.join(unknown)}; allowed: {', '.join(exp['variants'])}")
    chosen = [v for v in exp["variants"] if variants is None or v in variants]
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    jobs = [(v, s) for s in seed_list for v in chosen]
    dirs, t_start, ran = [], time.perf_counter(), 0
    for i, (variant, seed) in enumerate(jobs, start=1):
        run_dir = run_dir_of(out, name, variant, seed)
        dirs.append(run_dir)
        if is_done(run_dir):
            log(f"[repro {name}] {i}/{len(jobs)} {variant} seed {seed}: done, skipped")
            continue
        if has_record_only(out, name, variant, seed):
            log(f"[repro {name}] {i}/{len(jobs)} {variant} seed {seed}: done (its record is kept), skipped")
            continue
        resume = is_run_dir(run_dir)  # started before: continue it (or restart it if no checkpoint was written)
        log(f"[repro {name}] {i}/{len(jobs)} {variant} seed {seed}: {'resuming' if resume else 'starting'}")
        summary = _run_one(exp, name, variant, seed, run_dir, extra, log)
        if summary is None:
            continue
        ran += 1
        left = sum(not is_finished(out, name, v, s) for v, s in jobs)
        eta = (time.perf_counter() - t_start) / ran * left
        log(
            f"[repro {name}] {variant} seed {seed}: sampled acc {summary.get('sampled_before', float('nan')):.3f}"
            f" -> {summary.get('sampled_after', float('nan')):.3f} ({summary['seconds']:.0f} s; {left} runs left, "
            f"~{eta / 60:.0f} min)"
        )
    return dirs
