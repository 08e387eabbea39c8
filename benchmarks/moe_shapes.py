"""Routing agreement and training-inference KL of the default tiny MoE against a deeper, wider one.

    .venv/bin/python benchmarks/moe_shapes.py [--shapes default deep]

A 30B MoE has 48 layers and 128 experts with top-8: small numeric differences flip more expert
choices, and the flips compound through depth. The miniature's default (4 layers, 8 experts,
top-2) is far from that; `deep` (examples/deep_moe/config.yaml: 8 layers, 32 experts, top-4,
experts half as wide, so a token's expert compute per layer is unchanged) is closer and still
trains on a 2-core CPU. Each shape is cold-started by the same SFT (cached under runs/sft/), then
each engine precision samples the same held-out prompts and is compared with the fp32 training
model: k3 and k1 KL per sampled token, routing agreement overall and by layer. Also reported: SFT
time and one RL update's time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# shape name -> config file (None = the default tiny MoE); the deep shape ships as an example config
SHAPES = {"default": None, "deep": Path(__file__).resolve().parents[1] / "examples" / "deep_moe" / "config.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default="runs/bench/moe_shapes.json")
    args = ap.parse_args()

    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.diagnostics import k3, route_agreement
    from stablerl.forward import response_logp
    from stablerl.generation import encode_prompt
    from stablerl.models import load_policy
    from stablerl.rollout import LocalEngine
    from stablerl.sft import cold_start
    from stablerl.tasks import build_task

    report = {}
    for shape in args.shapes:
        config_file = SHAPES[shape]
        cfg = build_config(RunConfig, config_file, [])
        task = build_task(cfg.task)
        t0 = time.perf_counter()
        path = cold_start(cfg, task, log=lambda *_: None)
        sft_s = time.perf_counter() - t0
        model, tok = load_policy(path)
        n_params = sum(p.numel() for p in model.parameters())
        prompts = [
            encode_prompt(tok, p.prompt) for p in task.eval_problems()[: args.prompts] for _ in range(args.samples)
        ]
        sampling = cfg.rollout.sampling()
        rows = {"params": n_params, "sft_seconds_incl_cache": round(sft_s, 1)}
        for precision in ("bf16", "fp16", "fp8", "fp8_w8a8"):
            engine = LocalEngine(model, precision, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            batch = engine.generate(prompts, sampling, seeds=list(range(len(prompts))))
            t1 = time.perf_counter()
            out = response_logp(model, batch, capture=True, with_entropy=True)
            (out["logp"].sum() * 0).backward()  # an RL update's forward + backward on this batch
            update_s = time.perf_counter() - t1
            model.zero_grad(set_to_none=True)
            m = batch.response_mask
            log_w = (out["logp"].detach() - batch.rollout_logp)[m]
            per_layer = route_agreement(out["routes"], batch.routes)
            rows[precision] = {
                "kl_k3": float(k3(log_w).mean()),
                "kl_k1": float((-log_w).mean()),
                "route_agreement": float(per_layer.mean()),
                "per_layer": [round(float(x), 4) for x in per_layer],
                "update_forward_backward_s": round(update_s, 2),
            }
            print(
                f"{shape:>8} {precision:>9}: KL k3 {rows[precision]['kl_k3']:.2e}  k1 {rows[precision]['kl_k1']:.2e}"
                f"  agreement {rows[precision]['route_agreement']:.4f}  by layer {rows[precision]['per_layer']}"
            )
        report[shape] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
