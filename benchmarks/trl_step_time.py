"""Seconds per on-policy RL step: `stablerl train` vs TRL's GRPOTrainer, side by side.

Same model (the default tiny Qwen3-MoE, one saved checkpoint loaded by both), same task prompts
and reward, 8 prompts x 8 responses per step, sampled with the fp32 weights by both
(`--precision`), at most `--new-tokens` (32) new tokens, temperature 1, CPU, one optimizer step per rollout batch
(on-policy), no reference model / KL term. Each framework runs
`--steps` steps per round, alternating for `--rounds` rounds in one process; the first
`--warmup` steps of every round are dropped, and the median step time is compared.

TRL is an optional benchmark dependency: `.venv/bin/pip install -e '.[bench]'`.

    .venv/bin/python benchmarks/trl_step_time.py [--steps 8] [--rounds 2]
    .venv/bin/python benchmarks/trl_step_time.py --shape deep --new-tokens 160   # long responses
    .venv/bin/python benchmarks/trl_step_time.py --shape deep --new-tokens 160 \
        --set batch.packing=true batch.max_tokens_per_micro_batch=4096 rollout.drop_finished=true

After the rounds, one more stablerl round runs under torch.profiler: its matrix-multiply self time
per step is stablerl's floor (benchmarks/profiling.py), and ``bound`` = TRL's median / that floor
is the largest speedup that removing overhead could reach without doing less arithmetic.
``--no-floor`` skips that round: a profile of the deep shape's steps holds millions of events and
took 12 GB of memory to read back (21 GB with ``rollout.compile``), more than a shared machine
may spare.

`--shape deep` is examples/deep_moe's shape (8 layers, 32 experts, top-4) at random init (a fresh
checkpoint), whose responses run long.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from profiling import floor_fields, matmul_ms  # benchmarks/profiling.py
from shapes import SHAPES  # benchmarks/shapes.py
from torch.profiler import ProfilerActivity, profile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def stablerl_round(
    ckpt: Path, steps: int, run_dir: Path, precision: str, new_tokens: int, overrides: list[str]
) -> list[dict]:
    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.loop import Trainer
    from stablerl.runlog import read_metrics

    cfg = build_config(
        RunConfig,
        None,
        [
            f"model.path={ckpt}",
            f"run_dir={run_dir}",
            f"train.steps={steps}",
            "batch.prompts_per_step=8",
            "batch.group_size=8",
            f"rollout.max_new_tokens={new_tokens}",
            f"rollout.precision={precision}",
            "batch.micro_batch_size=64",
            "eval.every=100000",
            "eval.greedy=false",
            "eval.sampled=false",
            "checkpoint.every=100000",
            "log.progress=false",
            "log.tensorboard=false",
            "task.eval_size=1",
            *overrides,
        ],
    )
    Trainer(cfg, run_dir, log=lambda *_: None).run()
    return [r for r in read_metrics(run_dir) if "step_time" in r]


def trl_round(ckpt: Path, steps: int, out_dir: Path, new_tokens: int) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from stablerl.tasks import ArithmeticTask

    task = ArithmeticTask()
    problems = [task.train_problem(i) for i in range(8 * steps)]
    answers = {p.prompt: p for p in problems}
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    tokenizer.padding_side = "left"
    data = Dataset.from_dict({"prompt": [tokenizer.bos_token + p.prompt for p in problems]})

    def reward(prompts, completions, **_):
        return [task.reward(c, answers[p.removeprefix(tokenizer.bos_token)]) for p, c in zip(prompts, completions)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=5e-5,
        max_steps=steps,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_dropout=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Timer()]
    )
    trainer.train()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpoint", help="HF checkpoint to use (default: a fresh tiny MoE of --shape)")
    ap.add_argument("--shape", default="default", choices=list(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp8"],
        help="stablerl's rollout engine precision (TRL generates with the fp32 training model, "
        "so fp32 is the like-for-like comparison; bf16/fp8 add the emulation's cost)",
    )
    ap.add_argument("--no-floor", action="store_true", help="skip the profiled round (no matmul floor)")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more stablerl config overrides, e.g. the options that do less arithmetic: "
        "batch.packing=true batch.max_tokens_per_micro_batch=4096 rollout.drop_finished=true",
    )
    args = ap.parse_args()

    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model, build_tokenizer, default_model_config

    tmp = Path(tempfile.mkdtemp(prefix="stablerl-bench-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        tok = build_tokenizer()
        ckpt = save_model_dir(tmp / "model", build_model(default_model_config(tok, **SHAPES[args.shape]), seed=0), tok)
    times: dict[str, list[float]] = {"stablerl": [], "trl": []}
    ours: list[dict] = []
    for r in range(args.rounds):
        ours += stablerl_round(ckpt, args.steps, tmp / f"stablerl{r}", args.precision, args.new_tokens, args.set)[
            args.warmup :
        ]
        times["trl"] += trl_round(ckpt, args.steps, tmp / f"trl{r}", args.new_tokens)[args.warmup :]
    times["stablerl"] = [m["step_time"] for m in ours]
    med = {k: statistics.median(v) for k, v in times.items()}
    # stablerl's own split of a step (from its metrics): rollout = generation + rewards, train = update
    split = {k: statistics.median(m[k] for m in ours) for k in ("rollout_time", "train_time")}
    result = {
        "setup": vars(args) | {"torch_threads": torch.get_num_threads()},
        "median_step_s": med,
        "stablerl_median_split_s": split,
        "steps_measured": {k: len(v) for k, v in times.items()},
        "speedup": med["trl"] / med["stablerl"],
    }
    if not args.no_floor:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stablerl_round(ckpt, args.steps, tmp / "stablerl_profiled", args.precision, args.new_tokens, args.set)
        result |= floor_fields(matmul_ms(prof) / 1e3 / args.steps, med["stablerl"], med["trl"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
