"""FSDP2 (``fully_shard``) for the training model, and full weights out of the shards.

Each decoder layer is its own FSDP unit (all-gathered for its forward and backward, then freed),
then the root (embeddings, final norm, LM head). Gradients are *summed* over ranks, not averaged:
the loss of every rank is already divided by the global normalizer (objectives.py), so the sum
is the gradient of the one global objective.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from stablerl.models import decoder_layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard_model(model: nn.Module, param_dtype: str = "fp32", reduce_dtype: str = "fp32", mesh=None) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` per decoder layer, then the root, over
    ``mesh`` (the learner ranks; None: every rank of the job)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, mesh=mesh)
    fully_shard(model, mp_policy=mp, mesh=mesh)
    # sum over ranks (see the module docstring), as a plain SUM collective, which gloo supports
    # (the default pre-multiplied sum is NCCL-only). Each FSDP unit has its own setting.
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def iter_full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every parameter and buffer, gathered one tensor at a time, so
    a weight sync holds at most one extra full tensor per rank, never a second copy of the model.

    A collective when the model is sharded: every rank must iterate to the end, in step.
    """
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full tensor, on every rank: one full copy (for exports)."""
    return dict(iter_full_tensors(model))


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all micro-batches of a mini-batch but the last (every rank runs
    the same number of micro-batches, so they agree on which is last)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
