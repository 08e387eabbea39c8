"""The one room that knows about processes: world set-up, the few collectives the loop needs,
and FSDP2 wrapping (``fsdp.py``). The maths (objectives, advantages, diagnostics) never imports
``torch.distributed``; the learner and the loop call these functions, which are plain no-ops in
a single process, so a run without torchrun needs none of it.
"""

from stablerl.distributed.world import (
    World,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    any_true,
    barrier,
    broadcast_after_long_work,
    broadcast_object,
    group_rank,
    init_world,
    is_collective_failure,
    recv_object,
    send_object,
    share,
    shutdown_world,
    transfer_object,
    transfer_tensor,
    unresponsive_ranks,
)

__all__ = [
    "World",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "any_true",
    "barrier",
    "broadcast_after_long_work",
    "broadcast_object",
    "group_rank",
    "init_world",
    "is_collective_failure",
    "recv_object",
    "send_object",
    "share",
    "shutdown_world",
    "transfer_object",
    "transfer_tensor",
    "unresponsive_ranks",
]
