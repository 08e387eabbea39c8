"""Inference-precision emulation: what a production inference engine does to the numbers.

``fp32`` keeps the training weights; ``bf16`` casts them (and the compute) to bfloat16; ``fp16``
to float16 (10 mantissa bits against bfloat16's 7: less rounding, less range; "Defeating the
training-inference mismatch via FP16", arXiv 2510.26788); ``fp8``
quantizes every matrix to float8 e4m3 with one scale per output channel (weight-only), then
computes in bfloat16 with the dequantized weights; ``fp8_w8a8`` is what "FP8 inference" means in
vLLM and SGLang: the same fp8 weights, and the *activations* entering every quantized matrix
multiply rounded to e4m3 too, with one scale per token computed at run time
(``quantize_activations_fp8``). The difference between these and the fp32 training engine is the
training-inference discrepancy of docs/formulation.md s.4.

``weight_noise`` adds a controlled extra discrepancy on top (``perturb_weight``): a fixed
Gaussian pattern, relative to each row's RMS, on the engine's copy of the weight matrices only.
"""

from __future__ import annotations

import torch

from stablerl.config import PRECISIONS, Precision  # noqa: F401 - the one list of precisions
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def is_fp8(precision: str) -> bool:
    """Whether an engine of this precision stores its matrices in float8 (weight-only or W8A8)."""
    return precision in ("fp8", "fp8_w8a8")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations are computed in for an engine of this precision."""
    _check(precision)
    return {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)


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


def quantize_activations_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round-trip activations through float8 e4m3 with one dynamic scale per token (last dim):
    ``amax(|x_token|) / 448``, as W8A8 kernels compute it at run time. Returns ``x``'s dtype."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_E4M3_MAX
    q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def cast_weight(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """One tensor as an engine of ``precision`` would hold it (matrices only get fp8)."""
    _check(precision)
    if precision == "fp32":
        return weight.detach().float()
    if is_fp8(precision) and weight.dim() >= 2:
        return quantize_fp8_e4m3(weight)
    return weight.detach().to(compute_dtype(precision))


def perturb_weight(name: str, weight: torch.Tensor, size: float, seed: int = 0) -> torch.Tensor:
    """``weight + size * rms(row) * z`` with z ~ N(0, 1) for a matrix (2-D+); others unchanged.

    The pattern z is fixed per tensor name (seeded by ``seed`` and the name), so the perturbation
    behaves like a kernel's systematic numeric difference, not like fresh noise at every sync.
    """
    import zlib

    if size == 0 or weight.dim() < 2 or not weight.is_floating_point():
        return weight
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    wf = weight.detach().float()
    rms = wf.pow(2).mean(-1, keepdim=True).sqrt()
    return (wf + size * rms * torch.randn(wf.shape, generator=g)).to(weight.dtype)


def cast_named(name: str, tensor: torch.Tensor, precision: str, keep: set[str] = frozenset()) -> torch.Tensor:
    """One named tensor as an engine of ``precision`` holds it: fp8 applies to 2-D+ matrices not
    named in ``keep`` (those, norms, biases and 1-D tensors stay bfloat16, as FP8 inference
    engines quantize the linear layers and keep the rest in higher precision)."""
    if not tensor.is_floating_point():
        return tensor
    if is_fp8(precision) and name in keep:
        return cast_weight(tensor, "bf16")
    return cast_weight(tensor, precision)


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
