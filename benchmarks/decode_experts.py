"""The decode's experts kernel: capacity-padded batched matmuls (``stablerl.moe.grouped_experts``,
what the local engine runs) vs ``F.grouped_mm`` over the token-expert pairs (no padding).

    .venv/bin/python benchmarks/decode_experts.py [--threads 0]

Random weights and router logits at the default and deep shapes' decode (one token per row) and
prefill sizes; per shape: the padding factor (experts x the busiest expert's load / pairs), the
median time of each kernel, and the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from profiling import parse_with_threads, timed_ms
from stablerl.moe import grouped_experts, grouped_mm_experts

# (experts, top-k, hidden, expert width, tokens)
CASES = ((8, 2, 96, 96, 128), (8, 2, 96, 96, 3072), (32, 4, 96, 48, 64), (32, 4, 96, 48, 128), (32, 4, 96, 48, 1536))


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)   # HF's _apply_gate for a gated SiLU expert
    return F.silu(gate) * up


def main() -> None:
    parse_with_threads(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    g = torch.Generator().manual_seed(0)
    rows = []
    for E, k, H, I, N in CASES:
        gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1
        h, logits = torch.randn(N, H, generator=g), torch.randn(N, E, generator=g)
        weights, idx = torch.softmax(logits, -1).topk(k, -1)
        a, b = (h, idx, weights, gate_up, down, F.silu), (h, idx, weights, gate_up, down, silu_gate)
        padded, grouped = timed_ms(grouped_experts, a), timed_ms(grouped_mm_experts, b)
        rows.append({"experts": E, "top_k": k, "tokens": N,
                     "padding": E * int(torch.bincount(idx.reshape(-1), minlength=E).max()) / (N * k),
                     "padded_bmm_ms": padded, "grouped_mm_ms": grouped, "speedup": padded / grouped,
                     "max_diff": float((grouped_experts(*a) - grouped_mm_experts(*b)).abs().max())})
    print(json.dumps({"torch_threads": torch.get_num_threads(), "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
