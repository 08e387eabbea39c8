"""bf16 matrix multiplies on this CPU: native bf16 vs fp32 vs bf16 inputs multiplied in fp32.

    .venv/bin/python benchmarks/bf16_matmul.py [--threads 0]

Why: the local engine computes in bfloat16 at every precision but fp32 (bf16, and fp8 / NVFP4
after dequantization). A CPU whose oneDNN has no native bf16 kernels (no AVX512-BF16 / AMX: most
AMD Zen 1-3 and pre-Sapphire-Rapids Intel parts; ``mkldnn_bf16`` below) runs bf16 matmuls on a
slow path. This prints, for the engine's matmul shapes (the default run's decode: experts bmm,
q/k/v projection, LM head; and one large square), the median time of each way and how often the
"bf16 via fp32" result (exact products, fp32 sums, one rounding) differs from the native one.
"""

from __future__ import annotations

import argparse
import json

import torch
from profiling import parse_with_threads, timed_ms

# (name, a's shape, b's shape): the default run's decode at batch 64 and a large square
CASES = (
    ("experts bmm (8 experts, 20 rows)", (8, 20, 96), (8, 96, 192)),
    ("q/k/v projection", (64, 96), (96, 288)),
    ("LM head", (64, 96), (96, 64)),
    ("square 512", (512, 512), (512, 512)),
)


def main() -> None:
    parse_with_threads(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, sa, sb in CASES:
        a, b = torch.randn(*sa, generator=g), torch.randn(*sb, generator=g)
        ab, bb = a.bfloat16(), b.bfloat16()
        native = torch.matmul(ab, bb)
        via_fp32 = torch.matmul(ab.float(), bb.float()).bfloat16()
        rows.append(
            {
                "case": name,
                "fp32_ms": timed_ms(lambda a=a, b=b: torch.matmul(a, b), n=20, repeats=5),
                "bf16_ms": timed_ms(lambda ab=ab, bb=bb: torch.matmul(ab, bb), n=20, repeats=5),
                "bf16_via_fp32_ms": timed_ms(
                    lambda ab=ab, bb=bb: torch.matmul(ab.float(), bb.float()).bfloat16(), n=20, repeats=5
                ),
                "via_fp32_differs_frac": float((native != via_fp32).float().mean()),
            }
        )
        rows[-1]["bf16_over_fp32"] = rows[-1]["bf16_ms"] / rows[-1]["fp32_ms"]
    print(
        json.dumps(
            {
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                "torch_threads": torch.get_num_threads(),
                "cases": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
