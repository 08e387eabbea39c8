"""The Python API: a training run from a config, as ``stablerl train`` makes it.

    import stablerl

    summary = stablerl.train({"train": {"steps": 50}, "rollout": {"precision": "fp8"}})
    summary = stablerl.train("examples/deep_moe/config.yaml", overrides=["train.steps=20"])
    summary = stablerl.train(resume="runs/20261202-140308", overrides=["train.steps=800"])

Config in (a ``RunConfig``, a dict of its sections, a YAML/TOML file, or nothing for the
defaults), run directory and summary out. Under ``torchrun`` every rank calls it alike. For
finer control, ``stablerl.Trainer(cfg, run_dir).run()`` is the loop itself (src/stablerl/loop.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from stablerl.config import RunConfig
from stablerl.config_io import build_config


def resolve_run(
    config: RunConfig | dict | str | Path | None = None,
    *,
    resume: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[RunConfig, Path]:
    """The validated config and the run directory a ``train`` call would use."""
    from stablerl.resume import resume_config

    if not (config is None or isinstance(config, (RunConfig, dict, str, Path))):
        raise ValueError(
            f"config {config!r} (a {type(config).__name__}) is not a config: give a RunConfig, a dict of its sections, "
            "the path of a YAML/TOML file, or nothing for the defaults"
        )
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"overrides {overrides!r}: give a list of 'key=value' strings")
    if resume is not None:
        if isinstance(config, (RunConfig, dict)):
            raise ValueError(
                "resume=RUN_DIR continues the config saved there: pass changes as a config file or "
                "as overrides, not as a config object"
            )
        return resume_config(Path(resume), None if config is None else str(config), list(overrides)), Path(resume)
    if isinstance(config, RunConfig):
        cfg = build_config(RunConfig, None, list(overrides), base=config.model_dump(mode="json"))
    elif isinstance(config, dict):
        cfg = build_config(RunConfig, None, list(overrides), base=config)
    else:
        cfg = build_config(RunConfig, None if config is None else str(config), list(overrides))
    return cfg, Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")


def train(
    config: RunConfig | dict | str | Path | None = None,
    *,
    resume: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    log=print,
) -> dict:
    """Run (or, with ``resume``, continue) a training run to its end; returns its summary (what
    RUN_DIR/summary.json holds: steps, held-out accuracy before and after, collapse warnings,
    reward failures; ``run_dir`` names the directory). Raises ``stablerl.TrainingAborted`` when
    the run stops early (non-finite steps, a reward function failing on every response), and
    ValueError for a bad config, with the key named."""
    cfg, run_dir = resolve_run(config, resume=resume, overrides=overrides)
    return train_resolved(cfg, run_dir, resume=resume is not None, log=log)


def train_resolved(cfg: RunConfig, run_dir: Path, *, resume: bool = False, log=print) -> dict:
    """``train`` for a config and run directory already resolved (``resolve_run``)."""
    import json

    from stablerl import distributed as D
    from stablerl.errors import sigterm_as_interrupt
    from stablerl.loop import RankStopped, Trainer
    from stablerl.rundir import RunDir

    world = D.init_world(cfg.distributed.timeout_s, cfg.distributed.threads, workers=cfg.rollout.workers)
    if world.is_worker:  # a rollout worker: it samples, the learners do the rest (pipeline.py)
        from stablerl.pipeline import run_worker

        try:
            run_worker(cfg, world, log=log)
        finally:
            D.shutdown_world()
        return {}
    broken = False
    try:
        run_dir = Path(D.broadcast_object(str(run_dir)))  # rank 0's timestamp names the run for all
        cfg.run_dir = str(run_dir)
        with sigterm_as_interrupt():  # a run stopped by SIGTERM is written up as one stopped by Ctrl-C
            Trainer(cfg, run_dir, resume=resume, log=log, world=world).run()
    except Exception as e:
        if not (world.distributed and D.is_collective_failure(e)):
            raise
        broken = True  # a rank died, hung or was stopped: say which, and stop (the last checkpoint stays)
        who = D.unresponsive_ranks()
        raise RankStopped(
            f"rank {world.rank}: a collective did not complete within distributed.timeout_s="
            f"{cfg.distributed.timeout_s:g} s — {who or 'another rank died or stopped responding'}"
            f"; the last checkpoint is intact: resume with `stablerl train --resume {run_dir}`"
        ) from None
    finally:
        D.shutdown_world(broken)
    files = RunDir(run_dir)
    if not (world.is_main and files.summary.is_file()):
        return {}
    from stablerl.plot import plot_runs

    plot_runs([run_dir], files.plots / "curves.png")  # the same run directory from the CLI or from here
    return json.loads(files.summary.read_text())
