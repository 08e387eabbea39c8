"""Timing and torch.profiler readings shared by the benchmarks: the median time of a small kernel,
the top operators by self CPU time, and the
matrix-multiply floor (the self time of the kernels that do a forward's or backward's arithmetic).

The floor is what a piece of work would take if everything but its matrix multiplies cost
nothing: a peer's wall time divided by stablerl's floor is the largest speedup that removing
overhead (a compiled step, fused elementwise kernels, fewer Python-level ops) could reach without
doing less arithmetic. The profiler's own per-op cost lands on the many small operators, not on the
matmuls, so the floor is read as an absolute time and set against an unprofiled wall time.
"""

from __future__ import annotations

import statistics
import time

# the operators whose self time is matrix arithmetic on CPU (linear layers resolve to mm/addmm;
# the experts to bmm or grouped_mm; attention to bmm or the sdpa kernels), forward and backward
MATMUL_OPS = (
    "aten::mm",
    "aten::bmm",
    "aten::addmm",
    "aten::baddbmm",
    "aten::_grouped_mm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


def parse_with_threads(ap):
    """``ap``'s arguments plus ``--threads`` (torch threads; 0 = torch's default), applied."""
    import torch

    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def timed_ms(fn, args=(), n: int = 30, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean milliseconds of ``n`` calls ``fn(*args)``, after one
    warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn(*args)
        times.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(times)


def top_ops(prof, n: int) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in rows[:n]
    ]


def matmul_ms(prof) -> float:
    """Self CPU time of the matrix-multiply operators in a profile, in milliseconds."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e3


def floor_fields(floor_s: float, stablerl_s: float, peer_s: float) -> dict:
    """The floor, its share of stablerl's (unprofiled) time, and the bound it sets against a peer."""
    return {
        "stablerl_matmul_floor_s": floor_s,
        "floor_share_of_stablerl": floor_s / stablerl_s,
        "bound": peer_s / floor_s,
    }
