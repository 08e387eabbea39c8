"""Which process this is, and the collectives (each a no-op when there is one process).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``init_world`` joins the process group:
NCCL when CUDA is available (one GPU per ``LOCAL_RANK``), gloo otherwise. Every collective has the
group's timeout (``distributed.timeout_s``), so a rank that dies ends the run instead of hanging
the others forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` and ``size`` count the *learner* ranks (the ones that train;
    with rollout workers, ranks ``size .. size + workers - 1`` of the job only sample)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    workers: int = 0                 # rollout worker processes in the job (rollout.workers)
    worker_index: int | None = None  # set on a rollout worker: which one (0 .. workers - 1)

    @property
    def is_worker(self) -> bool:
        return self.worker_index is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(timeout_s: float = 1800.0, threads: int | None = None, workers: int = 0) -> World:
    """Join the torchrun process group if there is one; otherwise the single-process world. With
    ``workers`` = R, the last R ranks of the job are rollout workers and the others learners;
    every process group the run uses is made here, once (every rank must enter each)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size - workers < 1:
        raise ValueError(f"rollout.workers={workers} leaves no learner rank in a job of {size} process(es); launch "
                         f"learners + workers processes: torchrun --nproc_per_node=<learners + {workers}> ...")
    if size <= 1:
        if threads:
            torch.set_num_threads(threads)
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    # torchrun sets OMP_NUM_THREADS=1 per rank; share the machine's cores out explicitly instead
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_size))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
    global _GROUP, _MONITOR, _LONG, _TRANSFER, _TRANSFER_LONG
    K = size - workers
    learners = list(range(K))
    timeout = datetime.timedelta(seconds=timeout_s)
    # the learners' collectives (FSDP, metrics, checkpoints) run on their own group when there are workers
    _GROUP = dist.new_group(ranks=learners, timeout=timeout) if workers else None
    # a gloo group only for naming the ranks that stopped answering when a collective fails
    # (monitored_barrier is gloo-only; NCCL runs get it too)
    _MONITOR = dist.new_group(ranks=learners, backend="gloo", timeout=timeout)
    _LONG = dist.new_group(ranks=learners, backend="gloo", timeout=LONG_WORK_TIMEOUT)
    if workers:  # learner rank 0 and the workers: weights out, and the start-up handshake
        _TRANSFER = dist.new_group(ranks=[0, *range(K, size)], timeout=timeout)
        _TRANSFER_LONG = dist.new_group(ranks=[0, *range(K, size)], backend="gloo", timeout=LONG_WORK_TIMEOUT)
    return World(rank=rank, size=K, local_rank=local_rank, device=device, backend=backend, workers=workers,
                 worker_index=rank - K if rank >= K else None)


_GROUP = None          # the learners' group (None: the default group, which is all learners)
_MONITOR = None
_LONG = None
_TRANSFER = None       # learner rank 0 + the rollout workers
_TRANSFER_LONG = None
UNRESPONSIVE_WAIT_S = 5.0


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed or timed out (a rank died, hung or was stopped)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("gloo" in text.lower() or "Timed out" in text or "NCCL" in text)


def unresponsive_ranks() -> str:
    """After a collective failed, which ranks do not answer: gloo's monitored barrier, on rank 0,
    names them within ``UNRESPONSIVE_WAIT_S`` ("" where it cannot tell)."""
    if _MONITOR is None or not _active():
        return ""
    try:
        dist.monitored_barrier(group=_MONITOR, timeout=datetime.timedelta(seconds=UNRESPONSIVE_WAIT_S),
                               wait_all_ranks=True)
    except RuntimeError as e:
        return str(e).strip().splitlines()[0][:300]
    return ""


def shutdown_world(broken: bool = False) -> None:
    """Leave the process group; after a failed collective (``broken``) only what cannot hang."""
    global _GROUP, _MONITOR, _LONG, _TRANSFER, _TRANSFER_LONG
    _GROUP = _MONITOR = _LONG = _TRANSFER = _TRANSFER_LONG = None
    if dist.is_initialized() and not broken:
        dist.destroy_process_group()


def share(index: int, count: int, total: int) -> range:
    """Share ``index`` of ``count`` of ``total`` items, contiguous and in order (what a rank, or a
    rollout worker, holds of a step's prompts or of the held-out problems)."""
    return range(index * total // count, (index + 1) * total // count)


def _active() -> bool:
    """Whether the learners' collectives have more than one rank to talk to."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_GROUP) > 1


def learner_group():
    """The process group of the learner ranks (None: the default group)."""
    return _GROUP


def learner_mesh(device: torch.device):
    """A 1-D device mesh over the learner ranks, for FSDP (None: the default, every rank)."""
    if _GROUP is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(_GROUP, device.type)


def barrier() -> None:
    if _active():
        dist.barrier(group=_GROUP)


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, in float64 (counts and partial sums)."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_GROUP)
    return t


def all_reduce_max(values: list[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_GROUP)
    return t


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    return bool(all_reduce_max([float(flag)])[0] > 0)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects only)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size(_GROUP)
    dist.all_gather_object(out, obj, group=_GROUP)
    return out


def broadcast_object(obj, src: int = 0, *, group=None):
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group if group is not None else _GROUP)
    return box[0]


# Single-rank work that may take far longer than a collective should (rank 0's cold-start SFT,
# while the other ranks wait): waited for on a gloo group of its own whose timeout is this, never
# inside distributed.timeout_s, so the waiting ranks do not time out and the work is not lost.
LONG_WORK_TIMEOUT = datetime.timedelta(days=7)


def broadcast_after_long_work(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank, waited for under ``LONG_WORK_TIMEOUT`` on a group of its
    own (made by init_world): for a value rank ``src`` computes by long single-rank work (the cold
    start), which must not run inside ``distributed.timeout_s``."""
    return broadcast_object(obj, src, group=_LONG if _active() else None)


# --------------------------------------------------------------------------------------------
# Learner rank 0 <-> the rollout workers (stablerl.pipeline): weights out, batches in.
# --------------------------------------------------------------------------------------------
def transfer_object(obj=None, *, long: bool = False):
    """Learner rank 0's ``obj`` on every worker (``long``: on the group with the long timeout, for
    the start-up handshake that may wait out rank 0's cold start)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_TRANSFER_LONG if long else _TRANSFER)
    return box[0]


def transfer_tensor(t: torch.Tensor) -> None:
    """``t`` of learner rank 0 into ``t`` of every worker, in place."""
    dist.broadcast(t, src=0, group=_TRANSFER)


def send_object(obj, dst: int) -> None:
    """To global rank ``dst`` (a learner rank is its global rank; worker w is learners + w)."""
    dist.send_object_list([obj], dst=dst)


def recv_object(src: int):
    box = [None]
    dist.recv_object_list(box, src=src)
    return box[0]
