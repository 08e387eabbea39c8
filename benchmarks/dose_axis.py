"""The dose axis of the pre-registered set (docs/notebook/preregistration.md s.1): the *cold start's*
training-inference mismatch at each rung of the numerics ladder, measured once on held-out
prompts before any RL.

    .venv/bin/python benchmarks/dose_axis.py CHECKPOINT [key=value ...] [--prompts 128] [--samples 4]
        [--weight-noise 0.03,0.05,0.07]

The key=value overrides are those of the run (the task: style, levels, max_operand, max_new_tokens).
For every rung (fp32, bf16, fp8, fp8_w8a8, nvfp4, nvfp4_w4a4) the engine samples ``--samples``
responses to each of the first ``--prompts`` held-out problems at the rollout temperature; the
fp32 training model scores the same tokens. Reported per rung: k1 KL(mu || pi) per token (the
mean of log mu - log pi over sampled tokens: the axis), k3 per token, the per-sequence sum of
log w = log pi - log mu (mean and 1st percentile), routing agreement, and the mean response length.
With ``--weight-noise``, also an fp32 engine with each ``rollout.weight_noise`` size (rung
``noise<size>``): how a weight-noise control's size is matched to a target KL.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

LADDER = ("fp32", "bf16", "fp8", "fp8_w8a8", "nvfp4", "nvfp4_w4a4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument(
        "--weight-noise", default="", help="comma-separated rollout.weight_noise sizes, each an fp32 engine's rung"
    )
    args = ap.parse_args()

    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.diagnostics import route_agreement, train_infer_kl
    from stablerl.forward import response_logp
    from stablerl.generation import encode_problem
    from stablerl.models import load_policy
    from stablerl.rollout import LocalEngine
    from stablerl.tasks import build_task

    cfg = build_config(RunConfig, None, [f"model.path={args.checkpoint}", *args.overrides])
    model, tokenizer = load_policy(args.checkpoint)
    model.eval()
    problems = build_task(cfg.task).eval_problems()[: args.prompts]
    prompts = [encode_problem(tokenizer, p, cfg.task) for p in problems for _ in range(args.samples)]
    seeds = [args.seed + i for i in range(len(prompts))]
    sampling = cfg.rollout.sampling()
    report = {
        "checkpoint": args.checkpoint,
        "overrides": args.overrides,
        "prompts": len(problems),
        "samples": args.samples,
    }
    noise = {f"noise{x}": float(x) for x in args.weight_noise.split(",") if x}
    rungs = (*LADDER, *noise)
    for rung in rungs:
        engine = LocalEngine(
            model,
            "fp32" if rung in noise else rung,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            weight_noise=noise.get(rung, 0.0),
        )
        batch = engine.generate(prompts, sampling, seeds=seeds)
        with torch.no_grad():
            train = response_logp(model, batch, capture=batch.routes is not None, temperature=sampling.temperature)
        mask = batch.response_mask
        log_w = (train["logp"] - batch.rollout_logp) * mask
        seq = log_w.sum(-1).double()
        report[rung] = {
            "kl_k1": float(-log_w[mask].mean()),
            "kl_k3": train_infer_kl(train["logp"], batch.rollout_logp, mask),
            "seq_log_w_mean": float(seq.mean()),
            "seq_log_w_p01": float(torch.quantile(seq, 0.01)),
            "route_agreement": float(route_agreement(train["routes"], batch.routes).nanmean())
            if batch.routes is not None
            else None,
            "response_len_mean": float(mask.sum(-1).float().mean()),
        }
        print(f"{rung}: {report[rung]}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    print(
        "| rung | k1 KL / token (the axis) | k3 KL / token | sum log w / response: mean | 1st percentile "
        "| routing agreement | mean length |"
    )
    print("|---|---|---|---|---|---|---|")
    for rung in rungs:
        r = report[rung]
        print(
            f"| {rung} | {r['kl_k1']:.2e} | {r['kl_k3']:.2e} | {r['seq_log_w_mean']:+.3f} | "
            f"{r['seq_log_w_p01']:+.3f} | "
            f"{r['route_agreement']:.3f} | {r['response_len_mean']:.0f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
