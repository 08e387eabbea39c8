"""Atomic, resumable checkpoints.

``RUN_DIR/checkpoints/step_000123/`` holds the model (``save_pretrained``, safetensors), the
tokenizer, the optimizer state and ``state.json`` (step, counters, number of metrics lines). A
checkpoint is written into ``step_000123.tmp`` and renamed when complete, so a kill at any moment
leaves either the previous checkpoint or the new one, never a half-written one; the newest
complete directory is the one a resume uses. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_dir(path: Path, model, tokenizer, extra=None) -> Path:
    """An HF checkpoint directory (``save_pretrained`` safetensors + tokenizer, plus whatever
    ``extra(tmp_dir)`` writes), built in ``<path>.tmp`` and renamed into place when complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def save(run_dir: Path, step: int, model, tokenizer, optimizer, state: dict, keep_last: int) -> Path:
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)

    def trainer_state(tmp: Path) -> None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))

    final = save_model_dir(ckpt_root / f"step_{step:06d}", model, tokenizer, trainer_state)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
                  and (p / STATE_FILE).is_file())


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def load_optimizer(ckpt: Path, optimizer) -> None:
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True))


def truncate_lines(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of a JSONL log (the steps a checkpoint covers)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines[:n_lines]))
    os.replace(tmp, path)
