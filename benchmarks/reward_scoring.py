"""Seconds to score one RL step's responses in the reward pool, the bound on what overlapping
reward scoring with the next forward could save (issue 21's candidate).

    .venv/bin/python benchmarks/reward_scoring.py [--prompts 8] [--group 8] [--repeats 20]

The default task and reward pool (`task.*` defaults: worker processes, per-response jobs), one
step's worth of responses (prompts x group, each the task's teacher solution of its prompt, some of
them wrong as the task's teachers are), medians over ``--repeats`` after a warm-up. Compare with the step time of
benchmarks/trl_step_time.py: the share is the most that hiding scoring behind the next forward
could remove.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from stablerl.config import TaskConfig
from stablerl.tasks import build_task, reward_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    cfg = TaskConfig()
    task = build_task(cfg)
    problems = [task.train_problem(i) for i in range(args.prompts)]
    items = [(p.prompt, p.solution, p.reward_fields()) for p in problems for _ in range(args.group)]
    with reward_pool(task, cfg) as pool:
        mean_reward = statistics.mean(pool.score(items).total)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            pool.score(items)
            times.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "setup": vars(args) | {"reward_workers": cfg.reward_workers},
                "median_s": statistics.median(times),
                "min_s": min(times),
                "mean_reward": mean_reward,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
