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


def shard_model(model: nn.Module, param_dtype: str = "fp32", reduce_dtype: str = "fp32") -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` per decoder layer, then the root, over the
    default process group (the learner ranks: rollout workers have a group of their own)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # sum over ranks (see the module docstring), as a plain SUM collective, which gloo supports
    # (the default pre-multiplied sum is NCCL-only). Each FSDP unit has its own setting.
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def is_meta(model: nn.Module) -> bool:
    """Whether ``model`` is a skeleton on the meta device (structure, no storage)."""
    return any(p.device.type == "meta" for p in model.parameters())


def shard_from_rank0(model: nn.Module, param_dtype: str, reduce_dtype: str, device: torch.device) -> nn.Module:
    """Shard ``model`` over the learner ranks when only the group's first rank holds its weights: there
    ``model`` is the real model; on the others a meta-device skeleton (``models.model_skeleton``), which
    never holds a full copy. Every rank shards its model, materializes only its own shards
    (``to_empty``), then receives them from rank 0 one tensor at a time (``distribute_tensor``
    scatters each parameter's shards from rank 0; buffers are broadcast) — what
    ``set_model_state_dict(..., broadcast_from_rank0=True)`` does, over the default process group
    (the learners: rollout workers have a group of their own). Peak on a rank other than 0: its
    shards plus one full tensor at a time."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    from stablerl.distributed.world import broadcast_object

    is_src = dist.get_rank() == 0
    if is_src == is_meta(model):
        raise RuntimeError("shard_from_rank0: the first learner rank must hold the real model, the others a skeleton")
    full = model.state_dict() if is_src else None
    # buffers outside the state dict (RoPE's inverse frequencies): computed at construction, which
    # the skeleton skipped; small, so sent whole
    extra = broadcast_object({n: b for n, b in model.named_buffers() if n not in full} if is_src else None, src=0)
    model = shard_model(model, param_dtype, reduce_dtype)
    if not is_src:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if isinstance(t, DTensor):
                whole = full[name].to(device, t.dtype) if is_src else torch.empty(t.shape, dtype=t.dtype, device=device)
                t.to_local().copy_(distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=0).to_local())
            else:
                buf = full[name].to(device) if is_src else t
                dist.broadcast(buf, src=0)
                if not is_src:
                    t.copy_(buf)
        for name, b in extra.items():
            module_name, _, buffer_name = name.rpartition(".")
            model.get_submodule(module_name).get_buffer(buffer_name).copy_(b)
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
