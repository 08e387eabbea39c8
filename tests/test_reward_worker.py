"""A reward worker's process cap: the kernel's RLIMIT_NPROC counts threads, and a user's threads
grow after a worker starts, so the cap set before a call must leave room for every thread the
user runs then, and still stop a fork bomb."""

import os
import resource
import select
import threading
import traceback

import pytest

from stablerl.tasks.process_tree import MAX_WORKER_PROCESSES, TaskCap, user_tasks

NOBODY = 65534
BUSY_THREADS = 600  # more than MAX_WORKER_PROCESSES: a trainer's thread pools on a large node
ROOT = os.geteuid() == 0


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


def _in_child(fn) -> str:
    """``fn()``'s result in a forked child: as a user of its own (nobody) where this is root, so
    the kernel's limit applies (root is exempt) and no other process shares the count."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if ROOT:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            out = fn()
        except BaseException:  # noqa: BLE001 - reported to the parent
            out = "error\n" + traceback.format_exc()
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        assert ready, "the child did not answer in 120 s"
        with os.fdopen(r) as f:
            return f.read()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def _start_threads(n: int, ev: threading.Event) -> int:
    """How many of ``n`` threads started before the kernel refused one."""
    for i in range(n):
        try:
            threading.Thread(target=ev.wait, daemon=True).start()
        except RuntimeError:
            return i
    return n


def _busy_then_capped() -> str:
    ev = threading.Event()
    assert _start_threads(BUSY_THREADS, ev) == BUSY_THREADS
    TaskCap()()
    return f"{_start_threads(1, ev)}\n{_start_threads(2 * MAX_WORKER_PROCESSES, ev)}"


def test_a_capped_worker_beside_many_threads_starts_a_thread_and_a_fork_bomb_stops():
    first, bomb = _in_child(_busy_then_capped).split("\n")
    assert first == "1"  # a verifier's thread pool starts
    if ROOT:  # the cap is the user's tasks when counted plus MAX_WORKER_PROCESSES; one is taken
        assert int(bomb) == MAX_WORKER_PROCESSES - 1
    else:  # other processes of this user come and go meanwhile
        assert int(bomb) < 2 * MAX_WORKER_PROCESSES


def _trainer_grows_after_the_worker_starts() -> str:
    """The worker counts, then another process of its user (a trainer) starts BUSY_THREADS
    threads; the next call's count must include them."""
    cap = TaskCap(min_interval_s=0)
    cap()
    grown_r, grown_w = os.pipe()
    stop_r, stop_w = os.pipe()
    trainer = os.fork()
    if trainer == 0:
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))  # the trainer is not capped
        _start_threads(BUSY_THREADS, threading.Event())
        os.write(grown_w, b"x")
        os.read(stop_r, 1)
        os._exit(0)
    try:
        os.read(grown_r, 1)
        cap()
        return str(_start_threads(1, threading.Event()))
    finally:
        os.write(stop_w, b"x")
        os.waitpid(trainer, 0)


@pytest.mark.skipif(not ROOT, reason="needs a user of its own (root runs the child as nobody)")
def test_the_cap_is_counted_again_before_a_call_after_the_trainer_grew():
    assert _in_child(_trainer_grows_after_the_worker_starts) == "1"
