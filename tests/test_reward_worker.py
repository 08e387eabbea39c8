"""A reward worker's process cap: the kernel's RLIMIT_NPROC counts threads, and a user's threads
grow after a worker starts, so the cap set before a call must leave room for every thread the
user runs then (in the worker and in the helpers it started), and still stop a fork bomb: each
worker's tree has its own allowance, which what its earlier calls left running uses up."""

# imported before a child drops to a user that may not read the interpreter's files
import ctypes  # noqa: F401
import os
import resource  # noqa: F401
import select
import signal
import threading
import time
import traceback

import pytest

from stablerl.tasks.process_tree import (
    MAX_WORKER_PROCESSES,
    PR_SET_PDEATHSIG,
    TaskCap,
    _parents,
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
        parents = _parents()
        assert user_tasks(os.getuid(), parents, []) >= mine
        assert user_tasks(os.getuid(), parents, [os.getpid()]) <= user_tasks(os.getuid(), parents, []) - mine
        assert user_tasks(-7, parents, []) == 0  # no process has that owner
    finally:
        ev.set()


def _in_child(fn) -> str:
    """``fn()``'s result in a forked child: as a user of its own (nobody) where this is root, so
    the kernel's limit applies (root is exempt) and no other process shares the count."""
    deadline = time.monotonic() + 30
    while ROOT and user_tasks(NOBODY, _parents(), []) and time.monotonic() < deadline:
        time.sleep(0.05)  # an earlier test's processes still exiting would count against this one
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
    """A trainer with BUSY_THREADS threads; its worker counts, starts a thread, then bombs."""
    ev = threading.Event()
    assert _start_threads(BUSY_THREADS, ev) == BUSY_THREADS

    def worker() -> str:
        TaskCap()()
        return f"{_start_threads(1, ev)} {_start_threads(2 * MAX_WORKER_PROCESSES, ev)}"

    return os.read(_spawn(worker), 100).decode()


def test_a_capped_worker_beside_many_threads_starts_a_thread_and_a_fork_bomb_stops():
    first, bomb = _in_child(_busy_then_capped).split()
    assert first == "1"  # a verifier's thread pool starts
    if ROOT:  # the worker's tree: itself, that thread and the bomb
        assert int(bomb) == MAX_WORKER_PROCESSES - 2
    else:  # other processes of this user come and go meanwhile
        assert int(bomb) < 2 * MAX_WORKER_PROCESSES


def _trainer_grows_after_the_worker_starts() -> str:
    """The worker counts, then the trainer (its parent here) starts BUSY_THREADS threads; the
    worker's next count must include them."""
    capped_r, capped_w = os.pipe()
    grown_r, grown_w = os.pipe()

    def worker() -> str:
        cap = TaskCap(min_interval_s=0)
        cap()
        os.write(capped_w, b"x")
        os.read(grown_r, 1)
        cap()  # the next call's count
        return str(_start_threads(1, threading.Event()))

    answer = _spawn(worker)
    os.read(capped_r, 1)
    assert _start_threads(BUSY_THREADS, threading.Event()) == BUSY_THREADS
    os.write(grown_w, b"x")
    return os.read(answer, 100).decode()


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


def _three_workers_bomb_one_after_another() -> str:
    def worker() -> str:
        TaskCap(min_interval_s=0)()
        return str(_start_threads(2 * MAX_WORKER_PROCESSES, threading.Event()))

    return " ".join(os.read(_spawn(worker), 100).decode() for _ in range(3))


@pytest.mark.skipif(not ROOT, reason="needs a user of its own (root runs the child as nobody)")
def test_each_worker_s_tree_has_its_own_allowance():
    # each worker counts while the earlier ones' bombs still run: another worker (or another run
    # of the same user) does not starve it
    counts = [int(n) for n in _in_child(_three_workers_bomb_one_after_another).split()]
    assert counts == [MAX_WORKER_PROCESSES - 1] * 3  # each worker is one of its tree's allowance


HELPER_THREADS = 400


def _leftover_then_bomb() -> str:
    def worker() -> str:
        cap = TaskCap(min_interval_s=0)
        cap()
        # a call leaves a helper with HELPER_THREADS threads running (its own main thread besides)
        os.read(_spawn(lambda: str(_start_threads(HELPER_THREADS, threading.Event()))), 100)
        cap()  # the next call's count
        return str(_start_threads(2 * MAX_WORKER_PROCESSES, threading.Event()))

    return os.read(_spawn(worker), 100).decode()


@pytest.mark.skipif(not ROOT, reason="needs a user of its own (root runs the child as nobody)")
def test_what_earlier_calls_left_running_uses_up_the_worker_s_allowance():
    left = MAX_WORKER_PROCESSES - 1 - (HELPER_THREADS + 1)  # the worker, the helper and its threads
    assert _in_child(_leftover_then_bomb) == str(left)


def _helper_started_before_the_trainer_grew() -> str:
    capped_r, capped_w = os.pipe()
    grown_r, grown_w = os.pipe()

    def worker() -> str:
        cap = TaskCap(min_interval_s=0)
        cap()
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
