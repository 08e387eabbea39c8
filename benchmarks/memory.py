"""Peak memory and time of one training forward + backward, with and without activation
checkpointing, in fp32 and bf16 (``train.activation_checkpointing``, ``train.dtype``).

    .venv/bin/python benchmarks/memory.py [--shape deep] [--responses 32] [--response-len 256]

Each setting runs in a fresh process (peak RSS is a process-lifetime maximum): build the model
(``examples/deep_moe``: 8 layers, 32 experts, top-4), a rollout batch of random tokens with
replayed routes (R3's path: the replay must hold in the recompute), then one
``Learner._logp`` forward and the backward of the summed log-probs. Reported: the peak RSS above
the process's footprint just before the forward (activations and gradients), the wall time, and
the gradients' largest relative difference from the fp32, no-checkpointing run (0 expected for
checkpointing in fp32: the recompute is the same computation).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from shapes import SHAPES  # benchmarks/shapes.py


def child(args) -> dict:
    import torch

    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.learner import Learner
    from stablerl.models import build_model, build_tokenizer, default_model_config
    from stablerl.rollout.base import RolloutBatch
    from stablerl.routing import capture_routes

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(default_model_config(tok, **SHAPES[args.shape]), seed=0)
    B, P, R = args.responses, 16, args.response_len
    ids = torch.randint(4, model.config.vocab_size, (B, P + R), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_routes(model) as cap:  # routes to replay (those of the same weights)
        model(input_ids=ids[:4])
    routes = torch.cat([cap.routes] * (B // 4))
    batch = RolloutBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        prompt_width=P,
        response_mask=torch.ones(B, R, dtype=torch.bool),
        rollout_logp=torch.zeros(B, R),
        finished=torch.ones(B, dtype=torch.bool),
        version=0,
        routes=routes,
    )
    cfg = build_config(
        RunConfig,
        None,
        [f"train.dtype={args.dtype}", f"train.activation_checkpointing={str(args.checkpointing).lower()}"],
    )
    learner = Learner(model, cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = learner._logp(learner.model, batch, replay=routes)
    out["logp"].sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = {n: p.grad for n, p in learner.model.named_parameters() if p.grad is not None}
    torch.save(grads, args.grads)
    params = sum(p.numel() for p in model.parameters())
    return {"peak_above_start_mib": (peak - before) / 1024, "seconds": seconds, "params": params, "tokens": B * (P + R)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="deep", choices=list(SHAPES))
    ap.add_argument("--responses", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--out", default="runs/bench/memory.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grads", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, ref = [], None
    for dtype in ("fp32", "bf16"):
        for ckpt in (False, True):
            grads = out.with_name(f"grads_{dtype}_{ckpt}.pt")
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--shape",
                args.shape,
                "--responses",
                str(args.responses),
                "--response-len",
                str(args.response_len),
                "--dtype",
                dtype,
                "--grads",
                str(grads),
            ]
            res = json.loads(
                subprocess.run(cmd + (["--checkpointing"] if ckpt else []), check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            g = torch.load(grads)
            grads.unlink()
            ref = ref or g
            res["max_rel_grad_diff"] = max(float((g[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ref)
            res.update(dtype=dtype, activation_checkpointing=ckpt)
            rows.append(res)
            print(
                f"{dtype} checkpointing={ckpt!s:5}  peak +{res['peak_above_start_mib']:7.0f} MiB  "
                f"{res['seconds']:6.2f} s  grad rel diff {res['max_rel_grad_diff']:.1e}",
                flush=True,
            )
    out.write_text(
        json.dumps(
            {"shape": args.shape, "responses": args.responses, "response_len": args.response_len, "rows": rows},
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
