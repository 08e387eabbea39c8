"""The run directory: one writer at a time, and a config record that stays true.

``RUN_DIR/`` holds ``config.json`` (the resolved config of the run as it is now),
``config_changes.jsonl`` (every change made on a resume, with the step it applied from),
``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``export/`` and, once finished, ``summary.json``.

Every state of a run directory is resumable or cleanly restartable:
- no ``config.json``: not a run; ``train`` starts one;
- ``config.json`` but no complete checkpoint (killed before the first one): ``--resume`` starts
  it again from step 0, dropping the partial log; a plain ``train`` refuses, as for any run;
- a complete checkpoint: ``--resume`` continues from the newest one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path

from stablerl.config import RunConfig
from stablerl.config_io import build_config, resume_changes

CONFIG = "config.json"
CHANGES = "config_changes.jsonl"
LOCK = ".lock"


class RunLocked(ValueError):
    pass


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` for the life of the process.

    The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a
    lock left by a crashed run is never stale: the next process simply gets it.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunLocked(f"run directory {self.path.parent} is in use by {holder}; one process may write a "
                                "run at a time (wait for it, or pick another run_dir)") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_config(run_dir: Path) -> dict:
    """The saved config as a dict; a clear error for a missing, empty or truncated file."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG}); start a run with `stablerl train`")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else f"not valid JSON ({e.msg} at line {e.lineno})"
        raise ValueError(f"{path} is {what}, so the run cannot be resumed; restore it or start a new run") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a config object, so the run cannot be resumed")
    return data


def resume_config(run_dir: Path, config_file: str | None, overrides: list[str]) -> tuple[RunConfig, dict]:
    """The saved config with ``--config FILE`` and overrides applied, and the changes they make.

    Changes that cannot apply to a run in progress (model shape, batch, loss, numerics) are
    rejected with the list of what may change (``stablerl.config.RESUMABLE_KEYS``).
    """
    saved_data = read_config(run_dir)
    try:
        saved = RunConfig.model_validate(saved_data)
    except ValueError as e:
        raise ValueError(f"{Path(run_dir) / CONFIG} is not a valid config for this version of stablerl: {e}") from None
    cfg = build_config(RunConfig, config_file, overrides, base=saved_data)
    cfg.run_dir = saved.run_dir
    return cfg, resume_changes(saved, cfg)


def record_config(run_dir: Path, cfg: RunConfig, step: int, changes: dict | None = None) -> None:
    """Write ``config.json`` (atomically) and append the changes, with their step, to the record."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / CONFIG, cfg.model_dump(mode="json"))
    if changes:
        line = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
        with open(run_dir / CHANGES, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
