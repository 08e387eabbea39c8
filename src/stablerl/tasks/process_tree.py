"""The reward workers' processes: Linux prctl calls, and finding and killing a process tree from
/proc (a verifier may start children of its own; none may outlive its worker)."""

from __future__ import annotations

import math
import os
import signal
import time


def prctl(option: int, value: int) -> None:
    """A Linux prctl(2) call; elsewhere nothing (the closed pipe ends a worker, and a timed-out
    call's process group is what gets killed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)
    except Exception:  # noqa: BLE001 - not Linux
        pass


PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36

# how many processes or threads a reward worker's tree (itself, what its calls start) may run,
# beyond its user's other tasks (RLIMIT_NPROC; root is exempt)
MAX_WORKER_PROCESSES = 512


def owner_uid(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc (empty where there is none)."""
    parents = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return parents
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:  # binary: a name cut mid-character is not UTF-8
                parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # it exited meanwhile
            continue
    return parents


def _below(parents: dict[int, int], roots: list[int]) -> list[int]:
    """The processes below ``roots`` (children, theirs, ...), in ``parents`` (_parents')."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, seen, stack = [], set(roots), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                out.append(child)
                stack.append(child)
    return out


def user_tasks(uid: int, parents: dict[int, int], leaving_out: list[int]) -> int:
    """The tasks the kernel counts against ``uid``'s RLIMIT_NPROC (every thread of every process
    it owns: a trainer's thread pools count, not only its processes), of the processes in
    ``parents`` (_parents') but those ``leaving_out``."""
    total = 0
    for pid in parents.keys() - set(leaving_out):
        if owner_uid(str(pid)) == uid:
            try:
                total += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:  # it exited meanwhile
                pass
    return total


class TaskCap:
    """RLIMIT_NPROC for a reward call: the user's tasks outside this worker's tree plus
    MAX_WORKER_PROCESSES, so a fork bomb in a verifier stops there, and what the worker's earlier
    calls left running counts against it. The kernel counts every thread of every process of the
    user, and those grow after a worker starts (the trainer's thread pools, a vLLM server, the other
    workers), so the count is taken again before each call, at most every ``min_interval_s`` (a
    count reads /proc: ~1 ms per 100 processes), and set on the worker's children too (a
    verifier's helper keeps the limit it was started with). Never above the limit the worker
    started with; the kernel exempts root."""

    def __init__(self, min_interval_s: float = 1.0):
        import resource  # POSIX only: imported here, where the worker (Linux) needs it

        self.resource, self.min_interval_s, self.counted_at = resource, min_interval_s, -math.inf
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_NPROC)

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.counted_at < self.min_interval_s:
            return
        self.counted_at = now
        limits, parents = self.resource, _parents()
        children = _below(parents, [os.getpid()])
        try:
            cap = user_tasks(os.getuid(), parents, [os.getpid(), *children]) + MAX_WORKER_PROCESSES
            for limit in (self.soft, self.hard):
                if limit != limits.RLIM_INFINITY:
                    cap = min(cap, limit)
            limits.setrlimit(limits.RLIMIT_NPROC, (cap, self.hard))
        except (OSError, ValueError):  # no /proc, or a limit the kernel refuses: no cap
            return
        for child in children:
            try:
                limits.prlimit(child, limits.RLIMIT_NPROC, (cap, self.hard))
            except (OSError, ValueError):  # it exited, or is not ours to limit
                pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc (empty where there is none)."""
    return _below(_parents(), [pid])


def kill_tree(pid: int) -> None:
    """SIGKILL every descendant of ``pid`` (a worker is their subreaper, so a grandchild that
    double-forked or started a new session is still one)."""
    for child in descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
