"""The errors that end a run with a message instead of a traceback (the CLI prints them)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class TrainingAborted(RuntimeError):
    """The run stopped for a reason its message names (non-finite steps, a dead worker, a full
    disk); the last checkpoint is intact."""


class RankStopped(TrainingAborted):
    """A collective failed: a rank died, hung or was stopped. Every rank that sees it reports it
    (rank 0 may be the one that stopped)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, Slurm and Kubernetes send): handled as Ctrl-C is, so the run's
    summary says it was interrupted and ``--resume`` continues it."""


@contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (elsewhere signal
    handlers cannot be set, and nothing changes); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
