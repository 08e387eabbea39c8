"""The optimizer and its learning-rate schedule (AdamW over the trainable parameters)."""

from __future__ import annotations

import math

import torch


def adamw(params, optim, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with the run's rate and weight decay (betas 0.9 / 0.99). ``fused``: the one-pass
    kernel where every parameter allows it (much faster than the per-tensor loop on CPU for small
    models; it needs plain float parameters on CPU or CUDA, and no sharded ones)."""
    params = list(params)
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, betas=(0.9, 0.99), weight_decay=optim.weight_decay, fused=fused)


def learning_rate(step: int, optim, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``optim.warmup_steps``, then constant, or linear / cosine decay to ``min_lr_ratio x lr`` at the
    last step (``total_steps - 1``)."""
    warm = optim.warmup_steps
    factor = min(1.0, (step + 1) / warm) if warm else 1.0
    if optim.schedule != "constant" and step >= warm:
        span = max(1, total_steps - 1 - warm)
        progress = min(1.0, (step - warm) / span)
        shape = 1 - progress if optim.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        factor = optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape
    return optim.lr * factor
