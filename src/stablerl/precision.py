"""Inference-precision emulation: what a production inference engine does to the weights.

``fp32`` keeps the training weights; ``bf16`` casts them (and the compute) to bfloat16; ``fp8``
quantizes every matrix to float8 e4m3 with one scale per output channel (as FP8 inference
kernels do), then computes in bfloat16 with the dequantized weights. The difference between
these and the fp32 training engine is the training-inference discrepancy of docs/formulation.md s.4.
"""

from __future__ import annotations

import torch

from stablerl.config import PRECISIONS, Precision  # noqa: F401 - the one list of precisions
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations are computed in for an engine of this precision."""
    _check(precision)
    return torch.float32 if precision == "fp32" else torch.bfloat16


def quantize_fp8_e4m3(weight: torch.Tensor) -> torch.Tensor:
    """Round-trip a weight matrix through float8 e4m3 with per-output-channel scales.

    ``weight`` is ``[out, in]`` (or any shape whose last dim is the input dim); each row gets the
    scale ``amax(|row|) / 448`` so its largest entry maps to e4m3's largest finite value.
    Returns the dequantized weight in bfloat16.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_E4M3_MAX
    q = (w / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(torch.bfloat16)


def cast_weight(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """One tensor as an engine of ``precision`` would hold it (matrices only get fp8)."""
    _check(precision)
    if precision == "fp32":
        return weight.detach().float()
    if precision == "fp8" and weight.dim() >= 2:
        return quantize_fp8_e4m3(weight)
    return weight.detach().to(torch.bfloat16)


def cast_state_dict(
    state_dict: dict[str, torch.Tensor], precision: str, keep: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of a state dict cast as ``cast_weight``; others unchanged.

    fp8 applies to 2-D+ matrices not named in ``keep``; those, norms, biases and 1-D tensors stay
    bfloat16, as FP8 inference engines quantize the linear layers and keep the rest in higher
    precision.
    """
    out = {}
    for k, v in state_dict.items():
        if not v.is_floating_point():
            out[k] = v
        elif precision == "fp8" and k in keep:
            out[k] = cast_weight(v, "bf16")
        else:
            out[k] = cast_weight(v, precision)
    return out


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
