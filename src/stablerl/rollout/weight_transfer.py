"""Trained weights into vLLM servers through vLLM's weight-transfer protocol (docs/rollout.md).

The protocol (vLLM's RL routes, served with ``VLLM_SERVER_DEV_MODE=1``): ``/init_weight_transfer_engine``
once, joining the trainer (rank 0) and every server's workers (ranks after it) in one group; then
per sync ``/pause`` -> ``/start_weight_update`` -> ``/update_weights`` (the names, dtypes and
shapes; the workers then receive each tensor by broadcast from rank 0, concurrently with the
trainer's sends) -> ``/finish_weight_update`` (with the policy version) -> ``/resume``.

Two data planes behind the same control plane:
- ``nccl``: vLLM's own NCCL engine in the servers (GPUs); the trainer's end is vLLM's
  ``PyNcclCommunicator`` from the same rendezvous helper vLLM's trainer engine uses.
- ``gloo``: ``GlooWeightTransferEngine`` (``gloo_transfer.py``), registered in the servers by stablerl's vLLM plugin
  (``stablerl.rollout.vllm_plugin``), over a torch.distributed gloo group outside any default
  group. It runs where NCCL does not (CPU).

NCCL has no timeout of its own, so every sync runs under a deadline here: a transfer that stalls
ends the run naming the servers instead of hanging it.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

GLOO_BACKEND = "stablerl_gloo"


# --------------------------------------------------------------------------------------------
# The gloo group both ends join (the servers' end: gloo_transfer.py).
# --------------------------------------------------------------------------------------------
def _gloo_group(address: str, port: int, rank: int, size: int, timeout_s: float, is_master: bool):
    """A gloo group of ``size`` ranks over its own TCP store, outside any default process group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, size, is_master, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(dist.PrefixStore("stablerl/weights", store), rank, size, timeout), store


def _broadcast(group, tensor: torch.Tensor) -> None:
    group.broadcast([tensor], dist.BroadcastOptions()).wait()


def _in_background(fn, *args) -> Future:
    """``fn(*args)`` in a daemon thread: a call left waiting on a broken transfer holds up neither
    the error's report nor the process's exit."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


# --------------------------------------------------------------------------------------------
# The trainer's end: one sender (rank 0 of the sampling ranks) for every server.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightSender:
    """Rank 0 of the group: the trainer. ``servers``: the clients (``VllmServerClient``), each with
    ``world_size`` workers; their ranks follow one another after the trainer's."""

    def __init__(self, servers: list, backend: str, *, timeout_s: float, address: str = "127.0.0.1"):
        from stablerl.rollout.server_process import free_port

        self.servers, self.backend, self.timeout_s = servers, backend, timeout_s
        # the GPU the group was made on: a sync from another thread (in-flight updates) runs on it too
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.world_size = 1 + sum(s.world_size for s in servers)
        port = free_port()
        offsets = [1 + sum(s.world_size for s in servers[:i]) for i in range(len(servers))]
        infos = [
            {"master_address": address, "master_port": port, "rank_offset": o, "world_size": self.world_size}
            for o in offsets
        ]
        for info in infos:
            if backend == "nccl":
                info["packed"] = False
            else:
                info["timeout_s"] = timeout_s
        # the servers' workers block in the rendezvous until the trainer joins it: all at once
        with ThreadPoolExecutor(len(servers)) as pool:
            calls = [
                pool.submit(s.post, "init_weight_transfer_engine", {"init_info": i}) for s, i in zip(servers, infos)
            ]
            self.group, self._store = self._open(address, port)
            for call in calls:
                call.result()

    def _open(self, address: str, port: int):
        if self.backend == "gloo":
            return _gloo_group(address, port, 0, self.world_size, self.timeout_s, is_master=True)
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        comm = trainer_init({"master_address": address, "master_port": port, "world_size": self.world_size})
        return comm, None

    def send(self, meta: list[WeightMeta], tensors: Iterable[torch.Tensor], version: int, pause: str = "wait") -> None:
        """One sync: the servers paused, the tensors (in ``meta``'s order, cast to its dtypes)
        broadcast, the update finished with ``version``, the servers resumed; under a deadline.
        ``pause``: vLLM's pause mode, ``wait`` (requests in flight finish with the old weights
        first) or ``keep`` (they freeze and go on with the new weights: in-flight updates; the
        pause clears vLLM's caches, so their prefixes are recomputed with the new weights)."""
        done: dict = {}
        args = (meta, tensors, version, pause, done, self.device)
        worker = threading.Thread(target=self._send, args=args, daemon=True)
        worker.start()
        deadline = time.monotonic() + self.timeout_s
        while worker.is_alive() and time.monotonic() < deadline:
            worker.join(min(0.2, max(deadline - time.monotonic(), 0.0)))
            # a server that refused the update never receives: its answer, not the deadline, ends the sync
            for receiving in done.get("receiving", []):
                if receiving.done() and receiving.exception() is not None:
                    raise receiving.exception()
        if worker.is_alive():
            raise TimeoutError(
                f"weight transfer to the vLLM servers ({', '.join(s.url for s in self.servers)}) stalled for "
                f"{self.timeout_s:.0f} s (distributed.timeout_s); see their logs"
            )
        if "error" in done:
            raise done["error"]

    def _send(self, meta, tensors, version, pause, done, device) -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            info = {
                "names": [m.name for m in meta],
                "dtype_names": [str(m.dtype).removeprefix("torch.") for m in meta],
                "shapes": [list(m.shape) for m in meta],
            }
            self._each("pause", query={"mode": pause})
            self._each("start_weight_update")
            receiving = [_in_background(s.post, "update_weights", {"update_info": info}) for s in self.servers]
            done["receiving"] = receiving
            try:
                self._broadcast_all(meta, tensors)
            except RuntimeError:  # the group breaks when a server dies mid-broadcast: name the server
                # (not waiting for the others' /update_weights: they wait in the broken group)
                for server in self.servers:
                    server.get("health")  # "vLLM server URL did not answer /health (it exited with code ...)"
                raise
            for r in receiving:
                r.result()
            self._each("finish_weight_update", {"weight_version": str(version)})
            self._each("resume")
        except BaseException as e:  # handed to the caller's thread
            done["error"] = e

    def _broadcast_all(self, meta: list[WeightMeta], tensors: Iterable[torch.Tensor]) -> None:
        n = 0
        for m, t in zip(meta, tensors):
            if tuple(t.shape) != m.shape:
                raise ValueError(f"weight {m.name}: the trainer sent shape {tuple(t.shape)}, declared {m.shape}")
            if self.backend == "gloo":
                _broadcast(self.group, t.detach().to("cpu", m.dtype).contiguous())
            else:
                send = t.detach().to(torch.device("cuda", torch.cuda.current_device()), m.dtype).contiguous()
                self.group.broadcast(send, src=0, stream=torch.cuda.current_stream())
            n += 1
        if n != len(meta):
            raise ValueError(f"the trainer sent {n} weights of the {len(meta)} declared")
        if self.backend == "nccl":
            torch.cuda.synchronize()

    def _each(self, route: str, body: dict | None = None, query: dict | None = None) -> None:
        with ThreadPoolExecutor(len(self.servers)) as pool:
            for call in [pool.submit(s.post, route, body, query) for s in self.servers]:
                call.result()

    def close(self) -> None:
        self.group, self._store = None, None
