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


# how many more processes or threads a reward worker's user may start (RLIMIT_NPROC; root is exempt)
MAX_WORKER_PROCESSES = 512


def owner_uid(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def user_tasks(uid: int) -> int:
    """The tasks the kernel counts against ``uid``'s RLIMIT_NPROC: every thread of every process
    it owns (a trainer's thread pools count, not only its processes)."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and owner_uid(entry) == uid:
            try:
                total += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:  # it exited meanwhile
                pass
    return total


class TaskCap:
    """RLIMIT_NPROC for a reward call: MAX_WORKER_PROCESSES more tasks than the user runs when the
    call starts, so a fork bomb in a verifier stops there. The kernel counts every thread of every
    process of the user, and those grow after a worker starts (the trainer's thread pools, a vLLM
    server), so the count is taken again before each call, at most every ``min_interval_s`` (a
    count reads /proc: ~1 ms per 100 processes). Never above the limit the worker started with;
    the kernel exempts root."""

    def __init__(self, min_interval_s: float = 1.0):
        import resource  # POSIX only: imported here, where the worker (Linux) needs it

        self.resource, self.min_interval_s, self.counted_at = resource, min_interval_s, -math.inf
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_NPROC)

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.counted_at < self.min_interval_s:
            return
        self.counted_at = now
        try:
            cap = user_tasks(os.getuid()) + MAX_WORKER_PROCESSES
            for limit in (self.soft, self.hard):
                if limit != self.resource.RLIM_INFINITY:
                    cap = min(cap, limit)
            self.resource.setrlimit(self.resource.RLIMIT_NPROC, (cap, self.hard))
        except (OSError, ValueError):  # no /proc, or a limit the kernel refuses: no cap
            pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL every descendant of ``pid`` (a worker is their subreaper, so a grandchild that
    double-forked or started a new session is still one)."""
    for child in descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
