"""Staleness as a fixed lag (stablerl.pipeline, rollout.max_staleness) and the bypass correction
(loss.proximal=rollout): what samples each step, resume, and the maths the pipeline must keep."""

import json
from pathlib import Path

import pytest
import torch

from stablerl import checkpoint
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.generation import encode_problem
from stablerl.loop import Trainer
from stablerl.models import load_policy
from stablerl.pipeline import sampling_version
from stablerl.rollout import LocalEngine
from stablerl.runlog import read_metrics
from stablerl.seeds import rollout_seeds
from stablerl.tasks import build_task

REWARD = str(Path(__file__).parent / "data" / "reward_fns.py") + ":digit_fraction"


def config(ckpt, run_dir, *extra) -> RunConfig:
    return build_config(RunConfig, None, _cli_args(ckpt, run_dir, *extra))


def run(ckpt, run_dir, *extra, resume=False):
    Trainer(config(ckpt, run_dir, *extra), run_dir, resume=resume, log=lambda *_: None).run()
    return read_metrics(run_dir)


def test_the_lag_is_fixed_exactly_min_eta_and_s_minus_1():
    assert [sampling_version(s, 2) for s in range(1, 7)] == [0, 0, 0, 1, 2, 3]
    assert [sampling_version(s, 0) for s in range(1, 4)] == [0, 1, 2]


def test_an_in_flight_feed_loads_each_version_as_it_arrives_and_steps_wait_only_for_theirs(monkeypatch):
    """The worker's side of in-flight updates, with the learner's messages from a queue and an
    engine that records its loads: each version is loaded in flight the moment it arrives; a step
    waits for the version it needs at the least, not for newer ones; a failed load surfaces in
    the worker's loop, and at the end."""
    import queue
    import threading

    from stablerl import pipeline

    class Engine:
        def __init__(self):
            self.version, self.loads = 0, []

        def load_weights(self, weights, version, in_flight=False):
            if weights == "bad":
                raise OSError("the servers went away")
            self.loads.append((version, in_flight))
            self.version = version

    sent = queue.Queue()
    monkeypatch.setattr(pipeline, "receive_version", lambda device: sent.get(timeout=10))
    engine = Engine()
    feed = pipeline.InFlightFeed(engine, "cpu", count=2, eta=1, timeout_s=10)
    assert feed.wait_for(0) < 1.0  # what the servers hold already
    waiting = threading.Thread(target=feed.wait_for, args=(2,))
    waiting.start()
    sent.put((1, "weights of 1"))
    waiting.join(0.5)
    assert waiting.is_alive()  # version 1 is in, and loaded, but the step needs 2
    assert engine.loads == [(1, True)]
    sent.put((2, "weights of 2"))
    waiting.join(10)
    assert not waiting.is_alive() and engine.loads == [(1, True), (2, True)]
    feed.close()
    broken = pipeline.InFlightFeed(Engine(), "cpu", count=1, eta=1, timeout_s=10)
    sent.put((3, "bad"))
    with pytest.raises(RuntimeError, match="in-flight weight updates stopped: the servers went away"):
        broken.wait_for(3)
    with pytest.raises(RuntimeError, match="the servers went away"):
        broken.close()
    slow = pipeline.InFlightFeed(Engine(), "cpu", count=1, eta=1, timeout_s=0.2)
    with pytest.raises(TimeoutError, match="waited 0 s .distributed.timeout_s. for policy version 1"):
        slow.wait_for(1)
    sent.put((1, "weights of 1"))
    slow.close()


def test_each_step_is_sampled_by_version_s_minus_1_minus_eta(sft_ckpt, tmp_path):
    rows = run(sft_ckpt, tmp_path / "lag", "train.steps=5", "rollout.max_staleness=2")
    steps = rows[1:]
    assert [r["rollout_version"] for r in steps] == [0, 0, 0, 1, 2]
    assert [r["staleness/max"] for r in steps] == [0, 1, 2, 2, 2] == [min(2, s - 1) for s in range(1, 6)]
    # independently: step 3's responses are exactly what an engine holding the *starting* weights
    # samples for step 3's prompts and seeds
    model, tok = load_policy(sft_ckpt)
    cfg = config(sft_ckpt, tmp_path / "x")
    task = build_task(cfg.task)
    problems = [task.train_problem(3 * 2 + i) for i in range(2)]
    engine = LocalEngine(model, cfg.rollout.precision, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prompts = [encode_problem(tok, p, cfg.task) for p in problems for _ in range(4)]
    batch = engine.generate(prompts, cfg.rollout.sampling(), seeds=rollout_seeds(cfg.train.seed, 3, range(8)))
    texts = [tok.decode(batch.response_ids[i][batch.response_mask[i]], skip_special_tokens=True) for i in range(8)]
    logged = [json.loads(line) for line in (tmp_path / "lag" / "rollouts.jsonl").read_text().splitlines()]
    assert logged[2]["step"] == 3 and logged[2]["completions"] == texts


def test_a_lagged_run_resumes_exactly(sft_ckpt, tmp_path):
    full = run(sft_ckpt, tmp_path / "full", "train.steps=5", "rollout.max_staleness=2")
    run(sft_ckpt, tmp_path / "part", "train.steps=3", "rollout.max_staleness=2")
    assert (checkpoint.latest(tmp_path / "part") / "lag").is_dir()  # the pending versions are in the checkpoint
    resumed = run(sft_ckpt, tmp_path / "part", "train.steps=5", "rollout.max_staleness=2", resume=True)
    # timings differ, and the shorter first run evaluated at its own end (step 3): all else is equal
    skip = ("time", "per_s", "eval/")
    assert len(full) == len(resumed)
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if not any(t in k for t in skip)} == {
            k: v for k, v in b.items() if not any(t in k for t in skip)
        }
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "full"))
    wb = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "part"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eta_zero_is_the_synchronous_loop(sft_ckpt, tmp_path):
    a = run(sft_ckpt, tmp_path / "a", "train.steps=2")
    b = run(sft_ckpt, tmp_path / "b", "train.steps=2", "rollout.max_staleness=0")
    timing = ("time", "per_s")
    assert [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in a] == [
        {k: v for k, v in r.items() if not any(t in k for t in timing)} for r in b
    ]
    assert [r["rollout_version"] for r in a[1:]] == [0, 1]


def test_bypass_makes_pi_old_the_sampler_and_refuses_r2(sft_ckpt, tmp_path):
    rows = run(
        sft_ckpt,
        tmp_path / "bp",
        "train.steps=2",
        "loss.proximal=rollout",
        "rollout.max_staleness=1",
        "batch.minibatches_per_step=2",
    )
    for r in rows[1:]:  # pi_old := mu: the IS weight is exactly 1, the train-infer KL exactly 0
        assert r["is_weight_mean"] == 1.0 and r["train_infer_kl"] == 0.0
    with pytest.raises(ValueError, match=r"loss.proximal=rollout.*train.routing_replay=R2"):
        build_config(RunConfig, None, ["loss.proximal=rollout", "train.routing_replay=R2"])


def test_the_bypass_has_no_pi_old_pass_and_routes_mini_batch_0_as_pi_old():
    from stablerl.replay import RoutingPlan

    plan = RoutingPlan("none", True, 4, bypass=True)
    assert plan.old_pass() is None
    assert [plan.minibatch(k).capture for k in range(4)] == ["train_infer", None, None, None]
    assert RoutingPlan("R3", True, 4, bypass=True).minibatch(2).replay == "rollout"


# ---------------------------------------------------------------------------------------------
# rollout workers: the same config with R workers gives the same run as with 0 (up to the
# order of float sums): the pipeline changes the speed, never the maths
# ---------------------------------------------------------------------------------------------
def _comparable(rows):
    skip = ("time", "per_s", "wait")
    return [{k: v for k, v in r.items() if not any(t in k for t in skip)} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize(
    "eta,learners,workers",
    [(1, 1, 1), (0, 1, 1), (2, 1, 2), (1, 2, 1)],
    ids=["eta1-R1", "eta0-R1", "eta2-R2", "eta1-L2-R1"],
)
def test_workers_equal_zero_workers(sft_ckpt, tmp_path, eta, learners, workers):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from launch import torchrun_train

    extra = ["train.steps=4", "rollout.precision=fp32", f"rollout.max_staleness={eta}", "checkpoint.every=2"]
    ref = run(sft_ckpt, tmp_path / "ref", *extra)
    args = [
        f"{a}"
        for a in [
            f"model.path={sft_ckpt}",
            f"run_dir={tmp_path / 'w'}",
            "batch.prompts_per_step=2",
            "batch.group_size=4",
            "rollout.max_new_tokens=12",
            "task.levels=[1]",
            "task.eval_size=4",
            "eval.every=100",
            "log.progress=false",
            "log.tensorboard=false",
            "log.rollouts=true",
            f"task.reward_fns=[{REWARD}]",
            "optim.lr=1e-3",
            *extra,
            f"rollout.workers={workers}",
        ]
    ]
    rc, out = torchrun_train(args, nproc=learners + workers, timeout=300)
    assert rc == 0, out[-3000:]
    got = read_metrics(tmp_path / "w")
    a = [json.loads(x) for x in (tmp_path / "ref" / "rollouts.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "w" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in a] == [r["completions"] for r in b]  # the same samples, by the same versions
    assert [r["rollout_version"] for r in got[1:]] == [max(0, s - 1 - eta) for s in range(1, 5)]
    assert all(r["pipeline/learner_wait_s"] >= 0 for r in got[1:])
    # pi_old is computed over another batch layout (the workers' pieces concatenated; with two
    # learners, half the batch each): per-sequence sums of log w, not means, then carry float32
    # round-off of up to 12 tokens (tests/test_distributed.py ABS_TOL)
    tol = {f"seq_log_w/{s}": 12 * 4.8e-7 for s in ("mean", "p01", "p05", "min")}
    for x, y in zip(_comparable(ref), _comparable(got)):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=tol.get(k, 1e-7)), k
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "ref"))
    wb = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "w"))
    for k in wa:
        assert float((wa[k] - wb[k]).norm()) <= 1e-5 * float(wa[k].norm()), k


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_and_resume_continues_exactly(sft_ckpt, tmp_path):
    """SIGKILL the rollout worker mid-run: the job ends (no process left: the launcher's session is
    killed at the end in any case), the last checkpoint is intact, and a resume — with no worker at
    all, which may change on a resume — ends exactly where the uninterrupted run does."""
    import os
    import signal
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    from launch import end_session, rank_pid, torchrun_start

    extra = ["train.steps=6", "rollout.precision=fp32", "rollout.max_staleness=1", "checkpoint.every=1"]
    ref = run(sft_ckpt, tmp_path / "ref", *extra)
    args = [
        f"model.path={sft_ckpt}",
        f"run_dir={tmp_path / 'w'}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "task.levels=[1]",
        "task.eval_size=4",
        "eval.every=100",
        "log.progress=false",
        "log.tensorboard=false",
        "log.rollouts=true",
        f"task.reward_fns=[{REWARD}]",
        "optim.lr=1e-3",
        *extra,
        "rollout.workers=1",
        "distributed.timeout_s=30",
    ]
    proc = torchrun_start(args, nproc=2)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            latest = checkpoint.latest(tmp_path / "w")
            if latest is not None and int(latest.name.split("_")[1]) >= 2:
                break
            time.sleep(0.1)
        worker = rank_pid(proc.pid, 1)
        assert worker is not None, "the worker was not running"
        os.kill(worker, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        end_session(proc)
    assert proc.returncode != 0
    done = checkpoint.latest(tmp_path / "w")
    assert checkpoint.damage(done) is None and int(done.name.split("_")[1]) < 6
    resumed = run(sft_ckpt, tmp_path / "w", *extra, resume=True)  # rollout.workers 1 -> 0
    skip = ("time", "per_s", "wait", "eval/")
    a, b = ({k: v for k, v in rows[-1].items() if not any(t in k for t in skip)} for rows in (ref, resumed))
    assert a.keys() == b.keys()
    for k in a:  # per-sequence sums of log w: float32 round-off of up to 12 tokens (see above)
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=12 * 4.8e-7 if k.startswith("seq_log_w/") else 1e-7), k
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "ref"))
    wb = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "w"))
    for k in wa:
        assert float((wa[k] - wb[k]).norm()) <= 1e-5 * float(wa[k].norm()), k


def _cli_args(ckpt, run_dir, *extra) -> list[str]:
    """The pipeline tests' run, as a `stablerl train` command line takes it (``config`` builds it)."""
    return [
        f"model.path={ckpt}",
        f"run_dir={run_dir}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "task.levels=[1]",
        "task.eval_size=4",
        "eval.every=100",
        "log.progress=false",
        "log.tensorboard=false",
        "log.rollouts=true",
        f"task.reward_fns=[{REWARD}]",
        "optim.lr=1e-3",
        *extra,
    ]


WORKER_RESUME = ["rollout.precision=fp32", "rollout.max_staleness=1", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def resume_runs(sft_ckpt, tmp_path_factory):
    """The uninterrupted 4-step run with no worker, and a finished 2-step run with 1 or 2 workers
    (made on first use, each once; a test resumes a copy of it)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from launch import torchrun_train

    root = tmp_path_factory.mktemp("worker_resume")
    run(sft_ckpt, root / "ref", "train.steps=4", *WORKER_RESUME)
    stopped = {}

    def stopped_run(workers: int) -> Path:
        if workers not in stopped:
            w = root / f"w{workers}"
            args = _cli_args(sft_ckpt, w, "train.steps=2", *WORKER_RESUME, f"rollout.workers={workers}")
            rc, out = torchrun_train(args, nproc=1 + workers)
            assert rc == 0, out[-3000:]
            stopped[workers] = w
        return stopped[workers]

    return root / "ref", stopped_run


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(1, 1), (1, 2), (2, 1)], ids=["same", "more", "fewer"])
def test_a_run_with_rollout_workers_resumes_with_any_number_of_them_exactly(resume_runs, tmp_path, before, after):
    """A finished 2-step run with ``before`` workers, resumed to 4 steps with ``after``: the same
    samples, metrics and weights as the uninterrupted run with none (the workers change the speed,
    never the maths; a resume's worker is handed the checkpoint, which holds no HF weights). The
    run resumed is a copy of the stopped one in another directory, as a user's moved run."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from launch import torchrun_train

    ref_dir, stopped_run = resume_runs
    w = tmp_path / "w"
    shutil.copytree(stopped_run(before), w)
    rc, out = torchrun_train(
        ["--resume", str(w), "train.steps=4", f"rollout.workers={after}"], nproc=1 + after, timeout=300
    )
    assert rc == 0, out[-3000:]
    got, ref = read_metrics(w), read_metrics(ref_dir)
    a = [json.loads(x) for x in (ref_dir / "rollouts.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (w / "rollouts.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in a] == [r["completions"] for r in b]
    assert [r["rollout_version"] for r in got[1:]] == [0, 0, 1, 2]
    tol = {f"seq_log_w/{s}": 12 * 4.8e-7 for s in ("mean", "p01", "p05", "min")}  # see above
    assert len(ref) == len(got)
    for x, y in zip(_comparable(ref), _comparable(got)):
        # the first run evaluated at its own end (step 2)
        x, y = ({k: v for k, v in r.items() if not k.startswith("eval/")} for r in (x, y))
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=tol.get(k, 1e-7)), k
    wa = checkpoint.load_model_weights(checkpoint.latest(ref_dir))
    wb = checkpoint.load_model_weights(checkpoint.latest(w))
    for k in wa:
        assert float((wa[k] - wb[k]).norm()) <= 1e-5 * float(wa[k].norm()), k


def test_lag_kl_splits_the_mismatch_into_engine_and_lag(sft_ckpt, tmp_path):
    """log.lag_kl: k1(mu || pi_old) = k1(mu || pi_v) + k1(pi_v || pi_old) on the same tokens. At
    the first steps the sampler's version is the learner's (v = s - 1): no lag; later the lag
    part is the rest, and the engine part is what an fp32 engine shows: ~0."""
    rows = run(
        sft_ckpt,
        tmp_path / "r",
        "train.steps=4",
        "rollout.max_staleness=2",
        "log.lag_kl=true",
        "rollout.precision=fp32",
        "optim.lr=1e-2",
    )
    for r in rows[1:]:
        assert r["lag/lag_kl_k1"] + r["lag/engine_kl_k1"] == pytest.approx(r["train_infer_kl_k1"], abs=1e-9)
        assert abs(r["lag/engine_kl_k1"]) < 1e-5 and r["lag/engine_kl"] < 1e-6  # fp32 engine = pi_v
    assert abs(rows[1]["lag/lag_kl_k1"]) < 1e-5  # step 1 is sampled by version 0 = pi_old
    assert rows[4]["staleness/max"] == 2 and rows[4]["train_infer_kl"] > 1e-4  # lagging two versions: a mismatch
    assert abs(rows[4]["lag/lag_kl_k1"] - rows[4]["train_infer_kl_k1"]) < 1e-5  # ... and all of it is the lag


def test_the_progress_line_shows_the_lag(sft_ckpt, tmp_path, capsys):
    run(sft_ckpt, tmp_path / "r", "train.steps=3", "rollout.max_staleness=1", "log.progress=true", "log.print_every=1")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train] step")]
    # step 0 (the evaluation before training) and step 1 (sampled by version 0 = pi_old) have no lag
    assert len(lines) == 4 and "lag" not in lines[0] + lines[1] and lines[2].endswith("lag 1")
