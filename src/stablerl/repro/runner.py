"""Run an experiment's variants x seeds; interrupted runs resume, finished runs are skipped."""

from __future__ import annotations

import json
import time
from pathlib import Path

from stablerl.config import RunConfig, build_config
from stablerl.repro.experiments import EXPERIMENTS


def run_dir_of(out: Path, experiment: str, variant: str, seed: int) -> Path:
    return out / experiment / variant / f"seed{seed}"


def run_experiment(name: str, out: Path, seeds: int, extra: list[str] = (), log=print) -> list[Path]:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; allowed: {', '.join(EXPERIMENTS)}, all")
    from stablerl.loop import Trainer, TrainingAborted
    from stablerl.rundir import is_run_dir
    from stablerl.runlog import summarize

    exp = EXPERIMENTS[name]
    jobs = [(v, s) for v in exp["variants"] for s in range(seeds)]
    dirs = []
    for i, (variant, seed) in enumerate(jobs, start=1):
        run_dir = run_dir_of(out, name, variant, seed)
        dirs.append(run_dir)
        if (run_dir / "summary.json").is_file():
            log(f"[repro {name}] {i}/{len(jobs)} {variant} seed {seed}: done, skipped")
            continue
        overrides = exp["base"] + exp["variants"][variant] + [f"train.seed={seed}", f"run_dir={run_dir}"] + list(extra)
        cfg = build_config(RunConfig, None, overrides)
        resume = is_run_dir(run_dir)  # started before: continue it (or restart it if no checkpoint was written)
        log(f"[repro {name}] {i}/{len(jobs)} {variant} seed {seed}: {'resuming' if resume else 'starting'}")
        t0 = time.perf_counter()
        aborted = None
        try:
            Trainer(cfg, run_dir, resume=resume, log=lambda *_: None).run()
        except TrainingAborted as e:
            aborted = str(e)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else summarize(run_dir)
        summary.update({"variant": variant, "seed": seed, "aborted": aborted,
                        "seconds": time.perf_counter() - t0})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log(f"[repro {name}] {variant} seed {seed}: sampled acc {summary.get('sampled_before', float('nan')):.3f}"
            f" -> {summary.get('sampled_after', float('nan')):.3f} ({summary['seconds']:.0f} s)")
    return dirs
