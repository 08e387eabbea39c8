"""A reward worker's process cap: the kernel's RLIMIT_NPROC counts threads, and a user's threads
grow after a worker starts, so the cap set before a call must leave room for every thread the
user runs then (in the worker and in the helpers it started), and still stop a fork bomb, one
allowance for all workers together."""

import ctypes  # noqa: F401 - imported (as resource below) before a child drops to a user that may not read them
import os
import resource
import select
import signal
import threading
import time
import traceback

import pytest

from stablerl.tasks.process_tree import (
    MAX_WORKER_PROCESSES,
    PR_SET_NAME,
    PR_SET_PDEATHSIG,
    WORKER_NAME,
    TaskCap,
    prctl,
    user_tasks,
)

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


def _spawn(fn) -> int:
    """Fork a process that writes ``fn()`` to the returned pipe, then stays (with whatever it
    started) until its parent exits."""
    r, w = os.pipe()
    if os.fork() == 0:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.write(w, fn().encode())
        while True:
            time.sleep(3600)
    os.close(w)
    return r


def _as_worker(cap: TaskCap) -> None:
    prctl(PR_SET_NAME, WORKER_NAME.encode())
    cap()


def _three_workers_bomb_one_after_another() -> str:
    def worker() -> str:
        _as_worker(TaskCap(min_interval_s=0))
        return str(_start_threads(2 * MAX_WORKER_PROCESSES, threading.Event()))

    return " ".join(os.read(_spawn(worker), 100).decode() for _ in range(3))


@pytest.mark.skipif(not ROOT, reason="needs a user of its own (root runs the child as nobody)")
def test_the_workers_share_one_allowance_so_bombs_in_several_stop_at_it():
    # each worker counts while the earlier ones' bombs still run: they are not the user's other tasks
    counts = [int(n) for n in _in_child(_three_workers_bomb_one_after_another).split()]
    assert counts == [MAX_WORKER_PROCESSES - 1, 0, 0]  # the first worker is one of the allowance


def _helper_started_before_the_trainer_grew() -> str:
    capped_r, capped_w = os.pipe()
    grown_r, grown_w = os.pipe()

    def worker() -> str:
        cap = TaskCap(min_interval_s=0)
        _as_worker(cap)
        ask_r, ask_w = os.pipe()
        helper = _spawn(lambda: (os.read(ask_r, 1), str(_start_threads(1, threading.Event())))[1])
        os.write(capped_w, b"x")
        os.read(grown_r, 1)
        cap()  # the next call's count
        os.write(ask_w, b"x")
        return os.read(helper, 100).decode()

    answer = _spawn(worker)
    os.read(capped_r, 1)
    trainer = _spawn(lambda: str(_start_threads(BUSY_THREADS, threading.Event())))
    assert os.read(trainer, 100) == str(BUSY_THREADS).encode()
    os.write(grown_w, b"x")
    return os.read(answer, 100).decode()


@pytest.mark.skipif(not ROOT, reason="needs a user of its own (root runs the child as nobody)")
def test_a_helper_the_worker_started_gets_the_new_count_too():
    assert _in_child(_helper_started_before_the_trainer_grew) == "1"
