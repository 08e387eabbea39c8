"""Data-parallel scaling: step time and tokens/s of `stablerl train` at K = 1, 2, ... ranks for
the same global batch (gloo on CPU, NCCL on GPUs: torchrun picks the backend from the machine).

    python benchmarks/scaling.py                       # K = 1 and 2, default tiny MoE
    python benchmarks/scaling.py --ranks 1 2 4 8       # a GPU machine
    python benchmarks/scaling.py --threads-per-rank 1  # CPU: fix threads, so K=2 uses 2x the cores

Each K trains the same config from the same start for --steps steps; the first --warmup steps
are dropped and medians are reported (rollout, update, whole step; response tokens per second).
Results go to the console and to --out (JSON).
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


def run(k: int, args, workdir: Path, ckpt: Path) -> dict:
    run_dir = workdir / f"k{k}"
    overrides = [
        f"model.path={ckpt}",
        f"run_dir={run_dir}",
        f"train.steps={args.steps}",
        f"batch.prompts_per_step={args.prompts}",
        f"batch.group_size={args.group}",
        f"batch.minibatches_per_step={args.minibatches}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"rollout.precision={args.precision}",
        "eval.every=100000",
        "eval.greedy=false",
        "eval.sampled=false",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.every=100000",
    ]
    if args.threads_per_rank:
        overrides.append(f"distributed.threads={args.threads_per_rank}")
    if k == 1:
        cmd = [sys.executable, "-m", "stablerl", "train", *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={k}",
            "-m",
            "stablerl",
            "train",
            *overrides,
        ]
    env = {**os.environ}
    if args.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(args.threads_per_rank)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise SystemExit(f"K={k} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > args.warmup]
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    tokens = statistics.median(r["response_len_mean"] * args.prompts * args.group for r in rows)
    return {
        "ranks": k,
        "step_s": med("step_time"),
        "rollout_s": med("rollout_time"),
        "update_s": med("train_time"),
        "response_tokens_per_s": tokens / med("step_time"),
        "steps_measured": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (the global batch, all ranks)")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--threads-per-rank", type=int, default=0, help="0: stablerl's default (cores / ranks)")
    ap.add_argument("--out", default="runs/bench/scaling.json")
    args = ap.parse_args()

    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model, build_tokenizer, default_model_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer()
        ckpt = save_model_dir(tmp / "model", build_model(default_model_config(tok), seed=0), tok)
        results = [run(k, args, tmp, ckpt) for k in args.ranks]
    base = results[0]
    print(f"{'K':>3} {'step s':>8} {'rollout s':>10} {'update s':>9} {'tokens/s':>9} {'speed-up':>9}")
    for r in results:
        r["speedup"] = base["step_s"] / r["step_s"]
        print(
            f"{r['ranks']:>3} {r['step_s']:>8.3f} {r['rollout_s']:>10.3f} {r['update_s']:>9.3f} "
            f"{r['response_tokens_per_s']:>9.0f} {r['speedup']:>8.2f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
