"""The local engine at a half precision with its matrix multiplies in fp32 (the default on a CPU
without native bf16 kernels, ``stablerl.precision.matmul_dtype``) vs torch's own bf16 kernels.

    .venv/bin/python benchmarks/engine_matmul_dtype.py [--shape deep] [--precision nvfp4_w4a4] [--new-tokens 64]

The same engine, weights, prompts and seeds; the two ways alternate in one process and the ratio
of median rollout times is reported, with how many sampled tokens the two share (the same inputs
and one rounding per product: they part only where a round-off flip changes a sample). On a CPU
with native bf16 kernels both ways run the native kernel's speed class and the ratio says so
(``mkldnn_bf16`` in the output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from profiling import parse_with_threads
from shapes import SHAPES, decode_model

import stablerl.rollout.decoders as decoders
from stablerl.config import PRECISIONS, SamplingConfig
from stablerl.rollout import LocalEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="deep", choices=list(SHAPES))
    ap.add_argument("--precision", default="bf16", choices=[p for p in PRECISIONS if p not in ("fp32", "fp16")])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = parse_with_threads(ap)
    engine = LocalEngine(decode_model(args.shape), args.precision, eos_token_id=[], fast=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 60, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    sampling, seeds = SamplingConfig(max_new_tokens=args.new_tokens), list(range(args.batch))
    ways = {
        "fp32_multiply": lambda dtype, device="cpu": torch.float32 if dtype == torch.bfloat16 else dtype,
        "torch_bf16": lambda dtype, device="cpu": dtype,
    }
    seconds, batches = {way: [] for way in ways}, {}
    engine.generate(prompts[:4], SamplingConfig(max_new_tokens=4), seeds=seeds[:4])  # warm-up
    for _ in range(args.repeats):
        for way, dtype_of in ways.items():
            decoders.matmul_dtype = dtype_of
            start = time.perf_counter()
            batches[way] = engine.generate(prompts, sampling, seeds=seeds)
            seconds[way].append(time.perf_counter() - start)
    tokens = args.batch * args.new_tokens
    median = {way: statistics.median(s) for way, s in seconds.items()}
    a, b = batches["fp32_multiply"], batches["torch_bf16"]
    print(
        json.dumps(
            {
                "shape": args.shape,
                "precision": args.precision,
                "batch": args.batch,
                "new_tokens": args.new_tokens,
                "torch_threads": torch.get_num_threads(),
                "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                "tokens_per_s": {way: tokens / m for way, m in median.items()},
                "speedup": median["torch_bf16"] / median["fp32_multiply"],
                "same_tokens_frac": float((a.input_ids == b.input_ids).float().mean()),
                "seconds": seconds,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
