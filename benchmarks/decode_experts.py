"""The decode's experts kernel, ``stablerl.moe.grouped_experts``, in its two layouts: capacity-
padded batched matmuls (``padded``) vs ``F.grouped_mm`` over the token-expert pairs (``pairs``, no
padding), and the layout ``pick_layout`` chooses for each case.

    .venv/bin/python benchmarks/decode_experts.py [--threads 0] [--out FILE]

Random weights at the default and deep shapes' decode (one token per row) and prefill sizes, and
at decode for experts of 128-1024 (the sizes benchmarks/vllm_engine.py runs), each in fp32 and
bf16, with two routings: random router logits (even loads) and logits skewed towards the first
experts (uneven loads, as a trained router's: the local engine's decode of an SFT-trained model
pads 3.4-3.9x, docs/performance.md). Per case: the padding factor (experts x the busiest
expert's load / pairs), the median time of each layout, the pick, and the largest difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from profiling import parse_with_threads, timed_ms

from stablerl.moe import grouped_experts, pick_layout

# (experts, top-k, hidden, expert width, tokens)
CASES = (
    (8, 2, 96, 96, 128),
    (8, 2, 96, 96, 3072),
    (32, 4, 96, 48, 64),
    (32, 4, 96, 48, 128),
    (32, 4, 96, 48, 1536),
    (8, 2, 128, 128, 64),
    (8, 2, 256, 256, 64),
    (8, 2, 512, 512, 64),
    (8, 2, 1024, 1024, 64),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parse_with_threads(ap)
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for routing in ("random", "skewed"):
            for E, k, H, I, N in CASES:
                gate_up = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dtype)
                down = (torch.randn(E, H, I, generator=g) * 0.1).to(dtype)
                h, logits = torch.randn(N, H, generator=g).to(dtype), torch.randn(N, E, generator=g)
                if routing == "skewed":
                    logits = logits + torch.linspace(3, 0, E)
                weights, idx = torch.softmax(logits, -1).topk(k, -1)
                a = (h, idx, weights.to(dtype), gate_up, down, F.silu)
                padded = timed_ms(lambda *x: grouped_experts(*x, layout="padded"), a)
                pairs = timed_ms(lambda *x: grouped_experts(*x, layout="pairs"), a)
                C = int(torch.bincount(idx.reshape(-1), minlength=E).max())
                diff = grouped_experts(*a, layout="padded").float() - grouped_experts(*a, layout="pairs").float()
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "routing": routing,
                        "experts": E,
                        "top_k": k,
                        "hidden": H,
                        "width": I,
                        "tokens": N,
                        "padding": E * C / (N * k),
                        "padded_ms": padded,
                        "pairs_ms": pairs,
                        "pairs_speedup": padded / pairs,
                        "picked": pick_layout(N * k, E * C, H, I, dtype),
                        "max_diff": float(diff.abs().max()),
                    }
                )
                r = rows[-1]
                print(
                    f"{r['dtype']:>8} {routing:>6} E{E} k{k} H{H} I{I} N{N}: padding {r['padding']:.2f}  padded "
                    f"{padded:.3f} ms  pairs {pairs:.3f} ms  ({padded / pairs:.2f}x)  picked {r['picked']}",
                    flush=True,
                )
    report = {"torch_threads": torch.get_num_threads(), "cases": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
