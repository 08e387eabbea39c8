"""The reward pool: verifiers in worker processes that cannot zero, stall or kill a run.

Each failure mode is a real misbehaving function (tests/data/reward_fns.py) run through the
same pool the trainer and `stablerl eval` use.
"""

import json
import os
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from tinyrun import config, train

from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.evaluation import evaluate
from stablerl.loop import Trainer, TrainingAborted
from stablerl.models import build_tokenizer
from stablerl.rollout import RolloutBatch
from stablerl.runlog import read_metrics
from stablerl.tasks import Columns, DatasetTask, RewardPool, build_task, reward_pool

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")
SAMPLE = str(files("stablerl.tasks") / "data" / "sample_math.jsonl")


def fn(name):
    return f"{FNS}:{name}"


def items(*completions, answer="1"):
    return [("p", c, {"answer": answer}) for c in completions]


def test_math_verify_through_the_pool_scores_correct_answers_one():
    """The regression: math-verify's signal.alarm failed in the old worker *thread*, so every
    dataset (math-verify) reward was 0. In the pool's worker processes it runs in a main thread."""
    task = DatasetTask(SAMPLE, columns=Columns(solution="solution"), eval_size=4)
    problems = task.eval_problems() + [task.train_problem(i) for i in range(8)]
    with RewardPool(task.reward_fns, workers=2) as pool:
        right = pool.score([(p.prompt, p.solution, p.reward_fields()) for p in problems])
        wrong = pool.score([(p.prompt, "The answer is \\boxed{123456}", p.reward_fields()) for p in problems])
    assert right.total == [1.0] * len(problems) and right.stats.failures == 0
    assert wrong.total == [0.0] * len(problems) and wrong.stats.failures == 0
    with RewardPool([fn("uses_alarm")], workers=1) as pool:
        assert pool.score(items("x")).total == [1.0]


def test_evaluate_path_reports_accuracy_of_correct_answers(tmp_path):
    """`stablerl eval`'s path (loop.evaluate) on the shipped sample file: an engine whose answers
    are the teacher solutions scores 100%, and reward failures are reported (0 here)."""
    tok = build_tokenizer()
    cfg = build_config(
        RunConfig,
        None,
        [
            f"task.dataset={SAMPLE}",
            "task.name=dataset",
            "task.eval_size=4",
            "task.columns.solution=solution",
            "eval.samples=2",
        ],
    )
    task = build_task(cfg.task)
    by_prompt = {tuple(tok(p.prompt, add_special_tokens=False).input_ids): p.solution for p in task.eval_problems()}

    class TeacherEngine:  # answers every prompt with its teacher solution
        def generate(self, prompts, sampling, seeds=None, capture_routes=False):
            answers = [
                tok(by_prompt[tuple(p[1:])], add_special_tokens=False).input_ids + [tok.eos_token_id] for p in prompts
            ]
            R, P = max(map(len, answers)), max(map(len, prompts))
            ids = torch.full((len(prompts), P + R), tok.pad_token_id)
            mask = torch.zeros(len(prompts), R, dtype=torch.bool)
            for i, (p, a) in enumerate(zip(prompts, answers)):
                ids[i, P - len(p) : P] = torch.tensor(p)
                ids[i, P : P + len(a)] = torch.tensor(a)
                mask[i, : len(a)] = True
            att = torch.cat([(ids[:, :P] != tok.pad_token_id).long(), mask.long()], 1)
            return RolloutBatch(ids, att, P, mask, torch.zeros(len(prompts), R), mask[:, -1] | True, 0)

    with reward_pool(task, cfg.task) as pool:
        out = evaluate(TeacherEngine(), tok, task, pool, cfg, lambda *p: 0)
    assert out["eval/greedy_acc"] == 1.0 and out["eval/sampled_acc"] == 1.0
    assert out["eval/reward_failures"] == 0


def test_each_failure_gives_zero_is_counted_and_named_and_the_pool_goes_on():
    cases = [
        ("boom", "errors", "RuntimeError: verifier crashed"),
        ("exits", "errors", "SystemExit: 3"),
        ("dies", "crashes", "worker died"),
        ("hog", "errors", "MemoryError"),
        ("hang", "timeouts", "still running after 1 s"),
    ]
    trigger = {"boom": "boom", "exits": "exit", "dies": "die", "hog": "hog", "hang": "hang"}
    for name, kind, detail in cases:
        with RewardPool([fn(name)], workers=2, timeout_s=1.0, memory_mb=1024) as pool:
            t0 = time.monotonic()
            result = pool.score(items("fine", trigger[name], "fine", trigger[name], "fine"))
            assert time.monotonic() - t0 < 10, name
            assert result.total == [1.0, 0.0, 1.0, 0.0, 1.0], name
            assert getattr(result.stats, kind) == 2 and result.stats.failures == 2, name
            assert result.stats.by_fn == {name: 2} and detail in result.stats.first_error, name
            # the pool still works afterwards (dead and stuck workers were replaced)
            assert pool.score(items("fine", "fine", "fine")).total == [1.0] * 3, name


def test_a_new_worker_s_start_up_and_imports_are_not_charged_to_a_call():
    """A module whose import takes 1.5 s under a 1 s limit: the second worker (started by the first
    score) and the one replacing a stuck worker import it before their first call's clock starts,
    so the stuck call is the only timeout."""
    slow = str(Path(__file__).parent / "data" / "slow_import_fns.py") + ":fine"
    with RewardPool([slow], workers=2, timeout_s=1.0) as pool:
        first = pool.score(items("a", "b", "c", "d"))
        assert first.total == [1.0] * 4 and first.stats.failures == 0, first.stats.first_error
        stuck = pool.score(items("hang", "a", "b", "c"))
        assert stuck.total == [0.0, 1.0, 1.0, 1.0] and stuck.stats.timeouts == stuck.stats.failures == 1
        after = pool.score(items("a", "b", "c", "d"))
        assert after.total == [1.0] * 4 and after.stats.failures == 0, after.stats.first_error
        # the stuck call's replacement takes 1.5 s to start; meanwhile the other worker's 0.8 s call
        # (started at 0.3 s) ends after the stuck call's deadline and before its own: not a timeout
        late = pool.score(items("hang", "sleep0.3", "sleep0.8"))
        assert late.total == [0.0, 1.0, 1.0] and late.stats.timeouts == late.stats.failures == 1


def test_non_finite_reward_is_an_error():
    with RewardPool([fn("not_a_number")], workers=1) as pool:
        result = pool.score(items("x"))
    assert result.total == [0.0] and result.stats.errors == 1 and "nan" in result.stats.first_error


def test_calls_run_in_parallel_and_any_finite_timeout_works():
    with RewardPool([fn("slow")], workers=2, timeout_s=1e10) as pool:
        pool.score(items("warm-up", "warm-up"))  # start both workers
        t0 = time.monotonic()
        result = pool.score(items(*["x"] * 4))
        elapsed = time.monotonic() - t0
    assert result.total == [1.0] * 4 and result.stats.failures == 0
    assert elapsed < 1.4  # 4 calls of 0.4 s on 2 workers: ~0.8 s (1.6 s if serial)


def test_weights_and_per_function_rewards():
    with RewardPool([fn("exact"), fn("boom")], weights=[2.0, 0.5], workers=2) as pool:
        result = pool.score(items("1", "2", "boom", answer="1"))
    assert result.per_fn == {"exact": [1.0, 0.0, 0.0], "boom": [1.0, 1.0, 0.0]}
    assert result.total == [2.5, 0.5, 0.0]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_colon", "expected 'package.module:function'"),
        ("stablerl.nope:f", "cannot import module 'stablerl.nope'"),
        ("stablerl.tasks.verifiers:nope", "has no function 'nope'"),
        ("missing/file.py:f", "does not exist"),
    ],
)
def test_bad_reward_function_paths_fail_before_any_work(spec, match):
    with pytest.raises(ValueError, match=match):
        RewardPool([spec])


def test_config_rejects_non_finite_values():
    for bad in ("task.reward_timeout_s=.inf", "optim.lr=.nan", "task.reward_timeout_s=inf"):
        with pytest.raises(ValueError, match="finite"):
            build_config(RunConfig, None, [bad])
    cfg = build_config(RunConfig, None, ["task.reward_timeout_s=1e10"])
    assert cfg.task.reward_timeout_s == 1e10


def test_pool_works_from_an_unguarded_script(tmp_path):
    """Workers do not re-import the parent's __main__ (as multiprocessing's spawn would): a user's
    training script without an `if __name__ == "__main__"` guard runs once, not once per worker."""

    script = tmp_path / "train.py"
    script.write_text(
        "from stablerl.tasks import RewardPool\n"
        f"pool = RewardPool([{fn('exact')!r}], workers=2)\n"
        "print('total', pool.score([('p', '1', {'answer': '1'}), ('p', '2', {'answer': '1'})]).total)\n"
        "pool.close()\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("total") == 1 and "total [1.0, 0.0]" in out.stdout


def test_a_hanging_verifier_costs_its_timeout_not_the_run(sft_ckpt, tmp_path):
    t0 = time.monotonic()
    # every response has digits, so every call of step 1 times out: going on with 0 is the opt-out
    # now (task.reward_fail_fast=false; by default such a function stops the run at step 1)
    state = train(
        sft_ckpt,
        tmp_path / "r",
        "train.steps=2",
        f"task.reward_fns=[{FNS}:hang_on_digits]",
        "task.reward_fail_fast=false",
        "task.reward_timeout_s=0.5",
        "task.reward_workers=2",
        "eval.every=10",
        "task.eval_size=2",
    )
    rows = read_metrics(tmp_path / "r")
    assert rows[-1]["step"] == 2 and state.reward_timeouts > 0
    assert rows[1]["reward_timeouts"] > 0
    # every hung call cost at most its 0.5 s timeout on 2 workers (plus a worker restart)
    assert time.monotonic() - t0 < 60


def test_eval_counts_verifier_failures(sft_ckpt, tmp_path, capsys):
    rc = main(
        [
            "eval",
            str(sft_ckpt),
            "task.levels=[1]",
            "task.eval_size=4",
            "eval.samples=1",
            f"task.reward_fns=[{FNS}:boom_always]",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["eval/reward_failures"] == 8  # 4 greedy + 4 sampled calls, each raised
    assert "boom_always x8" in out["eval/reward_failures_detail"]


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


def test_a_reward_function_failing_on_every_first_step_call_stops_the_run(sft_ckpt, tmp_path):

    with pytest.raises(TrainingAborted, match=r"boom_always failed on every response of the first step"):
        Trainer(
            config(sft_ckpt, tmp_path / "r", "train.steps=2", f"task.reward_fns=[{FNS}:boom_always]"),
            tmp_path / "r",
            log=lambda *_: None,
        ).run()


def test_trl_functions_get_conversational_completions_where_the_prompt_was_a_chat():
    """TRL passes ``completions[i]`` as ``[{"role": "assistant", "content": text}]`` and
    ``prompts[i]`` as the chat turns when the prompt was a conversation: so does the pool, for a
    prompt under task.chat_template (a system turn from task.system_prompt) or a chat-turn row;
    plain-text prompts stay strings."""
    from stablerl.config import TaskConfig
    from stablerl.generation import prompt_turns
    from stablerl.tasks import Problem

    text = Problem(prompt="1+1=", answer="2")
    chat = Problem(prompt="2+2?", answer="4", messages=({"role": "user", "content": "2+2?"},))
    on, off = TaskConfig(chat_template=True, system_prompt="Be brief."), TaskConfig()
    assert prompt_turns(text, off) == ()
    assert prompt_turns(text, on) == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="})
    with RewardPool([f"{FNS}:trl_conversational"], workers=1, timeout_s=10) as pool:
        assert pool.score([(text.prompt, "abc", {}, prompt_turns(text, on))]).total == [3.5]
        assert pool.score([(chat.prompt, "abcd", {}, prompt_turns(chat, off))]).total == [4.0]
        assert pool.score([(text.prompt, "abc", {}, prompt_turns(text, off))]).total == [-1.0]
        assert pool.score([(text.prompt, "abc", {})]).total == [-1.0]
