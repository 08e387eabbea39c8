"""Where the learner's update goes, by its parts: the gradient forward, the backward, the
finiteness check, the optimizer step and gradient clipping, the loss and metrics (wall time per
RL step: each part's sum over ``--steps`` steps divided by their number).

    .venv/bin/python benchmarks/update_split.py [--steps 10] [--threads 2] \
        [--set rollout.compile=true train.compile=true]

The same configuration as ``trl_step_time.py``'s stablerl side (the default shape at random init,
8 prompts x 8 responses, one micro-batch, 32 new tokens); a first run of ``--warmup`` steps (which
compiles, where asked) is not counted. Each part is timed by wrapping the learner's own methods
(``Learner._logp``, ``Tensor.backward``, ``check_finite``, ``Learner._optimizer_step``, ...), so
the parts nest: ``_micro_step`` holds the forward, the loss and the backward; ``update`` holds all.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch
from shapes import SHAPES  # benchmarks/shapes.py
from trl_step_time import stablerl_round  # benchmarks/trl_step_time.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="stablerl config overrides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from stablerl import learner
    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model, build_tokenizer, default_model_config

    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                seconds[key] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    for name in (
        "update",
        "_micro_step",
        "_logp",
        "_old_pass",
        "_optimizer_step",
        "_clip_grad_norm",
        "_record",
        "_step_metrics",
    ):
        timed(learner.Learner, name, name)
    timed(learner, "policy_loss", "policy_loss")
    timed(learner, "check_finite", "check_finite")
    timed(torch.Tensor, "backward", "backward")

    tmp = Path(tempfile.mkdtemp(prefix="stablerl-bench-"))
    tok = build_tokenizer()
    ckpt = save_model_dir(tmp / "model", build_model(default_model_config(tok, **SHAPES["default"]), seed=0), tok)
    stablerl_round(ckpt, args.warmup, tmp / "warmup", "fp32", 32, args.set)
    seconds.clear()
    stablerl_round(ckpt, args.steps, tmp / "timed", "fp32", 32, args.set)
    per_step_ms = {k: round(v / args.steps * 1e3, 2) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    print(
        json.dumps(
            {"setup": vars(args) | {"torch_threads": torch.get_num_threads()}, "ms_per_step": per_step_ms}, indent=2
        )
    )


if __name__ == "__main__":
    main()
