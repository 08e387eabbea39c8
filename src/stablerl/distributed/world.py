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
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(timeout_s: float = 1800.0, threads: int | None = None) -> World:
    """Join the torchrun process group if there is one; otherwise the single-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
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
    global _MONITOR
    # a gloo group only for naming the ranks that stopped answering when a collective fails
    # (monitored_barrier is gloo-only; NCCL runs get it too)
    _MONITOR = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local_rank, device=device, backend=backend)


_MONITOR = None
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
    global _MONITOR
    _MONITOR = None
    if dist.is_initialized() and not broken:
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, in float64 (counts and partial sums)."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(values: list[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    return bool(all_reduce_max([float(flag)])[0] > 0)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects only)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0, *, group=None):
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


# Single-rank work that may take far longer than a collective should (rank 0's cold-start SFT,
# while the other ranks wait): waited for on a gloo group of its own whose timeout is this, never
# inside distributed.timeout_s, so the waiting ranks do not time out and the work is not lost.
LONG_WORK_TIMEOUT = datetime.timedelta(days=7)


class LongWait:
    """``with D.LongWait() as wait: ...; value = wait.result(value_on_src)``: every rank enters
    (the group is made collectively, before the long work starts), rank ``src`` does the work,
    and ``result`` hands its value to every rank under ``LONG_WORK_TIMEOUT``."""

    def __init__(self, src: int = 0):
        self.src = src
        self.group = dist.new_group(backend="gloo", timeout=LONG_WORK_TIMEOUT) if _active() else None

    def __enter__(self) -> "LongWait":
        return self

    def __exit__(self, *exc) -> None:
        if self.group is not None and exc[0] is None:
            dist.destroy_process_group(self.group)

    def result(self, obj):
        return broadcast_object(obj, self.src, group=self.group)
