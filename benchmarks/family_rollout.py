"""Rollout seconds per MoE family: stablerl's LocalEngine vs HF ``model.generate``, side by side.

For every family of ``stablerl.families`` (or those named): its tiny random model (4 layers,
8 experts, top-2, hidden 64, vocabulary 64), the same batch of prompts, no EOS so every response
has exactly ``--new-tokens`` tokens, temperature 1, route capture on for both (HF through
``stablerl.routing.capture_routes``). The engine takes the fast Qwen3-MoE decoder where it
applies and the model's own KV-cached forward elsewhere. The two run alternately; medians of
``--repeats`` pairs and the ratio HF / engine (above 1: the engine is faster).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/family_rollout.py --threads 1 [--families gpt_oss deepseek_v3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stablerl.config import SamplingConfig
from stablerl.families import FAMILIES
from stablerl.models import build_model, tiny_config
from stablerl.rollout import LocalEngine
from stablerl.routing import capture_routes


def measure(family: str, args) -> dict:
    model = build_model(tiny_config(family, pad_token_id=0, eos_token_id=None), seed=0).eval()
    engine = LocalEngine(model, "fp32", eos_token_id=[], pad_token_id=0)
    prompts = torch.randint(2, 64, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens)

    def run_engine() -> float:
        t = time.perf_counter()
        out = engine.generate(prompts.tolist(), sampling, capture_routes=True)
        assert int(out.response_mask.sum()) == args.batch * args.new_tokens and out.routes is not None
        return time.perf_counter() - t

    def run_hf() -> float:
        t = time.perf_counter()
        with torch.no_grad(), capture_routes(model) as cap:
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
        assert out.shape[1] - args.prompt == args.new_tokens and len(cap.all_routes) == args.new_tokens
        return time.perf_counter() - t

    run_engine(), run_hf()  # warm-up
    engine_s, hf_s = [], []
    for _ in range(args.repeats):
        engine_s.append(run_engine())
        hf_s.append(run_hf())
    return {
        "path": "fast Qwen3-MoE decoder" if engine.fast else "HF forward + KV cache",
        "engine_median_s": round(statistics.median(engine_s), 4),
        "hf_generate_median_s": round(statistics.median(hf_s), 4),
        "hf_over_engine": round(statistics.median(h / e for h, e in zip(hf_s, engine_s)), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {f: measure(f, args) for f in args.families}
    print(json.dumps({"setup": vars(args) | {"torch_threads": torch.get_num_threads()}, "families": results}, indent=2))


if __name__ == "__main__":
    main()
