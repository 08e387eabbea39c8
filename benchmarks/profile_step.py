"""Where one RL step's time goes: the rollout (decode) and the update (forward, backward,
optimizer), with torch.profiler's top operators of each, and the padded-token fraction of both.

    .venv/bin/python benchmarks/profile_step.py [--shape default|deep] [--new-tokens 40] [--steps 2]

The model is the shape's tiny Qwen3-MoE at random init (the compute of a step does not depend on
the weights' values; a random policy writes full-length responses, the worst case for padding),
on the built-in task, 16 prompts x 8 responses. One warm-up step, then ``--steps`` profiled steps.
The padded-token fraction is the share of positions a forward computes that are padding: for the
update, of each micro-batch's trimmed ``[rows, prompt + longest response]``; for the rollout, of
the ``[B, prompt + max_new_tokens]`` cache the decoder fills.

Each phase's matrix-multiply floor (benchmarks/profiling.py) is its matmul operators' self time
in the profiled steps; ``--steps`` unprofiled steps run first and give the wall times it is set
against (``floor_share``: the share of a step that is matrix arithmetic).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from profiling import matmul_ms, top_ops  # benchmarks/profiling.py
from shapes import SHAPES  # benchmarks/shapes.py
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="default", choices=list(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=2048,
        help="also report the update's padding with batch.max_tokens_per_micro_batch at this budget",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from stablerl.checkpoint import save_model_dir
    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.learner import micro_batches
    from stablerl.loop import Trainer
    from stablerl.models import build_model, build_tokenizer, default_model_config

    tmp = Path(tempfile.mkdtemp(prefix="stablerl-profile-"))
    tok = build_tokenizer()
    ckpt = save_model_dir(tmp / "ckpt", build_model(default_model_config(tok, **SHAPES[args.shape]), seed=0), tok)
    cfg = build_config(
        RunConfig,
        None,
        [
            f"model.path={ckpt}",
            f"run_dir={tmp / 'run'}",
            "log.progress=false",
            "log.tensorboard=false",
            f"rollout.max_new_tokens={args.new_tokens}",
            "task.eval_size=8",
        ],
    )
    trainer = Trainer(cfg, tmp / "run", log=lambda *_: None)
    trainer._setup(resume=False)
    phases = {"rollout": [], "update": []}
    unprofiled = {"rollout": [], "update": []}
    floor = {"rollout": [], "update": []}
    padded = {"rollout": [], "update": []}
    report = {"shape": args.shape, "new_tokens": args.new_tokens}
    for step in range(1, 2 * args.steps + 2):
        if 1 < step <= args.steps + 1:  # unprofiled: the wall times the floor is set against
            t0 = time.perf_counter()
            batch, _ = trainer.rollout(step)
            t1 = time.perf_counter()
            trainer.learner.update(step, batch, first_row=0)
            unprofiled["rollout"].append(t1 - t0)
            unprofiled["update"].append(time.perf_counter() - t1)
            continue
        profiled = step > 1
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as p_roll:
            batch, _ = trainer.rollout(step)
        t1 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as p_upd:
            trainer.learner.update(step, batch, first_row=0)
        t2 = time.perf_counter()
        if not profiled:
            continue
        phases["rollout"].append(t1 - t0)
        phases["update"].append(t2 - t1)
        floor["rollout"].append(matmul_ms(p_roll) / 1e3)
        floor["update"].append(matmul_ms(p_upd) / 1e3)
        B, P = batch.input_ids.shape[0], batch.prompt_width
        padded["rollout"].append(1 - float(batch.attention_mask.sum()) / (B * (P + args.new_tokens)))
        trimmed = batch.trim()
        padded["update"].append(1 - float(trimmed.attention_mask.sum()) / trimmed.attention_mask.numel())
        report["rollout_top"], report["update_top"] = top_ops(p_roll, args.top), top_ops(p_upd, args.top)
        lengths = batch.response_mask.sum(-1)
        rows = torch.randperm(B, generator=torch.Generator().manual_seed(step))  # a mini-batch's order
        for name, order in (
            ("budget", rows),
            ("budget_sorted", rows[torch.argsort(lengths[rows], descending=True, stable=True)]),
        ):
            pieces = micro_batches(order, lengths, P, B, args.max_tokens)
            computed = sum(len(p) * (P + int(lengths[p].max())) for p in pieces)
            padded.setdefault(name, []).append(1 - float(batch.attention_mask.sum()) / computed)
        report["response_len_mean"] = float(batch.response_mask.sum(-1).float().mean())
    for phase in ("rollout", "update"):
        report[f"{phase}_s"] = sum(phases[phase]) / len(phases[phase])
        report[f"{phase}_padded_fraction"] = sum(padded[phase]) / len(padded[phase])
        report[f"{phase}_unprofiled_s"] = sum(unprofiled[phase]) / len(unprofiled[phase])
        report[f"{phase}_matmul_floor_s"] = sum(floor[phase]) / len(floor[phase])
    report["step_unprofiled_s"] = report["rollout_unprofiled_s"] + report["update_unprofiled_s"]
    report["step_matmul_floor_s"] = report["rollout_matmul_floor_s"] + report["update_matmul_floor_s"]
    report["floor_share"] = report["step_matmul_floor_s"] / report["step_unprofiled_s"]
    trainer.close()
    for name in ("budget", "budget_sorted"):
        report[f"update_padded_fraction_{name}"] = sum(padded[name]) / len(padded[name])
    print(
        f"shape {args.shape}, {args.new_tokens} new tokens (mean response {report['response_len_mean']:.0f}): "
        f"rollout {report['rollout_s']:.2f} s/step (padded {report['rollout_padded_fraction']:.1%}), "
        f"update {report['update_s']:.2f} s/step (padded {report['update_padded_fraction']:.1%}; with "
        f"max_tokens_per_micro_batch={args.max_tokens}: {report['update_padded_fraction_budget']:.1%} in mini-batch "
        f"order, {report['update_padded_fraction_budget_sorted']:.1%} length-sorted)"
    )
    print(
        f"unprofiled: rollout {report['rollout_unprofiled_s']:.2f} s, update {report['update_unprofiled_s']:.2f} s; "
        f"matrix-multiply floor: rollout {report['rollout_matmul_floor_s']:.2f} s, update "
        f"{report['update_matmul_floor_s']:.2f} s; floor share of a step {report['floor_share']:.1%}"
    )
    for phase in ("rollout", "update"):
        print(f"\n{phase}: top operators by self CPU time")
        for r in report[f"{phase}_top"]:
            print(f"  {r['share']:6.1%}  {r['self_ms']:8.1f} ms  {r['calls']:6d} calls  {r['op']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
