"""Rewarding a batch without letting a verifier kill the run.

A verifier that raises, or runs past ``timeout_s``, gives reward 0 and is counted; the run goes
on. Timeouts use a worker thread (a Python thread cannot be killed, so a verifier stuck forever
keeps its thread; math-verify bounds its own parsing and verification time as well).
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass

from stablerl.tasks.base import Problem, Task


@dataclass
class RewardStats:
    errors: int = 0
    timeouts: int = 0
    first_error: str = ""


def compute_rewards(task: Task, responses: list[str], problems: list[Problem],
                    timeout_s: float = 10.0) -> tuple[list[float], RewardStats]:
    stats = RewardStats()
    pool = cf.ThreadPoolExecutor(max_workers=1)
    rewards = []
    try:
        for response, problem in zip(responses, problems):
            future = pool.submit(task.reward, response, problem)
            try:
                r = float(future.result(timeout=timeout_s))
                if r != r or r in (float("inf"), float("-inf")):
                    raise ValueError(f"verifier returned {r}")
            except cf.TimeoutError:
                stats.timeouts += 1
                r = 0.0
                # the stuck verifier keeps its thread; later ones get a fresh worker
                pool.shutdown(wait=False, cancel_futures=True)
                pool = cf.ThreadPoolExecutor(max_workers=1)
            except Exception as e:  # noqa: BLE001 - any verifier failure is a reward of 0
                stats.errors += 1
                stats.first_error = stats.first_error or f"{type(e).__name__}: {e}"
                r = 0.0
            rewards.append(r)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return rewards, stats
