"""The run directory: every file name in it, one writer at a time, atomic writes, the record of
the run's state, and a config record that stays true.

``RUN_DIR/`` (``RunDir`` names every path) holds ``config.json`` (the resolved config of the run
as it is now), ``config_changes.jsonl`` (every change made on a resume, with the step it applied
from), ``metrics.jsonl``, ``rollouts.jsonl`` (with ``log.rollouts``), ``tb/``, ``checkpoints/``,
``export/``, ``plots/`` and, once finished, ``summary.json``.

Every state of a run directory is resumable or cleanly restartable:
- no ``config.json``: not a run; ``train`` starts one;
- ``config.json`` but no complete checkpoint (killed before the first one): ``--resume`` starts
  it again from step 0, dropping the partial log; a plain ``train`` refuses, as for any run;
- a complete checkpoint: ``--resume`` continues from the newest one, the logs cut back to the
  steps it covers.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stablerl.config import RunConfig

CONFIG = "config.json"
CONFIG_COPY = "run_config.json"  # a checkpoint's copy of the run's config, checksummed with it
CHANGES = "config_changes.jsonl"
LOCK = ".lock"
METRICS = "metrics.jsonl"
ROLLOUTS = "rollouts.jsonl"
SUMMARY = "summary.json"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
EXPORTS = "export"
PLOTS = "plots"
WANDB_ID = "wandb_id"


class RunDir:
    """Every path of one run directory, and what may be done to its files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    config = property(lambda self: self.path / CONFIG)
    changes = property(lambda self: self.path / CHANGES)
    lock = property(lambda self: self.path / LOCK)
    metrics = property(lambda self: self.path / METRICS)
    rollouts = property(lambda self: self.path / ROLLOUTS)
    summary = property(lambda self: self.path / SUMMARY)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    exports = property(lambda self: self.path / EXPORTS)
    plots = property(lambda self: self.path / PLOTS)
    wandb_id = property(lambda self: self.path / WANDB_ID)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def export(self, step: int) -> Path:
        return self.exports / f"step_{step:06d}"

    def is_run(self) -> bool:
        return self.config.is_file()

    def looks_like_run(self) -> bool:
        """A run directory, even one whose config was lost (what refuses it as a model path: an
        HF model directory has a config.json too, so that alone does not tell)."""
        return self.checkpoints.is_dir() or self.metrics.is_file()

    def start_fresh(self) -> None:
        """Drop the logs of a run that restarts from step 0 (a fresh run, or one killed before its
        first checkpoint), so nothing from the earlier attempt is read as this one's."""
        for path in (self.metrics, self.rollouts, self.summary):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.tensorboard, ignore_errors=True)

    def remove_unstarted(self) -> None:
        """Undo a run that ended before completing anything (no checkpoint): its record and logs
        go, and the directory too when nothing else is in it, so a plain re-run is not refused."""
        self.start_fresh()
        for path in (self.config, self.changes, self.wandb_id):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.plots, ignore_errors=True)
        try:
            self.path.rmdir()
        except OSError:
            pass

    def cut_logs_to(self, state: RunState) -> None:
        """Cut the logs back to the steps the checkpoint of ``state`` covers (a resume)."""
        truncate_lines(self.metrics, state.metrics_lines)
        truncate_lines(self.rollouts, state.step)  # one line per step


# --------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a resume after a kill) sees the old file or the new one, never half.
# --------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsynced, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json_atomic(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def append_line(path: Path, line: str) -> None:
    """Append one line to a log, fsynced (a kill loses at most the line being written)."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_lines(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of a JSONL log (the steps a checkpoint covers)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    atomic_write_text(path, "".join(lines[:n_lines]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> Path:
    """The directory counterpart of ``atomic_write_text``: fsync everything under ``tmp``, then
    rename it to ``final`` (replacing an older one)."""
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


# --------------------------------------------------------------------------------------------
# The run's state: what a checkpoint records (state.json), the summary reports and a resume
# replays.
# --------------------------------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0  # the last completed step (its weights are the policy version)
    nonfinite_total: int = 0  # updates skipped for a non-finite loss or gradient
    steps_skipped: int = 0  # mini-batches without signal that took no optimizer step (optim.skip_empty_steps)
    extra_prompts: int = 0  # prompts of the stream that batch.filter_groups' extra rounds consumed
    metrics_lines: int = 0  # lines of metrics.jsonl this state covers
    reward_errors: int = 0
    reward_timeouts: int = 0
    reward_crashes: int = 0
    collapse: list[str] = field(default_factory=list)  # collapse warnings, in order
    reference_digest: str | None = None  # SHA-256 of the KL reference's weight files (loss.kl_beta > 0)
    aborted: str | None = None  # why the run stopped early (never checkpointed)
    interrupted: bool = False  # stopped by Ctrl-C / SIGINT (never checkpointed): resumable, not done

    def to_checkpoint(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("aborted")
        out.pop("interrupted")
        return out

    @classmethod
    def from_checkpoint(cls, data) -> RunState:
        """A state from a checkpoint's state.json, every field checked (``StateRecord``; keys this
        version does not know are ignored); a ValueError naming the first bad field."""
        try:
            record = StateRecord.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "the file"
            raise ValueError(f"{where}: {first['msg']}") from None
        names = {f.name for f in dataclasses.fields(cls)} - {"aborted", "interrupted"}
        return cls(**{k: v for k, v in record.model_dump().items() if k in names})

    def add_reward_failures(self, stats) -> None:
        for kind in ("errors", "timeouts", "crashes"):
            setattr(self, f"reward_{kind}", getattr(self, f"reward_{kind}") + getattr(stats, kind))


class StateRecord(BaseModel):
    """What a checkpoint's state.json must hold, strictly typed: a resume takes its step, counters
    and log length from it, so a value out of range is damage, never something to act on."""

    model_config = ConfigDict(strict=True, extra="ignore")

    step: int = Field(ge=1)  # a checkpoint is written after a completed step
    nonfinite_total: int = Field(0, ge=0)
    steps_skipped: int = Field(0, ge=0)
    extra_prompts: int = Field(0, ge=0)  # the prompt stream's cursor beyond step x prompts_per_step
    metrics_lines: int = Field(ge=0)
    reward_errors: int = Field(0, ge=0)
    reward_timeouts: int = Field(0, ge=0)
    reward_crashes: int = Field(0, ge=0)
    collapse: list[str] = []
    reference_digest: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    world_size: int = Field(1, ge=1)
    files: dict[str, str] | None = None  # the checksum table (checkpoint.damage requires it)


@contextmanager
def waiting_lock(path: Path, on_wait=None):
    """An exclusive ``flock`` on ``path`` for the ``with`` block, waiting while another process
    holds it (``on_wait()`` is called once if it has to). For work that several processes may
    start at once and only one should do, e.g. a shared cold start; like ``RunLock``, a holder
    that dies releases it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            if on_wait is not None:
                on_wait()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# One writer per run directory.
# --------------------------------------------------------------------------------------------
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

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise RunLocked(
                        f"run directory {self.path.parent} is in use by {holder}; one process may write "
                        "a run at a time (wait for it, or pick another run_dir)"
                    ) from None
                raise
            # the file locked must still be the one at the path: a holder that removed its lock file
            # just before we locked our (now unlinked) copy does not make two holders
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunLocked(
                f"run directory {self.path.parent}: its lock file keeps changing; another process is "
                "starting or ending a run there"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock; with ``remove``, delete the lock file first, while still holding it (only the
        holder ever removes it)."""
        if self.fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_run_dir(path: Path) -> bool:
    return RunDir(path).is_run()


def read_config(run_dir: Path) -> dict:
    """The saved config as a dict; a clear error for a missing, empty or truncated file."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG}); start a run with `stablerl train`")
    text = path.read_text(errors="replace")
    copies = sorted(RunDir(run_dir).checkpoints.glob(f"step_*/{CONFIG_COPY}"))
    restore = f"copy the intact copy {copies[-1]} back to {path}" if copies else "restore it"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else f"not valid JSON ({e.msg} at line {e.lineno})"
        raise ValueError(f"{path} is {what}, so the run cannot be resumed; {restore}, or start a new run") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a config object, so the run cannot be resumed; {restore}")
    return data


def record_config(run_dir: Path, cfg: RunConfig, step: int, changes: dict | None = None) -> None:
    """Write ``config.json`` (atomically) and append the changes, with their step, to the record."""
    run_dir = RunDir(run_dir)
    write_json_atomic(run_dir.config, cfg.model_dump(mode="json"))
    if changes:
        line = {
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
        }
        append_line(run_dir.changes, json.dumps(line))


def discard_unstarted(files: RunDir, lock: RunLock | None) -> None:
    """Remove what a run wrote before completing anything while still holding the lock, then the
    lock file (only its holder ever removes it), then the directory if nothing else is in it."""
    files.remove_unstarted()
    if lock is not None:
        lock.release(remove=True)
    try:
        files.path.rmdir()
    except OSError:
        pass


def prepare(files: RunDir, cfg: RunConfig, state: RunState, changes: dict, log) -> None:
    """Record the config (and any change a resume makes); a run without a checkpoint starts clean."""
    files.path.mkdir(parents=True, exist_ok=True)
    if state.step == 0:  # a fresh run, or a resumed one killed before its first checkpoint
        files.start_fresh()
    else:
        files.cut_logs_to(state)
    record_config(files.path, cfg, state.step, changes)
    if changes:
        described = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        log(f"[resume] config changes from step {state.step + 1}: {described}")
