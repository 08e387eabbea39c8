"""A reward worker's confinement: the kernel's RLIMIT_NPROC counts threads, so the cap set on a
worker must leave room for every thread its user already runs, and still stop a fork bomb."""

import os
import resource  # noqa: F401 - imported before the child drops to a user that may not read the interpreter's files
import threading

import pytest

from stablerl.tasks.process_tree import MAX_WORKER_PROCESSES, user_tasks
from stablerl.tasks.reward_worker import _confine

NOBODY = 65534
BUSY_THREADS = 600  # more than MAX_WORKER_PROCESSES: a trainer's thread pools on a large node


def test_user_tasks_counts_this_process_s_threads_as_the_kernel_does():
    ev = threading.Event()
    started = [threading.Thread(target=ev.wait, daemon=True) for _ in range(20)]
    for t in started:
        t.start()
    try:
        with open("/proc/self/status") as f:
            mine = int(next(line for line in f if line.startswith("Threads:")).split()[1])
        assert mine >= 21
        assert user_tasks(os.getuid()) >= mine
        assert user_tasks(-7) == 0  # no process has that owner
    finally:
        ev.set()


def _confined_child(write_fd: int) -> None:
    """In a forked child, as a user of its own: run BUSY_THREADS threads, confine, then start one
    thread (a verifier's thread pool) and then threads without end (a fork bomb)."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)  # drops root's exemption from RLIMIT_NPROC
    ev = threading.Event()
    for _ in range(BUSY_THREADS):
        threading.Thread(target=ev.wait, daemon=True).start()
    _confine(None)
    try:
        threading.Thread(target=ev.wait, daemon=True).start()
        first = "started"
    except RuntimeError as e:
        first = str(e)
    bomb = 0
    try:
        while bomb < 2 * MAX_WORKER_PROCESSES:
            threading.Thread(target=ev.wait, daemon=True).start()
            bomb += 1
    except RuntimeError:
        pass
    os.write(write_fd, f"{first}\n{bomb}".encode())


@pytest.mark.skipif(os.geteuid() != 0, reason="running a worker as a user of its own needs root")
def test_a_confined_worker_beside_many_threads_starts_a_thread_and_a_fork_bomb_stops():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _confined_child(w)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    first, bomb = out.split("\n")
    assert first == "started"
    # the cap is the user's tasks when confined plus MAX_WORKER_PROCESSES; one of those is taken
    assert int(bomb) == MAX_WORKER_PROCESSES - 1
