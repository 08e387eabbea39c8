"""Inference-precision emulation: what a production inference engine does to the numbers.

``fp32`` keeps the training weights; ``bf16`` casts them (and the compute) to bfloat16; ``fp16``
to float16 (10 mantissa bits against bfloat16's 7: less rounding, less range; "Defeating the
training-inference mismatch via FP16", arXiv 2510.26788); ``fp8``
quantizes every matrix to float8 e4m3 with one scale per output channel (weight-only), then
computes in bfloat16 with the dequantized weights; ``fp8_w8a8`` is what "FP8 inference" means in
vLLM and SGLang: the same fp8 weights, and the *activations* entering every quantized matrix
multiply rounded to e4m3 too, with one scale per token computed at run time
(``quantize_activations_fp8``). ``nvfp4`` is NVIDIA's 4-bit format (Blackwell): every matrix
stored as e2m1 values (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) with one e4m3 scale per 16 consecutive
input elements and one fp32 scale per tensor, computed in bf16 after dequantization (weight-only);
``nvfp4_w4a4`` also rounds the activations entering each such matmul to NVFP4, per token at run
time. The rounding moves with the weights — a dose of the kind real quantized inference gives,
unlike a fixed ``weight_noise`` pattern. The difference between these and the fp32 training
engine is the training-inference discrepancy of docs/formulation.md s.4.

``weight_noise`` adds a controlled extra discrepancy on top (``perturb_weight``): a fixed
Gaussian pattern, relative to each row's RMS, on the engine's copy of the weight matrices only.

How the engine *multiplies* bf16 / fp16 numbers is the hardware's business (``matmul_dtype``): a
GPU's half-precision GEMM takes half-precision inputs, accumulates in fp32 and rounds the product
once. So does oneDNN on a CPU with native bf16 kernels; on one without (AVX2-only x86) PyTorch's
fallback is many times slower than fp32, so there the fast decoder multiplies the same half-precision
inputs in fp32 and rounds once — the same numbers but for summation order (docs/performance.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stablerl.config import PRECISIONS, Precision  # noqa: F401 - the one list of precisions

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes a 4-bit e2m1 number takes
E2M1_MAX = 6.0
NVFP4_BLOCK = 16  # input elements sharing one scale


def is_quantized(precision: str) -> bool:
    """Whether an engine of this precision stores its matrices quantized (fp8 or nvfp4; weight-only
    or with activations)."""
    return weight_quantizer(precision) is not None


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations are computed in for an engine of this precision."""
    _check(precision)
    return {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)


@functools.cache
def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN multiplies ``dtype`` (bf16 or fp16) with native kernels."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, check)())


def matmul_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype the engine's matrix multiplies of ``dtype`` activations run in: ``dtype`` itself,
    but fp32 for bf16 / fp16 on a CPU without native kernels for them, where the inputs (already
    rounded to ``dtype``) are multiplied in fp32 and the product rounded once to ``dtype`` by
    ``linear`` / ``matmul`` — what a native half-precision GEMM computes, in another summation
    order, and much faster than PyTorch's fallback there."""
    if (
        dtype in (torch.bfloat16, torch.float16)
        and torch.device(device).type == "cpu"
        and not native_half_matmul(dtype)
    ):
        return torch.float32
    return dtype


@dataclass(frozen=True)
class PackedWeight:
    """A bf16 ``[out, in]`` matrix reordered once into the blocked layout oneDNN's bf16 kernel reads
    (``pack_weight``), as inference engines do at load. ``F.linear`` on the plain weight is
    slower per call, most on the largest matrices (docs/performance.md)."""

    packed: torch.Tensor


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor | PackedWeight:
    """``weight`` prepacked for ``linear`` where oneDNN multiplies it natively (bf16 on a CPU
    with native bf16 kernels; ``rows``: the expected rows of an input, a layout hint only), else
    ``weight`` unchanged. The products are oneDNN's bf16 GEMM either way (bit-identical to
    ``F.linear`` on the plain weight: ``tests/test_rollout.py``)."""
    if (
        weight.dtype != torch.bfloat16
        or weight.device.type != "cpu"
        or weight.dim() != 2
        or not native_half_matmul(torch.bfloat16)
    ):
        return weight
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), max(rows, 1)))


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` multiplied in the weight's dtype (the caller casts the weight to its
    ``matmul_dtype`` once, and may prepack it: ``pack_weight``), the product rounded to ``x``'s
    dtype."""
    if isinstance(weight, PackedWeight):
        b = None if bias is None else bias.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight.packed, b, "none", [], "").to(x.dtype)
    return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` multiplied in ``dtype`` (a ``matmul_dtype``), the product rounded to ``a``'s dtype."""
    return torch.matmul(a.to(dtype), b.to(dtype)).to(a.dtype)


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


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value (ties to the even mantissa, as IEEE rounding does),
    saturating at +-6."""
    # the grid is evenly spaced within each binade-like segment: step 0.5 below 2, 1 up to 4, 2 up
    # to 6. Dividing by a power of two is exact, and torch.round rounds half to even, which on
    # these grids is the even mantissa (e.g. 1.75 -> 2, 2.5 -> 2, 5 -> 4): the nearest e2m1 value
    # with IEEE ties, in a few elementwise ops (~5x cheaper than searching the grid)
    a = x.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(x.dtype)
    return torch.copysign(torch.round(a / step) * step, x)


def _nvfp4_round_trip(x: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 along the last dim of ``x`` (float32): blocks of 16 share an e4m3 scale relative to
    the fp32 scale ``global_amax / (6 x 448)`` (``global_amax`` broadcasts against ``x``, its last
    dim 1); a last dim that is not a multiple of 16 ends in a
    shorter block (zero-padded)."""
    n = x.shape[-1]
    pad = -n % NVFP4_BLOCK
    xb = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, NVFP4_BLOCK))
    global_scale = (global_amax / (E2M1_MAX * FP8_E4M3_MAX)).clamp(min=1e-30)[..., None]  # [..., 1, 1]
    block_amax = xb.abs().amax(dim=-1, keepdim=True)
    block_scale = (block_amax / E2M1_MAX / global_scale).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    scale = block_scale * global_scale
    q = torch.where(scale > 0, round_e2m1(xb / torch.where(scale > 0, scale, 1.0)) * scale, 0.0)
    return q.flatten(-2)[..., :n]


def quantize_nvfp4(weight: torch.Tensor) -> torch.Tensor:
    """Round-trip a weight matrix (last dim = input dim) through NVFP4 with one fp32 scale per
    matrix (per expert for a stacked ``[E, out, in]`` tensor); returns bfloat16."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=(-2, -1), keepdim=True) if w.dim() >= 2 else w.abs().amax(-1, keepdim=True)
    return _nvfp4_round_trip(w, amax).to(torch.bfloat16)


def quantize_activations_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """Round-trip activations through NVFP4 per token (last dim), the per-token fp32 scale
    computed at run time (serving calibrates one static activation scale per tensor instead: the
    same e2m1 values and block scales, a slightly different fp32 factor). Returns ``x``'s dtype."""
    xf = x.float()
    return _nvfp4_round_trip(xf, xf.abs().amax(dim=-1, keepdim=True)).to(x.dtype)


def weight_quantizer(precision: str):
    """How an engine of ``precision`` rounds its matrices, or None (a plain cast)."""
    return {
        "fp8": quantize_fp8_e4m3,
        "fp8_w8a8": quantize_fp8_e4m3,
        "nvfp4": quantize_nvfp4,
        "nvfp4_w4a4": quantize_nvfp4,
    }.get(precision)


def activation_quantizer(precision: str):
    """How an engine of ``precision`` rounds the input of each quantized matmul, or None."""
    return {"fp8_w8a8": quantize_activations_fp8, "nvfp4_w4a4": quantize_activations_nvfp4}.get(precision)


def cast_weight(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """One tensor as an engine of ``precision`` would hold it (matrices only get quantized)."""
    _check(precision)
    if precision == "fp32":
        return weight.detach().float()
    if is_quantized(precision) and weight.dim() >= 2:
        return weight_quantizer(precision)(weight)
    return weight.detach().to(compute_dtype(precision))


def perturb_weight(name: str, weight: torch.Tensor, size: float, seed: int = 0) -> torch.Tensor:
    """``weight + size * rms(row) * z`` with z ~ N(0, 1) for a matrix (2-D+); others unchanged.

    The pattern z is fixed per tensor name and ``seed``: with one seed the perturbation behaves
    like a kernel's systematic numeric difference, not like fresh noise at every sync; a new seed
    per policy version (``rollout.weight_noise_redraw``) makes it a mismatch that moves with every
    version.
    """
    import zlib

    if size == 0 or weight.dim() < 2 or not weight.is_floating_point():
        return weight
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    wf = weight.detach().float()
    rms = wf.pow(2).mean(-1, keepdim=True).sqrt()
    return (wf + size * rms * torch.randn(wf.shape, generator=g)).to(weight.dtype)


def cast_named(name: str, tensor: torch.Tensor, precision: str, keep: set[str] = frozenset()) -> torch.Tensor:
    """One named tensor as an engine of ``precision`` holds it: fp8 / nvfp4 apply to 2-D+
    matrices not named in ``keep`` (those, norms, biases and 1-D tensors stay bfloat16, as
    quantized inference engines quantize the linear layers and keep the rest in higher precision)."""
    if not tensor.is_floating_point():
        return tensor
    if is_quantized(precision) and name in keep:
        return cast_weight(tensor, "bf16")
    return cast_weight(tensor, precision)


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
