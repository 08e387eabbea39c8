"""The trainer's end of the weight transfer over a real gloo group, with stand-ins for the vLLM
servers' HTTP routes: a server that dies between syncs breaks the next broadcast, and the error
names it (as a request to it would), not gloo's "connection closed", at once, while a surviving
server's /update_weights still waits in the broken group; a server that refuses the update ends
the sync with its answer, not with the sync's deadline."""

import subprocess
import sys
import threading
import time

import pytest
import torch

from stablerl.rollout.weight_transfer import WeightMeta, WeightSender

# one server's worker: join the group at its rank, then exit (a server killed between syncs) or
# stay in the group receiving nothing (a server that refused the update)
WORKER = """
import sys, time
from stablerl.rollout.weight_transfer import _gloo_group
address, port, rank, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
group, store = _gloo_group(address, port, rank, size, 60.0, is_master=False)
if sys.argv[5] == "stay":
    time.sleep(120)
"""


class FakeServer:
    """What WeightSender asks of a server: its routes (answered here; the receiving end is the
    worker process) and /health, which fails once the worker has exited."""

    def __init__(self, url: str, lives: bool, release: threading.Event, refuses: bool = False, stays: bool = False):
        self.url, self.world_size, self.lives, self.worker, self.release = url, 1, lives, None, release
        self.refuses, self.stays = refuses, stays or refuses

    def post(self, route: str, body=None, query=None):
        if route == "update_weights" and self.refuses:
            raise RuntimeError(f"vLLM server {self.url}: /update_weights answered 400: unknown weight")
        if route == "update_weights" and self.lives:  # a live server receives until the group breaks
            self.release.wait(120)
        if route == "init_weight_transfer_engine":
            i = body["init_info"]
            args = [i["master_address"], str(i["master_port"]), str(i["rank_offset"]), str(i["world_size"])]
            self.worker = subprocess.Popen([sys.executable, "-c", WORKER, *args, "stay" if self.stays else "exit"])

    def get(self, route: str):
        if not self.lives and self.worker.poll() is not None:
            raise RuntimeError(f"vLLM server {self.url} did not answer /{route} (it exited with code 0)")


@pytest.mark.parametrize("lives", [False, True])
def test_a_broadcast_broken_by_a_dead_server_names_it_at_once(lives):
    release = threading.Event()
    servers = [FakeServer("http://a", lives=True, release=release), FakeServer("http://b", lives, release)]
    sender = None
    try:
        sender = WeightSender(servers, "gloo", timeout_s=30.0)
        for s in servers:
            s.worker.wait(timeout=60)  # both workers gone after the rendezvous; b's /health tells
        meta = [WeightMeta("w", torch.float32, (1024, 1024))]
        start = time.monotonic()
        with pytest.raises(RuntimeError) as failed:
            sender.send(meta, [torch.ones(1024, 1024)], version=1)
        assert time.monotonic() - start < 15  # not the sync's 30 s deadline
        if lives:  # every server answers /health: gloo's own error stands
            assert "did not answer" not in str(failed.value)
        else:
            assert str(failed.value).startswith("vLLM server http://b did not answer /health")
    finally:
        release.set()
        if sender is not None:
            sender.close()
        for s in servers:
            if s.worker is not None and s.worker.poll() is None:
                s.worker.kill()
                s.worker.wait()


def test_a_server_that_refuses_the_update_ends_the_sync_with_its_answer():
    release = threading.Event()
    # a waits in the group for the broadcast, b refused the update and receives nothing
    servers = [FakeServer("http://a", True, release, stays=True), FakeServer("http://b", True, release, refuses=True)]
    sender = None
    try:
        sender = WeightSender(servers, "gloo", timeout_s=30.0)
        # 64 MB: more than a socket holds, so the broadcast waits on workers that never receive
        meta = [WeightMeta("w", torch.float32, (4096, 4096))]
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"http://b: /update_weights answered 400"):
            sender.send(meta, [torch.ones(4096, 4096)], version=1)
        assert time.monotonic() - start < 15  # not the sync's 30 s deadline
    finally:
        release.set()
        for s in servers:
            if s.worker is not None and s.worker.poll() is None:
                s.worker.kill()
                s.worker.wait()
        if sender is not None:
            sender.close()
