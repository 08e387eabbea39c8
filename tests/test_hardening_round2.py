"""The second hardening round (nothing hidden, nothing executed, nothing silently zero): each
example of the issue, as a test."""

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from stablerl import checkpoint
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.diagnostics import k3
from stablerl.generation import encode_prompt
from stablerl.loop import Trainer
from stablerl.models import build_tokenizer, default_model_config
from stablerl.preflight import check_memory, check_prompts
from stablerl.repro.runner import is_done
from stablerl.rundir import RunDir, RunLock, RunLocked, RunState
from stablerl.runlog import read_metrics
from stablerl.tasks import RewardPool, build_task

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")
TINY = [
    "batch.prompts_per_step=2",
    "batch.group_size=4",
    "rollout.max_new_tokens=12",
    "task.levels=[1]",
    "task.eval_size=8",
    "eval.every=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def config(ckpt, run_dir, *extra) -> RunConfig:
    return build_config(RunConfig, None, [f"model.path={ckpt}", f"run_dir={run_dir}", *TINY, *extra])


# ---------------------------------------------------------------------------------------------
# 1. reading a run directory never runs code; damaged checkpoints are never trained on
# ---------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save_tiny_checkpoint(run_dir: Path, step: int) -> Path:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    model.config = type("Cfg", (), {"save_pretrained": lambda self, path: None})()
    tok = type("Tok", (), {"save_pretrained": lambda self, path: None})()
    return checkpoint.save(run_dir, step, model, tok, opt, RunState(step=step), keep_last=5)


def test_a_crafted_checkpoint_metadata_is_refused_not_executed(tmp_path):
    ckpt = _save_tiny_checkpoint(tmp_path, 1)
    marker = tmp_path / "pwned"
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="refusing to load posix.system|refusing to load os.system"):
        checkpoint.load(ckpt, model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(checkpoint.UnsafeCheckpoint):
        checkpoint.load_model_weights(ckpt)
    assert not marker.exists()
    # and the resume path never even opens it: the checksum no longer matches
    assert "does not match its checksum" in checkpoint.damage(ckpt)


def test_an_intact_checkpoint_loads_through_the_restricted_reader(tmp_path):
    ckpt = _save_tiny_checkpoint(tmp_path, 1)
    assert checkpoint.damage(ckpt) is None
    weights = checkpoint.load_model_weights(ckpt)
    assert set(weights) == {"weight", "bias"}


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    good = _save_tiny_checkpoint(tmp_path, 1)
    bad = _save_tiny_checkpoint(tmp_path, 2)
    data = next((bad / "dcp").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-7])  # truncated
    found, warnings = checkpoint.latest_good(tmp_path)
    assert found == good
    assert len(warnings) == 1 and str(bad) in warnings[0] and str(good) in warnings[0]
    (bad / "state.json").write_text('{"step": 2, "fi')  # a truncated state.json names its path
    assert str(bad / "state.json") in checkpoint.damage(bad)


# ---------------------------------------------------------------------------------------------
# 4. rewards: numbers only, in a range the float32 maths survives; k3 measures small mismatches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn,value,error",
    [
        ("string_reward", 0.0, "returned a str ('0.75'), not a number"),
        ("huge", 0.0, "outside the allowed range"),
        ("overflowing", 0.0, "outside the allowed range"),
        ("not_a_number", 0.0, "outside the allowed range"),
        ("numpy_reward", 0.5, None),
        ("bool_reward", 1.0, None),
    ],
)
def test_reward_values_are_numbers_in_range(fn, value, error):
    with RewardPool([f"{FNS}:{fn}"], workers=1, timeout_s=10) as pool:
        result = pool.score([("1+1=", "a2", {"answer": "2"})])
    assert result.total == [value]
    if error is None:
        assert result.stats.failures == 0
    else:
        assert result.stats.errors == 1 and fn in result.stats.first_error and error in result.stats.first_error


def test_a_weighted_total_out_of_range_is_an_error_not_an_overflow():
    with RewardPool([f"{FNS}:numpy_reward"], weights=[1e7], workers=1, timeout_s=10) as pool:
        result = pool.score([("1+1=", "2", {"answer": "2"})])
    assert result.total == [0.0] and result.stats.errors == 1 and "reward_weights" in result.stats.first_error


def test_k3_measures_small_log_ratios_instead_of_rounding_them_away():
    x = torch.tensor([1e-4, -3e-5, 2e-3], dtype=torch.float32)
    exact = [float(v) ** 2 / 2 + float(v) ** 3 / 6 for v in x.double()]  # the series to third order
    got = k3(x)
    for g, e in zip(got.tolist(), exact):
        assert g == pytest.approx(e, rel=1e-4)
    assert float((x.exp() - 1 - x)[1]) != pytest.approx(exact[1], rel=0.1)  # what float32 used to give


# ---------------------------------------------------------------------------------------------
# 2. one bad row cannot take the machine down
# ---------------------------------------------------------------------------------------------
def _dataset(tmp_path: Path, long_row: int | None, n: int = 20) -> Path:
    path = tmp_path / "data.jsonl"
    rows = [{"question": "x" * (10_000_000 if i == long_row else 5), "answer": "1"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_over_long_prompt_is_named_before_any_work(tmp_path):
    data = _dataset(tmp_path, long_row=7)
    cfg = build_config(RunConfig, None, ["task.name=dataset", f"task.dataset={data}", "task.eval_size=2"])
    tok = build_tokenizer()
    with pytest.raises(ValueError, match=r"row 8: over .* characters.*raise model.max_positions.*long_prompts=skip"):
        check_prompts(build_task(cfg.task), [], tok, cfg, default_model_config(tok))
    cfg.task.long_prompts = "skip"
    task, notes = build_task(cfg.task), []
    longest = check_prompts(task, [], tok, cfg, default_model_config(tok), log=notes.append)
    assert len(task.train_problems()) + len(task.eval_problems()) == 19 and "dropped 1 training" in notes[0]
    assert longest == 1 + len("x" * 5 + "\n")  # BOS + the longest kept prompt


def test_the_model_context_is_the_hard_limit(tmp_path):
    tok = build_tokenizer()
    cfg = build_config(
        RunConfig, None, ["task.max_prompt_tokens=100000", "rollout.max_new_tokens=250", "task.levels=[3]"]
    )
    with pytest.raises(ValueError, match=r"model's context \(256 tokens\) less rollout.max_new_tokens \(250\)"):
        check_prompts(build_task(cfg.task), [], tok, cfg, default_model_config(tok))


def test_eval_refuses_prompts_the_context_cannot_hold(sft_ckpt, capsys):
    # what a run of the same settings refuses, `stablerl eval` refuses too, before any sampling
    # (it used to generate past the model's declared context)
    from stablerl.cli import main

    rc = main(["eval", str(sft_ckpt), "task.levels=[3]", "task.eval_size=4", "rollout.max_new_tokens=250"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "model's context (256 tokens) less rollout.max_new_tokens (250)" in err and "model.max_positions" in err


def test_a_huge_rollout_batch_fails_with_a_memory_estimate():
    tok = build_tokenizer()
    cfg = build_config(RunConfig, None, ["batch.prompts_per_step=200000"])
    with pytest.raises(ValueError, match=r"one step would need about .* GiB .*batch.prompts_per_step=200000"):
        check_memory(cfg, default_model_config(tok), 1, 20)
    check_memory(build_config(RunConfig, None, []), default_model_config(tok), 1, 20)  # the default fits


def test_a_trainer_on_a_10mb_row_stops_at_start_up_and_leaves_nothing(sft_ckpt, tmp_path):
    data = _dataset(tmp_path, long_row=3)
    cfg = config(
        sft_ckpt,
        tmp_path / "run",
        "task.name=dataset",
        f"task.dataset={data}",
        "task.eval_size=2",
        "task.reward_fns=[" + FNS + ":exact]",
    )
    with pytest.raises(ValueError, match="row 4"):
        Trainer(cfg, tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 3. the first error is the one shown; failed runs never block a re-run; Ctrl-C
# ---------------------------------------------------------------------------------------------
def test_a_tokenizer_without_bos_encodes_the_prompt_alone():
    tok = build_tokenizer()
    tok.bos_token = None
    assert tok.bos_token_id is None
    assert encode_prompt(tok, "1+2=") == tok("1+2=", add_special_tokens=False).input_ids


def test_the_first_error_survives_a_failing_summary_and_the_run_can_be_rerun(sft_ckpt, tmp_path, monkeypatch):
    import stablerl.loop as loop

    def boom(*_a, **_k):
        raise RuntimeError("the real error")

    monkeypatch.setattr(loop.Learner, "update", boom)
    monkeypatch.setattr(loop, "write_summary", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(RuntimeError, match="the real error"):
        Trainer(config(sft_ckpt, tmp_path / "r", "train.steps=2"), tmp_path / "r", log=lambda *_: None).run()
    assert not RunDir(tmp_path / "r").is_run()  # nothing completed: nothing left that refuses a re-run
    monkeypatch.undo()
    Trainer(config(sft_ckpt, tmp_path / "r", "train.steps=1"), tmp_path / "r", log=lambda *_: None).run()
    assert read_metrics(tmp_path / "r")[-1]["step"] == 1


def test_ctrl_c_writes_an_interrupted_summary_that_repro_does_not_count_as_done(sft_ckpt, tmp_path, monkeypatch):
    import stablerl.loop as loop

    real = loop.Learner.update

    def interrupt_at_2(self, step, batch, first_row):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step, batch, first_row)

    monkeypatch.setattr(loop.Learner, "update", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(sft_ckpt, tmp_path / "r", "train.steps=3"), tmp_path / "r", log=lambda *_: None).run()
    summary = json.loads(RunDir(tmp_path / "r").summary.read_text())
    assert summary["interrupted"] is True and summary["steps"] == 1
    assert not is_done(tmp_path / "r")


# ---------------------------------------------------------------------------------------------
# 6. the run lock: only its holder removes it
# ---------------------------------------------------------------------------------------------
def test_the_lock_loser_leaves_the_winners_lock_in_place(sft_ckpt, tmp_path):
    run_dir = tmp_path / "r"
    winner = RunLock(run_dir).acquire()
    inode = os.stat(run_dir / ".lock").st_ino
    with pytest.raises(RunLocked):
        Trainer(config(sft_ckpt, run_dir), run_dir, log=lambda *_: None)
    assert os.stat(run_dir / ".lock").st_ino == inode
    with pytest.raises(RunLocked):  # still held
        RunLock(run_dir).acquire()
    winner.release(remove=True)
    assert not (run_dir / ".lock").exists()
    RunLock(run_dir).acquire().release()


# ---------------------------------------------------------------------------------------------
# 5. isolation: user modules are imported in workers only; a stuck call's process tree dies
# ---------------------------------------------------------------------------------------------
EFFECTS = Path(__file__).parent / "data" / "import_effects"


def test_reward_modules_are_imported_in_a_worker_never_in_the_trainer(tmp_path, monkeypatch):
    marker = tmp_path / "pids"
    monkeypatch.setenv("STABLERL_TEST_MARKER", str(marker))
    with RewardPool([f"{EFFECTS / 'marks_at_import.py'}:reward"], workers=1, timeout_s=10) as pool:
        assert pool.score([("p", "c", {})]).total == [1.0]
    assert "STABLERL_TEST_IMPORTED_IN_TRAINER" not in os.environ
    assert str(os.getpid()) not in marker.read_text().split()


@pytest.mark.parametrize(
    "module,match",
    [
        ("exits_at_import.py", r"importing it failed: SystemExit: 4"),
        ("interrupts_at_import.py", r"importing it failed: KeyboardInterrupt"),
    ],
)
def test_import_time_exits_and_interrupts_are_one_line_errors(module, match):
    with pytest.raises(ValueError, match=match):
        RewardPool([f"{EFFECTS / module}:reward"], workers=1)


def test_an_endless_loop_at_import_times_out(monkeypatch):
    import stablerl.tasks.reward as reward

    monkeypatch.setattr(reward, "IMPORT_TIMEOUT_S", 1.0)
    with pytest.raises(ValueError, match=r"did not finish within 1 s"):
        RewardPool([f"{EFFECTS / 'loops_at_import.py'}:reward"], workers=1, timeout_s=0.5)


def test_a_function_that_cannot_take_prompt_and_completion_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLERL_TEST_MARKER", str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"must accept \(prompt, completion, \*\*fields\)"):
        RewardPool([f"{EFFECTS / 'marks_at_import.py'}:wrong_signature"], workers=1)


def test_a_non_python_file_is_a_one_line_error(capsys):
    from stablerl.cli import main

    rc = main(["train", "task.reward_fns=[/etc/passwd:x]", "run_dir=/tmp/never-made"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not a Python file" in err and "Traceback" not in err


def test_a_timed_out_calls_children_die_with_it(tmp_path, monkeypatch):
    marker = tmp_path / "child_pid"
    monkeypatch.setenv("STABLERL_TEST_MARKER", str(marker))
    with RewardPool([f"{FNS}:spawns_and_hangs"], workers=1, timeout_s=2) as pool:
        result = pool.score([("p", "c", {})])
    assert result.stats.timeouts == 1
    pid = int(marker.read_text())
    deadline = __import__("time").monotonic() + 5
    while Path(f"/proc/{pid}").exists() and __import__("time").monotonic() < deadline:
        state = (
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if Path(f"/proc/{pid}/stat").exists()
            else "X"
        )
        if state == "Z":  # reaped by nobody yet, but dead
            break
        __import__("time").sleep(0.1)
    alive = (
        Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    )
    assert not alive, "the grandchild in its own session outlived the timed-out call"


# ---------------------------------------------------------------------------------------------
# 8. what a TRL / verl user reaches for first
# ---------------------------------------------------------------------------------------------
def test_a_reward_function_failing_on_every_first_step_call_stops_the_run(sft_ckpt, tmp_path):
    from stablerl.loop import TrainingAborted

    with pytest.raises(TrainingAborted, match=r"boom_always failed on every response of the first step"):
        Trainer(
            config(sft_ckpt, tmp_path / "r", "train.steps=2", f"task.reward_fns=[{FNS}:boom_always]"),
            tmp_path / "r",
            log=lambda *_: None,
        ).run()


def test_cli_version_print_config_and_list_index_overrides(capsys, tmp_path):
    import yaml

    from stablerl import __version__
    from stablerl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stablerl {__version__}"
    assert (
        main(
            [
                "train",
                "--print-config",
                f"run_dir={tmp_path / 'r'}",
                "loss.eps_high=0.3",
                "eval.sets=[{name: t, dataset: x.jsonl}]",
                "eval.sets.0.samples=7",
                "eval.sets.0.prompt_template=Q: {question}",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"]["eps_high"] == 0.3 and printed["eval"]["sets"][0]["samples"] == 7
    assert printed["eval"]["sets"][0]["prompt_template"] == "Q: {question}"
    assert not (tmp_path / "r").exists()  # nothing ran
    with pytest.raises(ValueError, match=r"eval.sets has 1 entries .* '3' is not one of them"):
        build_config(RunConfig, None, ["eval.sets=[{name: t, dataset: x}]", "eval.sets.3.samples=1"])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules_by_hand(schedule):
    from stablerl.config import OptimConfig
    from stablerl.learner import learning_rate

    optim = OptimConfig(lr=1.0, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1)
    lrs = [learning_rate(s, optim, total_steps=12) for s in range(12)]
    assert lrs[:2] == [0.5, 1.0]  # warm-up: (s + 1) / 2
    expected = {
        "constant": [1.0] * 10,
        "linear": [0.1 + 0.9 * (1 - k / 9) for k in range(10)],
        "cosine": [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(10)],
    }[schedule]
    assert lrs[2:] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_python_api_trains_from_a_dict_and_resumes(sft_ckpt, tmp_path):
    import stablerl

    cfg = {
        "model": {"path": str(sft_ckpt)},
        "run_dir": str(tmp_path / "api"),
        "train": {"steps": 1},
        "batch": {"prompts_per_step": 2, "group_size": 4},
        "rollout": {"max_new_tokens": 12},
        "task": {"levels": [1], "eval_size": 4},
        "log": {"progress": False, "tensorboard": False},
    }
    summary = stablerl.train(cfg, log=lambda *_: None)
    assert summary["steps"] == 1 and summary["run_dir"] == str(tmp_path / "api") and "sampled_after" in summary
    summary = stablerl.train(resume=tmp_path / "api", overrides=["train.steps=2"], log=lambda *_: None)
    assert summary["steps"] == 2
    with pytest.raises(ValueError, match=r"train.steps"):
        stablerl.train({"train": {"steps": 0}})


def test_console_that_is_not_a_terminal_gets_plain_whole_lines(tmp_path, capsys):
    from stablerl.config import LogConfig
    from stablerl.runlog import RunLogger

    logger = RunLogger(
        tmp_path, LogConfig(tensorboard=False, progress=True, print_every=2), total_steps=5, start_step=0
    )
    for step in range(1, 6):
        logger.log_step(step, {"reward_mean": 0.5, "entropy": 0.1})
    logger.print("[yellow]" + "x" * 200 + "[/yellow]")
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out if line.startswith("[train]")] == ["2/5", "4/5", "5/5"]
    assert "reward 0.50" in out[0] and "x" * 200 in out  # markup stripped, nothing wrapped or cut


def test_an_exported_tokenizer_encodes_prompts_as_training_did(sft_ckpt, tmp_path):
    from transformers import AutoTokenizer

    from stablerl.checkpoint import save_model_dir
    from stablerl.models import load_policy

    model, tok = load_policy(sft_ckpt)
    save_model_dir(tmp_path / "export", model, tok)
    plain = AutoTokenizer.from_pretrained(tmp_path / "export")  # what a user of the export loads
    for text in ("12+34=", "7+8+9="):
        assert plain(text).input_ids == encode_prompt(tok, text)
    fresh = build_tokenizer()
    assert fresh("1+2=").input_ids == encode_prompt(fresh, "1+2=")
    assert fresh.decode(fresh("1+2=").input_ids, skip_special_tokens=True) == "1+2="


def test_plot_labels_are_unique_and_say_what_they_show(tmp_path):
    from stablerl.plot import plot_runs, reward_is_accuracy, run_labels

    assert run_labels([tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"]) == ["a/seed0", "b/seed0"]
    for d in ("a/seed0", "b/seed0"):
        run = RunDir(tmp_path / d)
        run.path.mkdir(parents=True)
        run.config.write_text(json.dumps({"task": {"reward_fns": ["x.py:f"], "reward_weights": [2.0]}}))
        run.metrics.write_text(
            "".join(json.dumps({"step": s, "reward_mean": 0.5, "eval/sampled_acc": 1.5}) + "\n" for s in range(3))
        )
    assert not reward_is_accuracy(tmp_path / "a" / "seed0")
    out = plot_runs([tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"], tmp_path / "c.png")
    assert out.stat().st_size > 5000


def test_the_readme_loss_snippet_runs_as_pasted():
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "policy_loss" in b)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    assert namespace["logp"].grad is not None and torch.isfinite(namespace["logp"].grad).all()


@pytest.mark.parametrize(
    "estimator,grad",
    [
        ("k1", lambda d: 1.0),
        ("k2", lambda d: d),
        ("k3", lambda d: 1 - math.exp(-d)),  # d/dlogp [e^{-d} - 1 + d], d = logp - ref
    ],
)
def test_kl_penalty_gradient_by_hand(estimator, grad):
    from stablerl.config import LossConfig
    from stablerl.objectives import policy_loss

    d = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    ref = -torch.ones(1, 3, dtype=torch.float64)
    logp = (ref + d).requires_grad_(True)
    cfg = LossConfig(kl_beta=0.5, kl_estimator=estimator, is_mode="none")
    adv = torch.zeros(1, dtype=torch.float64)  # no policy-gradient term: only the penalty
    loss, m = policy_loss(
        logp, logp.detach(), logp.detach(), adv, torch.ones(1, 3, dtype=torch.bool), cfg, normalizer=3.0, ref_logp=ref
    )
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.5 * grad(float(x)) / 3.0 for x in d[0]])
    assert m["kl_ref"] > 0 if estimator != "k1" else True
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(1, 3, dtype=torch.bool), cfg)


def test_kl_penalty_in_training_starts_at_zero_and_survives_a_resume(sft_ckpt, tmp_path):
    from stablerl.runlog import read_metrics

    run = tmp_path / "kl"
    graded = f"task.reward_fns=[{FNS}:digit_fraction]"  # non-zero advantages at every step: the policy moves
    Trainer(
        config(sft_ckpt, run, "train.steps=2", "loss.kl_beta=0.1", "optim.lr=1e-3", graded), run, log=lambda *_: None
    ).run()
    rows = read_metrics(run)
    assert rows[1]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert rows[2]["kl_ref"] > 1e-6  # it moved
    Trainer(
        config(sft_ckpt, run, "train.steps=3", "loss.kl_beta=0.1", "optim.lr=1e-3", graded),
        run,
        resume=True,
        log=lambda *_: None,
    ).run()
    assert read_metrics(run)[3]["kl_ref"] > 0


def test_trl_reward_signature_beside_stablerls_own():
    items = [("p1", "1", {"answer": "1"}), ("p2", "2", {"answer": "1"}), ("p3", "3", {"answer": None})]
    with RewardPool([f"{FNS}:trl_length", f"{FNS}:numpy_reward"], workers=2, timeout_s=10) as pool:
        assert pool.batched == [True, False]
        result = pool.score(items)
    assert result.per_fn == {"trl_length": [1.0, 0.0, 0.0], "numpy_reward": [0.5, 0.5, 0.5]}
    assert result.stats.failures == 0  # None is TRL's "does not apply": 0, not an error
    with RewardPool([f"{FNS}:trl_bad_item"], workers=1, timeout_s=10) as pool:
        result = pool.score(items)
    assert result.total == [1.0, 0.0, 0.0] and result.stats.errors == 2 and "not a number" in result.stats.first_error
    with RewardPool([f"{FNS}:trl_wrong_length"], workers=1, timeout_s=10) as pool:
        result = pool.score(items)
    assert result.stats.errors == 3 and "not a list of 3 rewards" in result.stats.first_error


def test_trl_dataset_formats_and_gsm8k_answers(tmp_path):
    from stablerl.generation import encode_problem
    from stablerl.tasks import Columns, load_problems

    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n")
    p = load_problems(str(plain), Columns())[0]
    assert p.prompt == "What is 2+2?\n" and p.answer == "4" and not p.messages

    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    chat.write_text(json.dumps({"prompt": turns, "answer": "Natalia sold 48/2 = 24 clips.\\n#### 1,072"}) + "\n")
    p = load_problems(str(chat), Columns())[0]
    assert p.answer == "1072" and p.prompt == "What is 2+2?" and [m["role"] for m in p.messages] == ["system", "user"]
    tok = build_tokenizer()
    text = tok.decode(encode_problem(tok, p, RunConfig().task))
    assert text == "<bos>[system] Be brief.\n[user] What is 2+2?\n[assistant] "
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user"}], "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1.*chat turns"):
        load_problems(str(bad), Columns())


def test_hub_ids_are_accepted_and_offline_says_how_to_download(monkeypatch, capsys):
    # this machine has no hub: fail fast, as offline would (the libraries read the variable at import)
    import datasets
    import huggingface_hub

    from stablerl.cli import main
    from stablerl.models import is_hub_id, load_policy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert is_hub_id("Qwen/Qwen3-0.6B") and not is_hub_id("./Qwen/x") and not is_hub_id("a/b/c")
    with pytest.raises(ValueError, match=r"hf download stablerl-test/no-such-model --local-dir DIR"):
        load_policy("stablerl-test/no-such-model")
    rc = main(["eval", "stablerl-test/no-such-model"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=r"hf download stablerl-test/no-such-data --repo-type dataset"):
        from stablerl.tasks import Columns, load_problems

        load_problems("stablerl-test/no-such-data", Columns())


def test_an_eval_set_does_not_inherit_the_tasks_solution_column(tmp_path):
    from stablerl.evaluation import EvalSet

    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")  # no solution column
    cfg = build_config(RunConfig, None, ["task.columns.solution=solution", f"eval.sets=[{{name: e, dataset: {data}}}]"])
    with RewardPool([f"{FNS}:exact"], workers=1) as pool:
        assert len(EvalSet(cfg.eval.sets[0], cfg.task, pool).problems) == 1


def test_what_a_reward_function_writes_into_the_run_dir_does_not_make_it_unresumable(sft_ckpt, tmp_path, capsys):
    from stablerl.cli import main

    run = tmp_path / "r"
    Trainer(config(sft_ckpt, run, "train.steps=2"), run, log=lambda *_: None).run()
    files = RunDir(run)
    lines = files.metrics.read_text().splitlines()
    files.metrics.write_text("\n".join(["garbage"] + lines[1:]) + "\n")  # an early line damaged
    Trainer(config(sft_ckpt, run, "train.steps=3"), run, resume=True, log=lambda *_: None).run()  # trains on
    files.config.write_text("{not json")
    rc = main(["train", "--resume", str(run), "train.steps=4"])
    err = capsys.readouterr().err
    copy = checkpoint.latest(run) / "run_config.json"
    assert rc == 2 and str(copy) in err and "copy the intact copy" in err
    files.config.write_text(copy.read_text())  # what the message says to do
    Trainer(config(sft_ckpt, run, "train.steps=4"), run, resume=True, log=lambda *_: None).run()
    assert json.loads(files.summary.read_text())["steps"] == 4
