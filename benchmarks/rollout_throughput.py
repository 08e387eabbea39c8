"""Rollout tokens/s: stablerl's LocalEngine vs HF ``model.generate`` on the same tiny MoE.

Same model weights, batch, prompt lengths, response length and sampling settings (temperature
1, no top-k/top-p, no EOS so every response has exactly ``--new-tokens`` tokens); route capture
on for both (HF through ``stablerl.routing.capture_routes``). The two run alternately in one
process; the ratio of medians is reported.

    .venv/bin/python benchmarks/rollout_throughput.py [--batch 64] [--prompt 24] [--new-tokens 32]
    .venv/bin/python benchmarks/rollout_throughput.py --shape deep --new-tokens 160
    .venv/bin/python benchmarks/rollout_throughput.py --compile     # the engine's rollout.compile

With ``--compile`` the engine's decode step is compiled (``rollout.compile``); its first call,
which compiles, is timed apart and reported as ``first_call_s``.

The model is a tiny Qwen3-MoE (4 layers, 8 experts, top-2, hidden 64, vocabulary 64) unless
``--shape`` names the run's default policy (``default``: hidden 96) or examples/deep_moe's shape
(``deep``: 8 layers, 32 experts, top-4), over the built-in tokenizer.

After the timed pairs, one more engine run under torch.profiler gives stablerl's matrix-multiply
floor (benchmarks/profiling.py): ``bound`` = HF's median / that floor, the largest speedup any
removal of overhead could reach without doing less arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from profiling import floor_fields, matmul_ms  # benchmarks/profiling.py
from shapes import SHAPES, decode_model  # benchmarks/shapes.py
from torch.profiler import ProfilerActivity, profile

from stablerl.config import SamplingConfig
from stablerl.rollout import LocalEngine
from stablerl.routing import capture_routes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--shape", default=None, choices=list(SHAPES), help="default: the 64-wide tiny MoE above")
    ap.add_argument("--compile", action="store_true", help="stablerl's engine with rollout.compile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    model = decode_model(args.shape, dtype)
    config = model.config
    engine = LocalEngine(model, args.precision, eos_token_id=[], pad_token_id=0, compile=args.compile)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens)
    n_tokens = args.batch * args.new_tokens

    def run_engine() -> float:
        t = time.perf_counter()
        out = engine.generate(prompts.tolist(), sampling, capture_routes=True)
        elapsed = time.perf_counter() - t
        assert int(out.response_mask.sum()) == n_tokens and out.routes is not None
        return elapsed

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
        elapsed = time.perf_counter() - t
        assert out.shape[1] - args.prompt == args.new_tokens and len(cap.all_routes) == args.new_tokens
        return elapsed

    first_call_s = run_engine()
    run_hf()  # warm-up
    times = {"stablerl": [], "hf_generate": []}
    for _ in range(args.repeats):
        times["stablerl"].append(run_engine())
        times["hf_generate"].append(run_hf())
    med = {k: statistics.median(v) for k, v in times.items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_engine()
    floor = matmul_ms(prof) / 1e3
    result = {
        "setup": vars(args)
        | {
            "model": f"qwen3_moe, {config.num_hidden_layers} layers, {config.num_experts} experts, "
            f"top-{config.num_experts_per_tok}, hidden {config.hidden_size}",
            "torch_threads": torch.get_num_threads(),
        },
        "tokens_per_s": {k: n_tokens / v for k, v in med.items()},
        "median_s": med,
        "first_call_s": first_call_s,  # with --compile: the compile
        "speedup": med["hf_generate"] / med["stablerl"],
        # each pair ran back to back, so its ratio is less exposed to this machine's load swings
        "speedup_median_of_pairs": statistics.median(h / s for h, s in zip(times["hf_generate"], times["stablerl"])),
    } | floor_fields(floor, med["stablerl"], med["hf_generate"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
