"""Synchronous vs asynchronous: trained tokens per second of the same config, side by side.

    .venv/bin/python benchmarks/async_pipeline.py [--steps 24] [--skip 4] [--out runs/bench/async_pipeline.json]
                                                  [--set train.compile=true ...]

- sync:  one process, both cores (2 threads), rollout.max_staleness=0 — sample, then train.
- async: torchrun with 1 learner + 1 rollout worker (1 thread each), rollout.max_staleness=1 — the
  worker samples step s + 1 while the learner trains step s.

The model is the default tiny Qwen3-MoE at random init (throughput does not care what it knows),
the default batch (16 prompts x 8 responses) and response limit. Per step: trained tokens / step
time, median over the steps after ``--skip`` warm-up steps. Also reported: the sync run's
rollout/update split and the ideal ratio it implies if the two halves overlapped perfectly on a
core each, (rollout + update) / max(rollout_1core, update_1core), with the 1-core times taken
from the async run itself (the learner's update time; the worker's sampling time = step time
minus the learner's wait for it is not separable, so the sync rollout time x the measured
1-core/2-core slowdown of the update stands in for it), and ``bound_from_update`` = (rollout +
update) / the async learner's one-core update, a bound that needs no estimate: an overlapped step
is never shorter than the learner's update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--skip", type=int, default=4)
    ap.add_argument("--out", default="runs/bench/async_pipeline.json")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides applied to both layouts (e.g. train.compile=true)",
    )
    args = ap.parse_args()

    from stablerl.checkpoint import save_model_dir
    from stablerl.config import ModelConfig
    from stablerl.models import build_default_policy, build_tokenizer
    from stablerl.runlog import read_metrics

    tmp = Path(tempfile.mkdtemp(prefix="stablerl-async-"))
    tok = build_tokenizer()
    model_dir = save_model_dir(tmp / "model", build_default_policy(ModelConfig(), tok), tok)
    common = [
        f"model.path={model_dir}",
        f"train.steps={args.steps}",
        "eval.every=100000",
        "eval.greedy=false",
        "eval.sampled=false",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.every=100000",
        "task.reward_workers=1",
        *args.set,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(name, launcher, extra):
        run_dir = tmp / name
        cmd = [*launcher, *common, f"run_dir={run_dir}", *extra]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return read_metrics(run_dir)[1 + args.skip :]

    py = [sys.executable, "-m", "stablerl", "train"]
    sync = train("sync", py, ["rollout.max_staleness=0", "distributed.threads=2"])
    tr = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "stablerl",
        "train",
    ]
    async_ = train("async", tr, ["rollout.max_staleness=1", "rollout.workers=1", "distributed.threads=1"])

    def rate(rows):
        return statistics.median(r["train_tokens"] / r["step_time"] for r in rows)

    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    r2, u2 = med(sync, "rollout_time"), med(sync, "train_time")
    u1 = med(async_, "train_time")
    r1 = r2 * (u1 / u2)  # sampling on one core, by the update's measured 1-core / 2-core slowdown
    report = {
        "set": args.set,
        "steps_measured": len(sync),
        "sync_tokens_per_s": rate(sync),
        "async_tokens_per_s": rate(async_),
        "ratio": rate(async_) / rate(sync),
        "sync_rollout_s": r2,
        "sync_update_s": u2,
        "async_update_s": u1,
        "async_learner_wait_s": med(async_, "pipeline/learner_wait_s"),
        "async_worker_wait_s": med(async_, "pipeline/worker_wait_s"),
        "ideal_ratio": (r2 + u2) / max(r1, u1),
        # the measured bound: an overlapped step cannot be shorter than the learner's one-core
        # update, whatever sampling costs on one core (the estimate above guesses that cost and
        # is too low where sampling scales worse with threads than the update does)
        "bound_from_update": (r2 + u2) / u1,
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
