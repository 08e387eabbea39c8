"""The errors that end a run with a message instead of a traceback (the CLI prints them)."""

from __future__ import annotations


class TrainingAborted(RuntimeError):
    """The run stopped for a reason its message names (non-finite steps, a dead worker, a full
    disk); the last checkpoint is intact."""


class RankStopped(TrainingAborted):
    """A collective failed: a rank died, hung or was stopped. Every rank that sees it reports it
    (rank 0 may be the one that stopped)."""
