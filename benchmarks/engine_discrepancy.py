"""Training-inference discrepancy of the local engine at each precision, on the default tiny MoE.

The rollout engine samples with its own weights (every ``rollout.precision``: fp32 / bf16 / fp16 /
fp8 / fp8_w8a8 / nvfp4 / nvfp4_w4a4); the training model then scores the same tokens, in fp32 and in
bf16 (``train.dtype=bf16``: autocast, as the learner runs it on one rank). Reports the k3
KL(mu || pi_old) per token (for both training dtypes), the IS-weight distribution, the max
|log pi_old - log mu| and the per-layer routing agreement between training and inference (fp32
training).

    .venv/bin/python benchmarks/engine_discrepancy.py [--batch 64] [--new-tokens 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import torch

from stablerl.config import PRECISIONS, SamplingConfig
from stablerl.diagnostics import is_weight_stats, route_agreement, train_infer_kl
from stablerl.forward import response_logp
from stablerl.models import build_model, tiny_config
from stablerl.rollout import LocalEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = build_model(tiny_config("qwen3_moe", pad_token_id=0, eos_token_id=None), seed=args.seed).eval()
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(2, model.config.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    report = {"setup": vars(args)}
    for precision in PRECISIONS:
        batch = LocalEngine(model, precision, eos_token_id=[]).generate(
            prompts, sampling, seeds=[args.seed + i for i in range(len(prompts))]
        )
        with torch.no_grad():
            train = response_logp(model, batch, capture=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                train_bf16 = response_logp(model, batch)
        mask = batch.response_mask
        agreement = route_agreement(train["routes"], batch.routes)
        report[precision] = {
            "train_infer_kl": train_infer_kl(train["logp"], batch.rollout_logp, mask),
            "train_infer_kl_bf16_training": train_infer_kl(train_bf16["logp"], batch.rollout_logp, mask),
            "max_abs_logp_diff": float((train["logp"] - batch.rollout_logp)[mask].abs().max()),
            "route_agreement_mean": float(agreement.nanmean()),
            "route_agreement_per_layer": [round(float(a), 4) for a in agreement],
            **is_weight_stats(train["logp"], batch.rollout_logp, mask),
        }
    print(json.dumps(report, indent=2))
    print("| engine precision | KL, fp32 training | KL, bf16 training | route agreement |")
    print("|---|---|---|---|")
    for precision in PRECISIONS:
        r = report[precision]
        print(
            f"| {precision} | {r['train_infer_kl']:.2e} | {r['train_infer_kl_bf16_training']:.2e} | "
            f"{r['route_agreement_mean']:.4f} |"
        )


if __name__ == "__main__":
    main()
