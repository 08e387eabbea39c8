"""Data-parallel training under torchrun with 2 gloo ranks, checked against a 1-rank run.

The rollout engine is fp32 here: per-response sampling is seeded by the global response index,
so the 2-rank run samples the same tokens as the 1-rank run as long as the engine's forward is
not batch-variant (a rank's batch is half as wide). fp32 CPU kernels are close enough that no
sampled token differs; bf16 kernels round differently at different batch widths, which can flip
a near-tie. Every run uses a graded reward (tests/data/reward_fns.py:digit_fraction), so every
step has non-zero advantages and a real gradient.

torchrun runs with --standalone (a free port of its own), in its own session, under a timeout
that kills the whole process group: no port clashes, no orphaned ranks.
"""

import json
from pathlib import Path

import pytest
from launch import torchrun_train

from stablerl import checkpoint
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer
from stablerl.rundir import RunDir
from stablerl.runlog import read_metrics

pytestmark = pytest.mark.slow

REWARD = str(Path(__file__).parent / "data" / "reward_fns.py") + ":digit_fraction"
TIMING = ("time", "per_s")


def base_args(ckpt, run_dir, *extra):
    return [
        f"model.path={ckpt}",
        f"run_dir={run_dir}",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=12",
        "rollout.precision=fp32",
        "task.levels=[1]",
        "task.eval_size=6",
        "eval.every=2",
        "eval.samples=2",
        "log.progress=false",
        "log.tensorboard=false",
        "log.rollouts=true",
        "train.steps=3",
        f"task.reward_fns=[{REWARD}]",
        "task.reward_workers=1",
        "optim.lr=1e-4",
        *extra,
    ]


def torchrun(args, *, resume=None, timeout=240):
    return torchrun_train([*(["--resume", str(resume)] if resume else []), *args], timeout=timeout)


def one_rank(ckpt, run_dir, *extra, resume=False, steps=None):
    args = base_args(ckpt, run_dir, *extra) + ([f"train.steps={steps}"] if steps else [])
    cfg = build_config(RunConfig, None, args)
    Trainer(cfg, run_dir, resume=resume, log=lambda *_: None).run()


def rollouts(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "rollouts.jsonl").read_text().splitlines()]


# the round-off scale of metrics that are near-zero means of differences of O(1) float32 log-probs
# (|log p| ~ 1-5, float32 epsilon 1.2e-7): k1 KL = mean(log mu - log pi) is first order in those
# differences, so its round-off is ~1e-8-1e-7 absolute; k3 and the first-order gap are second order.
# The per-sequence sums of log w are not means: they add up to 12 differences (rollout.max_new_tokens
# =12), each carrying up to ~one float32 ulp of its log-prob (4.8e-7 at |log p| = 4-8) when pi_old is
# computed over a different batch composition (one rank's half vs the whole batch)
ABS_TOL = {"train_infer_kl_k1": 1e-7, **{f"seq_log_w/{s}": 12 * 4.8e-7 for s in ("mean", "p01", "p05", "min")}}


def assert_metrics_close(a_rows, b_rows, rel=1e-5):
    """Every metric within ``rel`` relative — or an absolute round-off bound (1e-8, or
    ``ABS_TOL``): some are differences of O(1) quantities built from float32 log-probs
    (first_order_gap, the KLs near 0), whose round-off is absolute (a rank's batch is narrower,
    so the kernels sum in another order)."""
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        keys = {k for k, v in a.items() if isinstance(v, (int, float)) and not any(t in k for t in TIMING)}
        assert keys == {k for k, v in b.items() if isinstance(v, (int, float)) and not any(t in k for t in TIMING)}
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=ABS_TOL.get(k, 1e-8) if rel else 0), (a["step"], k)


def assert_weights_close(a, b, rel=1e-5):
    """Per tensor, ||a - b|| <= rel * ||a|| (elementwise ratios mean nothing for entries near 0,
    where Adam's normalization turns round-off into steps of size ~lr)."""
    assert a.keys() == b.keys()
    for k in a:
        assert float((a[k] - b[k]).norm()) <= rel * float(a[k].norm()), k


@pytest.fixture(scope="module")
def ckpt(sft_ckpt):
    return sft_ckpt


@pytest.fixture(scope="module")
def two_rank_run(ckpt, tmp_path_factory):
    """The base configuration on 2 ranks (read only by its users): the on-policy case below and
    the uninterrupted run the resume is compared with."""
    run_dir = tmp_path_factory.mktemp("two_rank") / "run"
    rc, out = torchrun(base_args(ckpt, run_dir))
    assert rc == 0, out[-3000:]
    return run_dir


@pytest.mark.parametrize(
    "mode",
    [
        [],
        ["batch.minibatches_per_step=2", "train.routing_replay=R2"],
        ["batch.minibatches_per_step=2", "train.routing_replay=R3", "batch.micro_batch_size=3"],
        # M2PO's mask is decided over the whole mini-batch, on every rank alike
        [
            "batch.minibatches_per_step=2",
            "batch.micro_batch_size=3",
            "loss.m2_threshold=1e-8",
            "loss.opsm_delta=0.0001",
            "loss.reject=sequence_geo",
        ],
        # memory settings: FSDP with checkpointed layers, packed micro-batches by
        # tokens (ranks cut differently; every rank runs the most any rank needs),
        # and the KL reference, which like the policy only rank 0 reads
        [
            "batch.minibatches_per_step=2",
            "train.routing_replay=R2",
            "train.activation_checkpointing=true",
            "batch.max_tokens_per_micro_batch=40",
            "batch.packing=true",
            "loss.kl_beta=0.1",
        ],
    ],
    ids=["on-policy", "N2-R2", "N2-R3-micro3", "N2-corrections-micro3", "N2-R2-memory"],
)
def test_two_ranks_equal_one_rank(ckpt, tmp_path, mode, request):
    one_rank(ckpt, tmp_path / "k1", *mode)
    k2 = request.getfixturevalue("two_rank_run") if not mode else tmp_path / "k2"
    if mode:
        rc, out = torchrun(base_args(ckpt, k2, *mode))
        assert rc == 0, out[-3000:]
    a, b = rollouts(tmp_path / "k1"), rollouts(k2)
    assert [r["completions"] for r in a] == [r["completions"] for r in b]  # the same sampled tokens
    assert [r["rewards"] for r in a] == [r["rewards"] for r in b]
    assert any(len(set(r["rewards"])) > 1 for r in a)  # a real learning signal
    ma, mb = read_metrics(tmp_path / "k1"), read_metrics(k2)
    assert_metrics_close(ma, mb)
    assert all(m["grad_norm"] > 0 for m in ma[1:])
    if any("m2_threshold" in x for x in mode):  # the corrections did remove something
        assert any(m["masked/m2"] > 0 for m in ma[1:]) and any(m["masked/opsm"] > 0 for m in ma[1:])
    wa = checkpoint.load_model_weights(checkpoint.latest(tmp_path / "k1"))
    wb = checkpoint.load_model_weights(checkpoint.latest(k2))
    assert_weights_close(wa, wb)
    # and the agreement is not trivial: training moved the weights far more than the runs differ
    from transformers import AutoModelForCausalLM

    w0 = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    moved = sum(float((wa[k] - w0[k]).norm()) for k in wa)
    gap = sum(float((wa[k] - wb[k]).norm()) for k in wa)
    assert moved > 1e-3 and gap < 1e-3 * moved


def test_two_rank_resume_and_export(ckpt, two_rank_run, tmp_path):
    full, cut = two_rank_run, tmp_path / "cut"
    rc, out = torchrun(base_args(ckpt, cut, "train.steps=2"))
    assert rc == 0, out[-3000:]
    # a kill during step 3: a half-written metrics line and a half-written checkpoint directory
    with (cut / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward_me')
    (cut / "checkpoints" / "step_000003.tmp").mkdir()
    rc, out = torchrun(["train.steps=3"], resume=cut)
    assert rc == 0, out[-3000:]
    assert_metrics_close(read_metrics(full), read_metrics(cut), rel=0)  # the same run, exactly
    wf = checkpoint.load_model_weights(checkpoint.latest(full))
    assert_weights_close(wf, checkpoint.load_model_weights(checkpoint.latest(cut)), rel=0)

    # the HF export of a 2-rank run loads with from_pretrained and equals the gathered weights
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(RunDir(full).export(3)).state_dict()
    assert_weights_close(wf, {k: exported[k] for k in wf}, rel=0)

    # the 2-rank checkpoint of step 2 resumed on 1 rank continues with the same maths (DCP reshards)
    (cut / "checkpoints" / "step_000003").rename(cut / "checkpoints" / "step_000003.tmp")
    one_rank(ckpt, cut, resume=True, steps=3)
    assert_metrics_close(read_metrics(full), read_metrics(cut))
    assert_weights_close(wf, checkpoint.load_model_weights(checkpoint.latest(cut)))


def test_rank_0s_cold_start_runs_outside_the_collective_timeout(tmp_path):
    """Rank 0 trains the cold start (~15 s here) while rank 1 waits; distributed.timeout_s is 6 s.
    The wait is on a group of its own (distributed.broadcast_after_long_work), so nobody times out and the SFT is
    not lost."""
    tiny = [
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.expert_size=32",
        "sft.steps=1500",
        "sft.batch_size=8",
        f"sft.output_dir={tmp_path / 'sft'}",
        "distributed.timeout_s=6",
    ]
    args = [a for a in base_args("unused", tmp_path / "run", "train.steps=1") if not a.startswith("model.path")]
    rc, out = torchrun([*args, *tiny], timeout=300)
    assert rc == 0, out[-3000:]
    assert (tmp_path / "sft" / "config.json").is_file() and read_metrics(tmp_path / "run")[-1]["step"] == 1


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie waiting for its parent has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stopped_rank_ends_the_run_within_the_timeout_naming_it(ckpt, tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0's next collective times out after distributed.timeout_s (10 s),
    gloo's monitored barrier names rank 1, rank 0 ends with one message while rank 1 is still
    stopped, and the last checkpoint stays resumable. Rank 1 is then continued so that torchrun's
    teardown (its SIGTERM, which a stopped process cannot act on, then ~30 s of grace) ends it at
    once. No orphans: the launcher's whole session is killed at the end."""
    import os
    import signal
    import threading
    import time

    from launch import end_session, rank_pid, torchrun_start

    run_dir = tmp_path / "run"
    proc = torchrun_start(base_args(ckpt, run_dir, "train.steps=400", "eval.every=1000", "distributed.timeout_s=10"))
    lines, said = [], {}

    def read() -> None:  # as it comes: when does the run say what happened?
        for line in proc.stdout:
            lines.append(line)
            if "said" not in said and "collective did not complete" in line:
                said["said"] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.latest(run_dir) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert checkpoint.latest(run_dir) is not None, "the run never checkpointed"
        leader, victim = rank_pid(proc.pid, 0), rank_pid(proc.pid, 1)
        assert leader is not None and victim is not None
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        while running(leader) and time.monotonic() < t0 + 60:
            time.sleep(0.2)
        leader_gone = time.monotonic() - t0
        os.kill(victim, signal.SIGCONT)
        proc.wait(timeout=60)
        reader.join(30)
    finally:
        end_session(proc)
    out = "".join(lines)
    assert proc.returncode != 0
    said_line = next(
        (line for line in lines if "collective did not complete within distributed.timeout_s=10" in line), out[-3000:]
    )
    assert "Ranks 1 failed to pass monitoredBarrier" in said_line, said_line  # the stopped rank, named
    # the timeout, then the 5 s barrier that names the rank (plus the step in flight on a loaded machine)
    assert "said" in said and said["said"] - t0 < 10 + 5 + 10, said
    # rank 0 ends by itself, without waiting for the stopped rank or for torchrun
    assert leader_gone < said["said"] - t0 + 15, leader_gone
    assert checkpoint.damage(checkpoint.latest(run_dir)) is None


def test_batch_that_does_not_divide_fails_before_any_work(ckpt, tmp_path):
    rc, out = torchrun(base_args(ckpt, tmp_path / "odd", "batch.prompts_per_step=3"), timeout=120)
    assert rc != 0
    assert "batch.prompts_per_step=3 does not divide by the 2 ranks" in out
    assert "rank0]: Traceback" not in out and "rank1]: Traceback" not in out  # a clear line, no traceback
    assert not (tmp_path / "odd").exists()
