"""Bring your own task: reward functions by path, weights and per-function logging, datasets
(directory, CSV, JSONL, Arrow), chat templates, evaluation sets with avg@k and pass@k, W&B
offline, and errors that name the key before any work."""

import csv
import json
import time
from pathlib import Path

import pytest

from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.evaluation import pass_at_k
from stablerl.generation import encode_prompt
from stablerl.loop import Trainer
from stablerl.models import build_tokenizer
from stablerl.runlog import read_metrics
from stablerl.tasks import Columns, DatasetTask, RewardPool

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "your_task"
FNS = str(Path(__file__).parent / "data" / "reward_fns.py")
TINY = [
    "batch.prompts_per_step=2",
    "batch.group_size=4",
    "rollout.max_new_tokens=12",
    "task.eval_size=8",
    "eval.every=2",
    "eval.samples=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def run(ckpt, run_dir, *extra):
    cfg = build_config(RunConfig, None, [f"model.path={ckpt}", f"run_dir={run_dir}", *TINY, *extra])
    Trainer(cfg, run_dir, log=lambda *_: None).run()
    return read_metrics(run_dir)


def example_task(*extra):
    return [
        "task.name=dataset",
        f"task.dataset={EXAMPLE / 'data' / 'train.jsonl'}",
        "task.columns.solution=solution",
        *extra,
    ]


def test_reward_module_by_path_weights_and_per_function_logging(sft_ckpt, tmp_path):
    rewards = EXAMPLE / "rewards.py"
    rows = run(
        sft_ckpt,
        tmp_path / "r",
        "train.steps=2",
        *example_task(
            f"task.reward_fns=[{rewards}:correct, {rewards}:well_formed, {FNS}:digit_fraction]",
            "task.reward_weights=[1.0, 0.5, 2.0]",
        ),
    )
    step = rows[1]
    parts = step["reward/correct"] * 1.0 + step["reward/well_formed"] * 0.5 + step["reward/digit_fraction"] * 2.0
    assert step["reward_mean"] == pytest.approx(parts, rel=1e-6)  # the total is the weighted sum (float32 mean)
    assert step["reward/digit_fraction"] > 0


def test_example_reward_functions_hand_worked():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_rewards", EXAMPLE / "rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    assert rewards.correct("p", "65 65 97. Answer: 97", answer="97") == 1.0
    assert rewards.correct("p", "Answer: 96", answer="97") == 0.0
    assert rewards.correct("p", "Answer: 97 and more", answer="97") == 0.0
    assert rewards.well_formed("p", "blah Answer: 12") == 1.0 and rewards.well_formed("p", "12") == 0.0
    assert rewards.shows_work("p", "65 65 97. Answer: 97", numbers="28, 65, 18, 97") == 1.0
    assert rewards.shows_work("p", "Answer: 97", numbers="28, 65, 18, 97") == 0.0


def test_misbehaving_reward_functions_give_zero_and_training_goes_on(sft_ckpt, tmp_path):
    t0 = time.monotonic()
    # training on with 0 for failed calls is the opt-out now (task.reward_fail_fast=false): by
    # default a function that fails on every response of the first step stops the run (below)
    rows = run(
        sft_ckpt,
        tmp_path / "always",
        "train.steps=2",
        "task.reward_timeout_s=0.5",
        "eval.every=100",
        "task.eval_size=2",
        "eval.sampled=false",
        "task.reward_fail_fast=false",
        f"task.reward_fns=[{FNS}:hang_always, {FNS}:boom_always, {FNS}:die_always, {FNS}:digit_fraction]",
    )
    step = rows[1]
    n = 8  # responses per step
    assert step["reward_timeouts"] == n and step["reward_errors"] == n and step["reward_crashes"] == n
    assert step["reward/hang_always"] == 0 and step["reward/boom_always"] == 0 and step["reward/die_always"] == 0
    assert step["reward_mean"] == pytest.approx(step["reward/digit_fraction"])  # the good one still counts
    assert rows[-1]["step"] == 2
    # 8 hung calls of 0.5 s on 2 workers per step, plus worker restarts: bounded, not stalled
    assert step["rollout_time"] < 30 and time.monotonic() - t0 < 120


def test_datasets_directory_csv_arrow_and_jsonl(tmp_path):
    rows = [{"q": f"Largest of {i}, {i + 1}?", "a": str(i + 1)} for i in range(10)]
    (tmp_path / "dir").mkdir()
    for k, chunk in enumerate((rows[:5], rows[5:])):
        (tmp_path / "dir" / f"part{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    with (tmp_path / "x.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["q", "a"])
        w.writeheader()
        w.writerows(rows)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    cols = Columns(question="q", answer="a")
    for source in ("dir", "x.csv", "saved"):
        task = DatasetTask(str(tmp_path / source), columns=cols, eval_size=2, prompt_template="Q: {question}")
        got = sorted([p.prompt for p in task.eval_problems()] + [task.train_problem(i).prompt for i in range(8)])
        assert got == sorted(f"Q: {r['q']}" for r in rows), source
        assert all(str(p.fields["a"]) == p.answer for p in task.eval_problems()), source  # columns reach the rewards


def test_chat_template_prompt(tmp_path):
    tok = build_tokenizer()
    ids = encode_prompt(tok, "Largest of 1, 2?", chat_template=True, system_prompt="Be brief.")
    assert tok.decode(ids) == "<bos>[system] Be brief.\n[user] Largest of 1, 2?\n[assistant] "
    assert tok.decode(encode_prompt(tok, "Largest of 1, 2?")) == "<bos>Largest of 1, 2?"
    # the template travels with the tokenizer (a cold start saves it, a run loads it)
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert encode_prompt(again, "x", chat_template=True) == encode_prompt(tok, "x", chat_template=True)
    tok.chat_template = None
    with pytest.raises(ValueError, match="task.chat_template"):
        encode_prompt(tok, "x", chat_template=True)


def test_eval_sets_report_avg_and_pass_at_k(sft_ckpt, tmp_path):
    assert pass_at_k([[0, 0, 1], [0, 0, 0], [1, 1, 1]], 1.0) == pytest.approx(2 / 3)
    rows = run(
        sft_ckpt,
        tmp_path / "sets",
        "train.steps=1",
        f"task.reward_fns=[{FNS}:digit_fraction]",
        f"eval.sets=[{{name: ex, dataset: {EXAMPLE / 'data' / 'test.csv'}, samples: 3, max_problems: 5,"
        f" pass_threshold: 0.01}}]",
    )
    first = rows[0]
    assert 0 < first["eval/ex/avg@3"] <= 1 and first["eval/ex/pass@3"] >= first["eval/ex/avg@3"] - 1e-12
    assert "eval/ex/pass@3" in rows[-1]


def test_wandb_offline_run_directory(sft_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "wb"
    run(sft_ckpt, run_dir, "train.steps=1", "log.wandb=true", "log.wandb_mode=offline", "log.wandb_project=test")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    log = offline[0] / f"run-{(run_dir / 'wandb_id').read_text()}.wandb"
    assert len(offline) == 1 and log.is_file()
    records = log.read_bytes()  # what `wandb sync` uploads: the resolved config and the metrics
    assert b"minibatches_per_step" in records and b"reward_mean" in records and b"eval/sampled_acc" in records


@pytest.mark.parametrize(
    "override, key",
    [
        ("task.reward_fns=[nope_module:fn]", "task.reward_fns"),
        (f"task.reward_fns=[{FNS}:no_such_function]", "task.reward_fns"),
        ("task.columns.question=prompt_text", "task.columns.question"),
        ("task.columns.solution=teacher", "task.columns.solution"),
        (
            "eval.sets=[{name: t, dataset: examples/your_task/data/test.csv, columns: {question: nope}}]",
            "eval.sets[t].columns.question",
        ),
        ("task.dataset=does/not_exist.jsonl", "task.dataset"),
    ],
)
def test_bad_keys_fail_before_any_work(tmp_path, capsys, override, key, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = main(["train", f"run_dir={tmp_path / 'r'}", *example_task(), override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and key in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_the_shipped_example_runs(tmp_path, monkeypatch):
    """docs/your-task.md's example, a few steps: its config, data, reward module, eval set."""
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "example"
    cfg_args = [
        "train",
        "--config",
        str(EXAMPLE / "config.yaml"),
        f"run_dir={run_dir}",
        "train.steps=2",
        "sft.steps=5",
        f"sft.output_dir={tmp_path / 'sft'}",
        "eval.every=2",
        "log.progress=false",
        "task.eval_size=4",
        "log.tensorboard=false",
        "batch.prompts_per_step=4",
    ]
    assert main(cfg_args) == 0
    rows = read_metrics(run_dir)
    assert "eval/test/avg@8" in rows[0] and "reward/correct" in rows[1] and "reward/well_formed" in rows[1]


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


def test_an_eval_set_does_not_inherit_the_tasks_solution_column(tmp_path):
    from stablerl.evaluation import EvalSet

    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")  # no solution column
    cfg = build_config(RunConfig, None, ["task.columns.solution=solution", f"eval.sets=[{{name: e, dataset: {data}}}]"])
    with RewardPool([f"{FNS}:exact"], workers=1) as pool:
        assert len(EvalSet(cfg.eval.sets[0], cfg.task, pool).problems) == 1
