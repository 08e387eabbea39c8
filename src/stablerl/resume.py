"""What a resume reads back from a run directory, and why it may trust it.

Anything in a run directory may have been changed since the run wrote it (a shared directory, a
stray edit). A resume therefore continues from what its checkpoint recorded, checksummed
(checkpoint.damage): the run's config is the checkpoint's copy (``run_config.json``), not
``RUN_DIR/config.json``, and only the overrides the user types change it, under the rules of
``stablerl.config.RESUMABLE_KEYS``. ``RUN_DIR/config.json`` is compared with that copy and every
key where it differs is named. The KL penalty's frozen reference, read again from its folder on a
resume, must be the weights the run started from: their digest is recorded in the checkpoint's
state and a different one is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stablerl import checkpoint
from stablerl.config import RunConfig
from stablerl.config_io import build_config, flatten, resume_changes
from stablerl.rundir import CONFIG_COPY, RunDir, read_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def recorded_config(run_dir: Path) -> tuple[dict, list[str]]:
    """The config a resume of ``run_dir`` continues — the newest intact checkpoint's checksummed
    copy, or ``RUN_DIR/config.json`` for a run without a checkpoint yet — and a warning naming
    every key where ``RUN_DIR/config.json`` says otherwise."""
    data = read_config(run_dir)  # readable, or a clear error naming it (and the intact copy)
    ckpt, _ = checkpoint.latest_good(run_dir)
    copy = None if ckpt is None else ckpt / CONFIG_COPY
    if copy is None or not copy.is_file():
        return data, []
    recorded = json.loads(copy.read_text())
    before, after = flatten(recorded), flatten(data)
    differ = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not differ:
        return recorded, []
    return recorded, [
        f"{RunDir(run_dir).config} differs from the checksummed record {copy} in {', '.join(differ)}: "
        "resuming with the checkpoint's record (type a change a resume allows as an override)"
    ]


def _recorded(run_dir: Path) -> tuple[dict, RunConfig, list[str]]:
    data, warnings = recorded_config(run_dir)
    try:
        return data, RunConfig.model_validate(data), warnings
    except ValueError as e:
        raise ValueError(f"{RunDir(run_dir).config} is not a valid config for this version of stablerl: {e}") from None


def resume_config(run_dir: Path, config_file: str | None, overrides: list[str]) -> RunConfig:
    """The recorded config with ``--config FILE`` and overrides applied (what a resume may change
    is checked once, by the trainer: ``saved_changes``)."""
    data, saved, _ = _recorded(run_dir)
    cfg = build_config(RunConfig, config_file, overrides, base=data)
    cfg.run_dir = saved.run_dir
    return cfg


def saved_changes(run_dir: Path, cfg: RunConfig) -> tuple[dict[str, tuple], list[str]]:
    """``{key: (recorded, new)}`` of what resuming ``run_dir`` with ``cfg`` changes (a ValueError
    naming every key that may not change on a resume), and the warnings of ``recorded_config``."""
    _, saved, warnings = _recorded(run_dir)
    return resume_changes(saved, cfg), warnings


def weights_digest(path: Path) -> str:
    """SHA-256 over the weight files of an HF model directory (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_reference(path: Path, recorded: str | None) -> str:
    """The digest of the KL reference at ``path``; a ValueError naming both digests when the run
    recorded another (its weights were replaced since the run started)."""
    digest = weights_digest(path)
    if recorded is not None and digest != recorded:
        raise ValueError(
            f"loss.kl_beta > 0: the reference policy at {path} is not the run's starting weights (its "
            f"weights' SHA-256 is {digest}, the run recorded {recorded}); restore the starting weights "
            "there to resume"
        )
    return digest
