"""The vLLM server engine (rollout.engine=vllm_server) on CPU, against the in-process vLLM engine
and the fp32 training model.

Two servers are started for the module (a start takes about a minute on a loaded CPU) and shared,
so every request and weight sync goes to both; the tests that break a server (killed, never ready)
use their own processes, and the last tests kill the shared ones. Every test checks that the
processes it started are gone.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_vllm import HAVE_VLLM, prompts, tiny, training_logp

from stablerl.config import SamplingConfig, VllmConfig
from stablerl.diagnostics import route_agreement
from stablerl.forward import response_logp
from stablerl.routing import NO_ROUTE

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here")]
CPU = VllmConfig(kv_cache_gb=0.25)
TWO = VllmConfig(kv_cache_gb=0.25, servers=2)
SAMPLING = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20)


def gone(pgid: int, wait_s: float = 10.0) -> bool:
    """Whether process group ``pgid`` (a server and everything vLLM started in it) has ended: no
    process of it left but zombies (a container's init may reap them late)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(stat.parent.name)
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from stablerl.rollout.vllm import VllmEngine
    from stablerl.rollout.vllm_server import VllmServerEngine

    model, tok = tiny()
    log_dir = tmp_path_factory.mktemp("servers")
    server = VllmServerEngine(model, tok, "fp32", cfg=TWO, max_model_len=256, eos_token_id=[], log_dir=log_dir)
    local = VllmEngine(model, tok, "fp32", cfg=CPU, max_model_len=256, eos_token_id=[])
    pids = [p.popen.pid for p in server.processes]
    yield server, local, model, log_dir
    local.close()
    server.close()
    assert all(gone(p) for p in pids)


def test_server_samples_what_the_in_process_engine_samples(served):
    """Two servers, requests spread over both: each sample is the in-process engine's for its seed."""
    server, local, _, log_dir = served
    assert len(server.clients) == 2 and len({c.url for c in server.clients}) == 2
    ps = prompts(12, seed=5)
    a = server.generate(ps, SAMPLING, seeds=list(range(100, 112)))
    b = local.generate(ps, SAMPLING, seeds=list(range(100, 112)))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    # the same fp32 kernels in another process: equal up to the batch's summation order
    assert float((a.rollout_logp - b.rollout_logp).abs().max()) < 1e-5
    assert torch.equal(a.routes, b.routes)
    assert all((log_dir / f"vllm_server_{i}.log").stat().st_size > 0 for i in (0, 1))


def test_server_routes_align_and_replay(served):
    server, _, model, _ = served
    batch = server.generate(prompts(), SamplingConfig(max_new_tokens=16), seeds=list(range(12)))
    real = batch.attention_mask.bool()
    assert bool((batch.routes[~real] == NO_ROUTE).all())
    with torch.no_grad():
        live = response_logp(model, batch, capture=True)
        replayed = response_logp(model, batch, replay=batch.routes)
    assert bool((route_agreement(live["routes"], batch.routes) == 1.0).all())
    assert float((replayed["logp"] - batch.rollout_logp)[batch.response_mask].abs().max()) < 1e-4


def test_after_a_weight_sync_server_logprobs_equal_the_trainer_s(served):
    """vLLM's weight-transfer protocol (stablerl's gloo engine on CPU) carries every layer: the
    server's processed log-probs of its samples equal the new model's fp32 ones, not the old's."""
    server, _, model, _ = served
    trained, _ = tiny(seed=123)
    try:
        server.load_weights(iter(list(trained.state_dict().items())), version=7)
        batch = server.generate(prompts(), SAMPLING, seeds=list(range(12)))
        assert batch.version == 7
        gap = (training_logp(trained, batch, SAMPLING) - batch.rollout_logp).abs()
        old = (training_logp(model, batch, SAMPLING) - batch.rollout_logp)[batch.response_mask].abs().max()
        assert float(old) > 1e-2
        # each server holds the new weights: the batch's rows alternate between the two
        for half in (0, 1):
            rows = torch.arange(len(batch)) % 2 == half
            assert float(gap[rows][batch.response_mask[rows]].max()) < 1e-4
        assert [c.get("weight_info")["weight_version"] for c in server.clients] == ["7", "7"]
    finally:
        server.load_weights(model.state_dict(), version=0)


def test_a_paused_server_holds_requests_until_resumed(served):
    server, _, _, _ = served
    server.pause()
    try:
        assert server.clients[0].get("is_paused")["is_paused"] is True
        out = {}
        t = threading.Thread(target=lambda: out.update(b=server.generate(prompts(2), SAMPLING, seeds=[1, 2])))
        t.start()
        t.join(3.0)
        assert t.is_alive() and "b" not in out
    finally:
        server.resume()
    t.join(60)
    assert len(out["b"]) == 2 and server.clients[0].get("is_paused")["is_paused"] is False


def test_bad_server_settings_are_one_line_errors(tmp_path):
    from stablerl.rollout.server_process import ServerCommand, ServerProcess, free_port
    from stablerl.rollout.vllm_server import VllmServerEngine

    model, tok = tiny()
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=f"vLLM server {url} did not answer /v1/models"):
        VllmServerEngine(model, tok, "fp32", cfg=VllmConfig(urls=[url]), timeout_s=5)
    # a server that fails at start-up: its reason, read from its log
    crash = ServerCommand(
        [sys.executable, "-c", "print('OSError: [Errno 98] Address already in use'); raise SystemExit(1)"],
        {},
        tmp_path,
        1,
    )
    p = ServerProcess.start(crash, 0, VllmConfig(), on_cuda=False)
    with pytest.raises(ValueError, match=rf"exited with code 1 while starting: port {p.port} is in use"):
        p.wait_ready(60)
    # one that never answers: stopped (its whole process group) after the timeout
    hang = ServerCommand([sys.executable, "-c", "import time; time.sleep(600)"], {}, tmp_path, 1)
    p = ServerProcess.start(hang, 1, VllmConfig(), on_cuda=False)
    with pytest.raises(ValueError, match=r"was not ready within 1 s \(rollout.vllm.server_start_timeout_s\)"):
        p.wait_ready(1)
    assert gone(p.popen.pid)
    with pytest.raises(ValueError, match="sleep mode"):
        from stablerl.rollout.vllm_support import resolve_sleep_level

        resolve_sleep_level(1, on_cuda=False)


def run_args(ckpt, urls: list[str], steps: int) -> list[str]:
    from test_vllm import VLLM_RUN

    swap = {"rollout.engine=vllm": "rollout.engine=vllm_server", "train.steps=3": f"train.steps={steps}"}
    listed = ", ".join(f'"{u}"' for u in urls)
    return [f"model.path={ckpt}", *[swap.get(a, a) for a in VLLM_RUN], f"rollout.vllm.urls=[{listed}]"]


def restored(server, model) -> None:
    """The module's servers back to the starting weights, after a run took their weight-transfer
    group over."""
    server.connect()
    server.load_weights(model.state_dict(), version=0)


@pytest.fixture(scope="module")
def one_rank_run(served, tmp_path_factory):
    """The loop on one rank through the first server (attached by URL), 3 steps: (run dir, model dir)."""
    from test_vllm import _vllm_ckpt

    from stablerl.cli import main

    server, _, model, _ = served
    tmp = tmp_path_factory.mktemp("one_rank")
    ckpt = _vllm_ckpt(tmp)
    try:
        assert main(["train", f"run_dir={tmp / 'k1'}", *run_args(ckpt, [server.clients[0].url], 3)]) == 0
    finally:
        restored(server, model)
    return tmp / "k1", ckpt


def test_runs_on_one_and_two_ranks_train_with_r3_through_attached_servers(served, one_rank_run, tmp_path):
    """The loop with rollout.engine=vllm_server (attached by URL): the server's samples, routes and
    log-probs are the policy's at every step (its weights synced after each); on 2 gloo ranks
    through both servers (rank 0 sends the weights to both, both ranks sample from both) the run
    trains exactly as on 1 rank through one."""
    from launch import torchrun_train

    from stablerl.runlog import read_metrics

    server, _, model, _ = served
    k1, ckpt = one_rank_run
    try:
        urls = [c.url for c in server.clients]
        rc, out = torchrun_train([f"run_dir={tmp_path / 'k2'}", *run_args(ckpt, urls, 3)], nproc=2, timeout=300)
        assert rc == 0, out[-3000:]
    finally:
        restored(server, model)
    one, two = read_metrics(k1), read_metrics(tmp_path / "k2")
    assert [r["rollout_version"] for r in one[1:]] == [0, 1, 2] == [r["rollout_version"] for r in two[1:]]
    for a, b in zip(one[1:], two[1:]):
        assert a["train_infer_kl"] < 1e-4 and a["route_agreement/train_infer"] > 0.99 and a["grad_norm"] > 0
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_a_resumed_run_syncs_the_servers_and_goes_on_as_if_uninterrupted(served, one_rank_run, tmp_path):
    """A run stopped after step 2 and resumed while the server holds other weights (another
    trainer's, a restarted server's): the resume sends the checkpoint's, so step 3 samples and
    trains as in the uninterrupted run."""
    from stablerl.cli import main
    from stablerl.runlog import read_metrics

    server, _, model, _ = served
    k1, ckpt = one_rank_run
    cut = tmp_path / "cut"
    try:
        assert main(["train", f"run_dir={cut}", *run_args(ckpt, [server.clients[0].url], 2)]) == 0
        server.connect()
        server.load_weights(tiny(seed=5)[0].state_dict(), version=99)
        assert main(["train", "--resume", str(cut), "train.steps=3"]) == 0
    finally:
        restored(server, model)
    full = {r["step"]: r for r in read_metrics(k1)}
    resumed = {r["step"]: r for r in read_metrics(cut)}
    a, b = full[3], resumed[3]
    assert b["rollout_version"] == 2 and b["train_infer_kl"] < 1e-4
    for k in ("reward_mean", "train_infer_kl", "route_agreement/train_infer"):
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-9), k
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_a_rollout_worker_as_the_server_s_client_keeps_the_fixed_lag(served, one_rank_run, tmp_path):
    """1 learner + 1 rollout worker (the server's client, which sends it the versions it loads) at
    eta = 1, against the learner alone at eta = 1: the same versions sample the same steps, the
    same training."""
    from launch import torchrun_train

    from stablerl.cli import main
    from stablerl.runlog import read_metrics

    server, _, model, _ = served
    _, ckpt = one_rank_run
    args = [*run_args(ckpt, [server.clients[0].url], 3), "rollout.max_staleness=1"]
    try:
        assert main(["train", f"run_dir={tmp_path / 'w0'}", *args]) == 0
        rc, out = torchrun_train([f"run_dir={tmp_path / 'w1'}", *args, "rollout.workers=1"], nproc=2, timeout=300)
        assert rc == 0, out[-3000:]
    finally:
        restored(server, model)
    alone, worker = read_metrics(tmp_path / "w0"), read_metrics(tmp_path / "w1")
    assert [r["rollout_version"] for r in worker[1:]] == [0, 0, 1] == [r["rollout_version"] for r in alone[1:]]
    for a, b in zip(alone[1:], worker[1:]):
        for k in ("reward_mean", "train_infer_kl", "route_agreement/train_infer"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-9), k
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def generated_tokens(clients) -> float:
    """Tokens the servers have generated so far (vLLM's Prometheus counter, summed)."""
    import urllib.request

    total = 0.0
    for c in clients:
        for line in urllib.request.urlopen(f"{c.url}/metrics", timeout=10).read().decode().splitlines():
            if line.startswith("vllm:generation_tokens_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_an_in_flight_update_switches_the_weights_mid_response_and_says_which_token_had_which(served):
    """Long responses sampled on both servers; once they are under way, a sync in vLLM's pause mode
    keep. Each response's tokens are version 0, then 1 from one point on, and some response has
    both; each token's log-prob is its version's model's on the whole prefix (fp32, within 1e-4:
    the pause cleared vLLM's caches, so the prefixes were recomputed with the new weights). The
    batch's version is the oldest."""
    from stablerl.rollout.vllm_server import VllmServerEngine

    server, _, model, _ = served
    long = SamplingConfig(max_new_tokens=200, temperature=1.0)
    _, tok = tiny()
    trained, _ = tiny(seed=123)
    cfg = VllmConfig(urls=[c.url for c in server.clients], in_flight_updates=True)
    flight = VllmServerEngine(model, tok, "fp32", cfg=cfg, max_model_len=256, eos_token_id=[])
    try:
        before, out = generated_tokens(flight.clients), {}
        t = threading.Thread(target=lambda: out.update(b=flight.generate(prompts(4), long, seeds=[1, 2, 3, 4])))
        t.start()
        deadline = time.monotonic() + 120
        while generated_tokens(flight.clients) < before + 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        flight.load_weights(trained.state_dict(), version=1, in_flight=True)
        t.join(120)
        assert "b" in out, "the sampling thread failed or did not end (its error is above)"
        batch = out["b"]
    finally:
        flight.close()
        restored(server, model)
    versions, mask = batch.token_version, batch.response_mask
    assert batch.version == 0 and set(versions[mask].tolist()) == {0, 1}
    for row in range(len(batch)):
        v = versions[row][mask[row]]
        assert bool((v[1:] >= v[:-1]).all())  # one switch at most, old to new
    mixed = [row for row in range(len(batch)) if set(versions[row][mask[row]].tolist()) == {0, 1}]
    assert mixed, versions
    old = (training_logp(model, batch, long) - batch.rollout_logp).abs()
    new = (training_logp(trained, batch, long) - batch.rollout_logp).abs()
    assert float(old[mask & (versions == 0)].max()) < 1e-4
    assert float(new[mask & (versions == 1)].max()) < 1e-4
    assert float(old[mask & (versions == 1)].mean()) > 1e-2  # the two models differ there


def test_a_run_with_in_flight_updates_keeps_each_token_within_the_bound(served, one_rank_run, tmp_path):
    """1 learner + 1 rollout worker with in-flight updates at eta = 1: every step is sampled by
    versions between the fixed lag's and the learner's pi_old (staleness at most 1, per token),
    trains, and where every token was sampled by pi_old's version the fp32 servers are the policy
    (KL < 1e-4)."""
    from launch import torchrun_train

    from stablerl.runlog import read_metrics

    server, _, model, _ = served
    _, ckpt = one_rank_run
    args = [
        *run_args(ckpt, [c.url for c in server.clients], 3),
        "rollout.max_staleness=1",
        "rollout.workers=1",
        "rollout.vllm.in_flight_updates=true",
    ]
    try:
        rc, out = torchrun_train([f"run_dir={tmp_path / 'f'}", *args], nproc=2, timeout=300)
        assert rc == 0, out[-3000:]
    finally:
        restored(server, model)
    rows = read_metrics(tmp_path / "f")[1:]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for s, r in enumerate(rows, start=1):
        assert max(0, s - 2) <= r["rollout_version"] <= s - 1
        assert 0 <= r["staleness/mean"] <= r["staleness/max"] <= 1 and 0 <= r["staleness/in_flight_tokens"] <= 1
        assert r["grad_norm"] > 0
        if r["staleness/max"] == 0:  # every token sampled by pi_old's own weights
            assert r["train_infer_kl"] < 1e-4


def test_a_server_killed_mid_run_ends_the_run_naming_it(served, one_rank_run, tmp_path):
    """(Kills the module's server: the tests after it need none.)"""
    import subprocess

    server, _, _, _ = served
    url, run = server.clients[0].url, tmp_path / "run"
    _, ckpt = one_rank_run
    args = [sys.executable, "-m", "stablerl", "train", f"run_dir={run}", *run_args(ckpt, [url], 50)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        os.killpg(server.processes[0].popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    assert f"vLLM server {url} did not answer" in out, out[-3000:]


def test_a_killed_server_ends_sampling_with_an_error_naming_it(served):
    """(Last: it kills the module's server.)"""
    server, _, _, _ = served
    process = server.processes[0]
    if process.poll() is None:
        os.killpg(process.popen.pid, signal.SIGKILL)
    process.popen.wait(30)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"vLLM server {process.url} did not answer .*exited with code -9"):
        server.generate(prompts(2), SAMPLING, seeds=[1, 2])
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match=str(Path(process.log_path).name)):
        server.check_alive()


def test_vllm_options_that_cannot_work_are_one_line_errors():
    from stablerl.config import RolloutConfig

    with pytest.raises(ValueError, match="sleep_level=2 discards vLLM's weights"):
        RolloutConfig(engine="vllm", max_staleness=1, vllm={"sleep_level": 2})
    with pytest.raises(ValueError, match="is not a base URL"):
        VllmConfig(urls=["localhost:8000"])
    with pytest.raises(ValueError, match="sleep_level"):
        VllmConfig(sleep_level=3)
    from stablerl.rollout.vllm import VllmEngine

    model, tok = tiny()
    with pytest.raises(ValueError, match="tensor_parallel_size=2 with rollout.engine=vllm spans"):
        VllmEngine(model, tok, "fp32", cfg=VllmConfig(tensor_parallel_size=2))
