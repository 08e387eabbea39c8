"""The reward pool: verifiers in worker processes that cannot zero, stall or kill a run.

Each failure mode is a real misbehaving function (tests/data/reward_fns.py) run through the
same pool the trainer and `stablerl eval` use.
"""

import time
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.evaluation import evaluate
from stablerl.models import build_tokenizer
from stablerl.rollout import RolloutBatch
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
    import subprocess
    import sys

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
