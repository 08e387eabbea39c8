"""Launching `stablerl train` under torchrun from a test: a free port, a timeout, no orphans."""

import os
import signal
import subprocess
import sys

import pytest


def torchrun_train(args: list[str], *, nproc: int = 2, timeout: float = 240) -> tuple[int, str]:
    """``torchrun --standalone`` (a free port of its own) in its own session; on timeout the
    whole process group is killed and the test fails with the output's tail."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "stablerl",
        "train",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_session(proc)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-3000:]}")
    finally:
        end_session(proc)
    return proc.returncode, out


def torchrun_start(args: list[str], *, nproc: int = 2) -> subprocess.Popen:
    """``torchrun_train`` without waiting: the caller interacts with the run, then must end the
    whole process group (``os.killpg(proc.pid, SIGKILL)``) whatever happens."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "stablerl",
        "train",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` below the launcher, if running."""
    from stablerl.tasks.process_tree import descendants

    for pid in descendants(launcher_pid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(x.startswith(b"TORCHELASTIC_RUN_ID=") for x in env):
            return pid
    return None


def end_session(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process below it, if anything is left. torchrun starts each rank
    in a session of its own, so its process group alone would leave them behind: the ranks (and
    their reward workers) are found by ancestry first."""
    from stablerl.tasks.process_tree import kill_tree

    kill_tree(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
