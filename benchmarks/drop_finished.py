"""Rollout time with and without dropping finished rows from the decode (``rollout.drop_finished``).

    .venv/bin/python benchmarks/drop_finished.py [--responses 128] [--new-tokens 160] [--reps 3]

The deep shape (examples/deep_moe: 8 layers, 32 experts, top-4) at random init, bf16 engine, the
same prompts and seeds for both settings, alternated in one process; medians and their ratio.
Responses end at different steps (random init: about half the length limit on average), so a
decode that keeps computing ended rows wastes a growing share of every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from shapes import SHAPES  # benchmarks/shapes.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from stablerl.config import SamplingConfig
    from stablerl.models import build_model, build_tokenizer, default_model_config
    from stablerl.rollout import LocalEngine

    tok = build_tokenizer()
    model = build_model(default_model_config(tok, **SHAPES["deep"]), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 60, (12,), generator=g).tolist() for _ in range(args.responses)]
    engine = LocalEngine(model, "bf16", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sampling, seeds = SamplingConfig(max_new_tokens=args.new_tokens), list(range(args.responses))
    times: dict[bool, list[float]] = {True: [], False: []}
    batches = {}
    for _ in range(args.reps):
        for drop in times:
            engine.drop_finished = drop
            t0 = time.perf_counter()
            batches[drop] = engine.generate(prompts, sampling, seeds=seeds)
            times[drop].append(time.perf_counter() - t0)
    keep, drop = times[False], times[True]
    same = torch.equal(batches[False].response_ids, batches[True].response_ids)
    print(
        f"mean response {float(batches[False].response_mask.sum(-1).float().mean()):.0f} of {args.new_tokens} tokens; "
        f"keep ended rows {statistics.median(keep):.2f} s, drop them {statistics.median(drop):.2f} s: "
        f"{statistics.median(keep) / statistics.median(drop):.2f}x; the same tokens: {same}"
    )


if __name__ == "__main__":
    main()
