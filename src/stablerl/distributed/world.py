"""Which process this is, and the collectives (each a no-op when there is one process).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``init_world`` joins the process group:
NCCL when CUDA is available (one GPU per ``LOCAL_RANK``), gloo otherwise. Every collective has the
group's timeout (``distributed.timeout_s``), so a rank that dies ends the run instead of hanging
the others forever.
"""

from __future__ import annotations

import datetime
import os
import pickle
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
    workers: int = 0  # rollout worker processes in the job (rollout.workers)
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
        raise ValueError(
            f"rollout.workers={workers} leaves no learner rank in a job of {size} process(es); launch "
            f"learners + workers processes: torchrun --nproc_per_node=<learners + {workers}> ..."
        )
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
    global _MONITOR, _LONG
    K = size - workers
    timeout = datetime.timedelta(seconds=timeout_s)
    device_id = {"device_id": device} if backend == "nccl" else {}
    if not workers:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout, **device_id)
            _owned()
    else:
        _init_roles(rank, size, K, workers, backend, timeout, device_id)
    if rank < K:
        # a gloo group only for naming the ranks that stopped answering when a collective fails
        # (monitored_barrier is gloo-only; NCCL runs get it too)
        _MONITOR = dist.new_group(backend="gloo", timeout=timeout)
        _LONG = dist.new_group(backend="gloo", timeout=LONG_WORK_TIMEOUT)
    return World(
        rank=rank,
        size=K,
        local_rank=local_rank,
        device=device,
        backend=backend,
        workers=workers,
        worker_index=rank - K if rank >= K else None,
    )


def _init_roles(rank: int, size: int, K: int, workers: int, backend: str, timeout, device_id: dict) -> None:
    """The process groups of a job with rollout workers (the first K ranks learn, the rest sample)."""
    global _JOB, _TRANSFER, _TRANSFER_LONG, _TRANSFER_TENSORS
    # Learners and workers each get a default process group of their own, made over torchrun's
    # store under a prefix per role; the job's groups across the roles are made beside them.
    # Why not one default group over the whole job: an engine that joins torch.distributed
    # itself (vLLM builds its groups with new_group over every rank of the default group) would
    # wait forever on the ranks of the other role. Each role's collectives stay in its own group.
    if dist.is_initialized():
        raise RuntimeError(
            "rollout.workers: torch.distributed was initialized before stablerl could lay out "
            "the learners' and the workers' process groups"
        )
    store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timeout))
    role, role_rank, role_size = ("learners", rank, K) if rank < K else ("workers", rank - K, workers)
    _owned()
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"stablerl/{role}", store),
        rank=role_rank,
        world_size=role_size,
        timeout=timeout,
        **device_id,
    )
    # every rank of the job, by its global rank: the batches, worker -> learner (pickled objects)
    _JOB = _group_outside_default(store, "job", rank, size, "gloo", timeout)
    transfer = [0, *range(K, size)]  # learner rank 0 and the workers: weights out, the handshake
    if rank in transfer:
        i = transfer.index(rank)
        # the weights' tensors on the device's backend (NCCL on GPU); what describes them, on gloo
        _TRANSFER_TENSORS = _group_outside_default(store, "transfer_tensors", i, len(transfer), backend, timeout)
        _TRANSFER = _group_outside_default(store, "transfer", i, len(transfer), "gloo", timeout)
        _TRANSFER_LONG = _group_outside_default(store, "transfer_long", i, len(transfer), "gloo", LONG_WORK_TIMEOUT)


_MONITOR = None
_LONG = None
_JOB = None  # every rank of a job with rollout workers (outside the default group)
_TRANSFER = None  # learner rank 0 + the rollout workers (outside the default group)
_TRANSFER_LONG = None
_TRANSFER_TENSORS = None


def _group_outside_default(store, name: str, rank: int, size: int, backend: str, timeout: datetime.timedelta):
    """A process group of ``size`` ranks over ``store`` that is not part of any rank's default
    group (so its ranks may belong to different default groups); used through its own methods."""
    prefixed = dist.PrefixStore(f"stablerl/{name}", store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)


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
        dist.monitored_barrier(
            group=_MONITOR, timeout=datetime.timedelta(seconds=UNRESPONSIVE_WAIT_S), wait_all_ranks=True
        )
    except RuntimeError as e:
        return str(e).strip().splitlines()[0][:300]
    return ""


def shutdown_world(broken: bool = False) -> None:
    """Leave the process group; after a failed collective (``broken``) only what cannot hang."""
    global _MONITOR, _LONG, _JOB, _TRANSFER, _TRANSFER_LONG, _TRANSFER_TENSORS
    _MONITOR = _LONG = _JOB = _TRANSFER = _TRANSFER_LONG = _TRANSFER_TENSORS = None
    global _OWNS_DEFAULT
    if dist.is_initialized() and not broken and _OWNS_DEFAULT:
        dist.destroy_process_group()
    _OWNS_DEFAULT = False


_OWNS_DEFAULT = False  # whether init_world made the default group (an in-process vLLM may have)


def _owned() -> None:
    global _OWNS_DEFAULT
    _OWNS_DEFAULT = True


def share(index: int, count: int, total: int) -> range:
    """Share ``index`` of ``count`` of ``total`` items, contiguous and in order (what a rank, or a
    rollout worker, holds of a step's prompts or of the held-out problems)."""
    return range(index * total // count, (index + 1) * total // count)


def _active() -> bool:
    """Whether the learners' collectives have more than one rank to talk to."""
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


def broadcast_after_long_work(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank, waited for under ``LONG_WORK_TIMEOUT`` on a group of its
    own (made by init_world): for a value rank ``src`` computes by long single-rank work (the cold
    start), which must not run inside ``distributed.timeout_s``."""
    return broadcast_object(obj, src, group=_LONG if _active() else None)


# --------------------------------------------------------------------------------------------
# Learner rank 0 <-> the rollout workers (stablerl.pipeline): weights out, batches in.
# --------------------------------------------------------------------------------------------
def _to_bytes(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor):
    return pickle.loads(data.numpy().tobytes())


def _broadcast_object_on(group, obj):
    """Rank 0's ``obj`` on every rank of ``group`` (a gloo group outside the default one, used
    through its own methods): its pickled length, then its bytes."""
    is_src = group.rank() == 0
    data = _to_bytes(obj) if is_src else None
    size = torch.tensor([data.numel() if is_src else 0], dtype=torch.int64)
    group.broadcast([size], dist.BroadcastOptions()).wait()
    if not is_src:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    group.broadcast([data], dist.BroadcastOptions()).wait()
    return obj if is_src else _from_bytes(data)


def transfer_object(obj=None, *, long: bool = False):
    """Learner rank 0's ``obj`` on every worker (``long``: on the group with the long timeout, for
    the start-up handshake that may wait out rank 0's cold start)."""
    return _broadcast_object_on(_TRANSFER_LONG if long else _TRANSFER, obj)


def transfer_tensor(t: torch.Tensor) -> None:
    """``t`` of learner rank 0 into ``t`` of every worker, in place."""
    _TRANSFER_TENSORS.broadcast([t], dist.BroadcastOptions()).wait()


def send_object(obj, dst: int) -> None:
    """To global rank ``dst`` (a learner rank is its global rank; worker w is learners + w)."""
    data = _to_bytes(obj)
    _JOB.send([torch.tensor([data.numel()], dtype=torch.int64)], dst, 0).wait()
    _JOB.send([data], dst, 1).wait()


def recv_object(src: int):
    size = torch.zeros(1, dtype=torch.int64)
    _JOB.recv([size], src, 0).wait()
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    _JOB.recv([data], src, 1).wait()
    return _from_bytes(data)


# --------------------------------------------------------------------------------------------
# Tensor-parallel inference groups (a colocated vLLM instance spanning k consecutive ranks).
# --------------------------------------------------------------------------------------------
def tensor_parallel_group(k: int):
    """The group of this rank's k consecutive ranks (every rank must call it: it makes all the
    groups). The run's ranks must divide into whole groups."""
    size = dist.get_world_size()
    if size % k:
        raise ValueError(
            f"rollout.vllm.tensor_parallel_size={k} must divide the {size} ranks that sample (each "
            "vLLM instance spans that many consecutive ranks)"
        )
    mine, _ = dist.new_subgroups_by_enumeration([list(range(g * k, g * k + k)) for g in range(size // k)])
    return mine


def gather_in_group(obj, group) -> tuple[int, list]:
    """``(this rank's index in group, [obj of each rank of group, in rank order])``."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return dist.get_group_rank(group, dist.get_rank()), out


def group_rank() -> int:
    """This process's rank in its default group (its role's: learners or rollout workers); 0 alone."""
    return dist.get_rank() if _active() else 0
