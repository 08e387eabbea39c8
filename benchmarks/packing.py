"""One RL update with padded micro-batches, token-budget micro-batches and packed (padding-free)
forwards (``batch.max_tokens_per_micro_batch``, ``batch.packing``): time and padded-token share.

    .venv/bin/python benchmarks/packing.py [--shape default|deep] [--new-tokens 160] [--max-tokens 2048] [--reps 3]

The shape's tiny Qwen3-MoE at random init samples one rollout batch (16 prompts x 8 responses of
the built-in task, bf16 engine; a random policy's responses end anywhere up to the limit, so their
lengths spread as a long-reasoning batch's do), then the same update (on-policy MiniRL, one
mini-batch) runs from the same weights under each setting, alternated in one process; medians.
The padded share is the part of the positions the training forwards compute that are padding:
a micro-batch's ``[rows, prompt width + its longest response]`` when padded, none when packed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from shapes import SHAPES  # benchmarks/shapes.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="deep", choices=list(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from stablerl.config import RunConfig, SamplingConfig
    from stablerl.config_io import build_config
    from stablerl.learner import Learner, _prompt_lengths, micro_batches
    from stablerl.models import build_model, build_tokenizer, default_model_config
    from stablerl.rollout import LocalEngine

    tok = build_tokenizer()
    model = build_model(default_model_config(tok, **SHAPES[args.shape]), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(4, 60, (int(torch.randint(8, 17, (1,), generator=g)),), generator=g).tolist()
        for _ in range(16)
        for _ in range(8)
    ]
    engine = LocalEngine(model, "bf16", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    batch = engine.generate(prompts, sampling, seeds=list(range(len(prompts))))
    batch.sampling, batch.group_ids = sampling, torch.arange(len(prompts)) // 8
    batch.rewards = torch.rand(len(prompts), generator=g)

    settings = {
        "padded": [],
        "budget": [f"batch.max_tokens_per_micro_batch={args.max_tokens}"],
        "packed": [f"batch.max_tokens_per_micro_batch={args.max_tokens}", "batch.packing=true"],
    }
    lengths, P, real = batch.response_lengths, batch.prompt_width, float(batch.attention_mask.sum())
    rows = torch.argsort(lengths, descending=True, stable=True)
    computed = {
        "padded": sum(
            len(p) * (P + int(lengths[p].max())) for p in micro_batches(torch.arange(len(batch)), lengths, P, 128)
        ),
        "budget": sum(
            len(p) * (P + int(lengths[p].max())) for p in micro_batches(rows, lengths, P, 128, args.max_tokens)
        ),
        "packed": real,
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.reps):
        for name, extra in settings.items():
            learner = Learner(copy.deepcopy(model), build_config(RunConfig, None, ["rollout.precision=bf16", *extra]))
            t0 = time.perf_counter()
            learner.update(1, batch, first_row=0)
            times[name].append(time.perf_counter() - t0)
    print(
        f"shape {args.shape}, mean response {float(lengths.float().mean()):.0f} of {args.new_tokens} tokens, "
        f"{len(batch)} responses, token budget {args.max_tokens}:"
    )
    base = statistics.median(times["padded"])
    for name in settings:
        t = statistics.median(times[name])
        print(f"  {name:7s} update {t:6.2f} s ({base / t:.2f}x padded)  padded share {1 - real / computed[name]:6.1%}")
    pieces = micro_batches(
        torch.arange(len(batch)), lengths, P, 128, args.max_tokens, prompt_lengths=_prompt_lengths(batch)
    )
    print(f"  packed sequences per update: {len(pieces)} of <= {args.max_tokens} tokens")


if __name__ == "__main__":
    main()
