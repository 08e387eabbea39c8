"""A finished run's record: what the report reads from a run directory (its summary, its
metrics rows and its N), in one small gzipped JSON file per run, kept beside the report
(``<out>/<experiment>/records/<variant>/seed<k>.json.gz``).

Why: a run directory holds checkpoints and weights (tens of MB) and is never committed, so without
records a lost machine loses every finished run and the report cannot be regenerated. The records are
small enough to commit with the report (docs/results/), and the report reads a run from its
record when its directory is gone — so a report is always regenerable from what is committed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from stablerl.rundir import atomic_write_bytes

RECORDS = "records"


def record_path(out: Path, experiment: str, variant: str, seed: int) -> Path:
    return Path(out) / experiment / RECORDS / variant / f"seed{seed}.json.gz"


def pack(summary: dict, rows: list[dict], n: int) -> bytes:
    """The record's bytes: gzip with no timestamp (mtime=0), so the same run always packs to the
    same bytes and a regenerated report does not change a committed record."""
    text = json.dumps({"summary": summary, "minibatches_per_step": n, "metrics": rows}, sort_keys=True)
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def write_record(path: Path, summary: dict, rows: list[dict], n: int) -> bool:
    """Write the record unless an identical one is there; returns whether it wrote."""
    data = pack(summary, rows, n)
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return True


def read_record(path: Path) -> tuple[dict, list[dict], int]:
    """``(summary, metrics rows, N)`` as ``stats.finished_runs_by_seed`` returns a run's."""
    try:
        data = json.loads(gzip.decompress(Path(path).read_bytes()))
        return data["summary"], data["metrics"], int(data["minibatches_per_step"])
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"unreadable run record {path}: {e}") from e
