"""Tasks, verifiers, reward failures, and cold-start SFT."""

import json
import time
from importlib.resources import files

import pytest
import torch
from tinyrun import cli_error

from stablerl.checkpoint import save_model_dir
from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.generation import encode_prompt
from stablerl.models import build_model, build_tokenizer, default_model_config
from stablerl.sft import run_sft, sft_batch
from stablerl.tasks import ArithmeticTask, Columns, DatasetTask, MalformedDataError, Problem

SAMPLE = str(files("stablerl.tasks") / "data" / "sample_math.jsonl")


def test_arithmetic_reward_hand_worked():
    task = ArithmeticTask()
    p = Problem(prompt="17+25+8=", answer="50")
    assert task.reward("17+25=42;42+8=50#50", p) == 1.0
    assert task.reward("#50", p) == 1.0
    assert task.reward("17+25=42;42+8=51#51", p) == 0.0
    assert task.reward("17+25=42;42+8=50", p) == 0.0  # no final answer marker
    assert task.reward("#50#49", p) == 0.0  # the last answer counts
    assert task.reward("#050", p) == 0.0  # exact match


@pytest.mark.parametrize("style", ["steps", "direct", "noisy"])
def test_teacher_solutions(style):
    task = ArithmeticTask(levels=[1, 2, 3], style=style, seed=1)
    problems = [task.train_problem(i) for i in range(500)]
    correct = sum(task.reward(p.solution, p) for p in problems) / len(problems)
    if style == "noisy":
        assert 0.6 < correct < 0.8  # 30% of solutions carry one slip
    else:
        assert correct == 1.0
    if style == "steps":
        p = problems[0]
        nums = [int(x) for x in p.prompt[:-1].split("+")]
        assert p.solution.count(";") == len(nums) - 2 and p.level == len(nums) - 1
    assert {p.level for p in problems} == {1, 2, 3}


def test_column_solutions_hand_worked_and_always_right():
    import random

    from stablerl.tasks.arithmetic import column_solution

    # 17 + 25 + 8: units 7+5+8+0 = 20 (write 0, carry 2); tens 1+2+0+2 = 5 -> 50
    assert column_solution([17, 25, 8], random.Random(0)) == "7+5+8+0=20;1+2+0+2=5#50"
    # a final carry becomes the leading digits: 95 + 7: 5+7+0 = 12; 9+0+1 = 10 -> 102
    assert column_solution([95, 7], random.Random(0)) == "5+7+0=12;9+0+1=10#102"
    task = ArithmeticTask(levels=[2, 5], style="columns", max_operand=999999, seed=2)
    problems = [task.train_problem(i) for i in range(400)]
    assert all(task.reward(p.solution, p) == 1.0 for p in problems)
    # every column: the digits of each number (0 where it has none) and the carry in; the sum follows
    for p in problems[:50]:
        nums = [int(x) for x in p.prompt[:-1].split("+")]
        width, carry = len(str(max(nums))), 0
        for col, step in enumerate(p.solution.split("#")[0].split(";")):
            lhs, total = step.split("=")
            terms = [int(t) for t in lhs.split("+")]
            assert terms[:-1] == [n // 10**col % 10 for n in nums] and terms[-1] == carry
            assert int(total) == sum(terms)
            carry = int(total) // 10
        assert col == width - 1
    noisy = ArithmeticTask(levels=[5], style="noisy_columns", max_operand=999999, seed=2)
    correct = sum(noisy.reward(noisy.train_problem(i).solution, noisy.train_problem(i)) for i in range(1000)) / 1000
    assert 0.6 < correct < 0.8  # 30% carry one slip


def test_column_style_needs_room_for_its_solutions():

    with pytest.raises(ValueError, match="up to 110 tokens, more than rollout.max_new_tokens=40"):
        build_config(RunConfig, None, ["task.style=columns", "task.levels=[5]", "task.max_operand=999999"])
    task = ArithmeticTask(levels=[5], style="columns", max_operand=999999)
    longest = max(len(task.train_problem(i).solution) for i in range(2000)) + 1  # + EOS
    assert longest <= 110  # the bound the check uses holds
    build_config(
        RunConfig,
        None,
        ["task.style=columns", "task.levels=[5]", "task.max_operand=999999", "rollout.max_new_tokens=110"],
    )
    # the ~200-token length of docs/notebook/preregistration.md's experiment 2: three 18-digit numbers
    eighteen = ["task.style=noisy_columns", "task.levels=[2]", f"task.max_operand={10**18 - 1}"]
    with pytest.raises(ValueError, match="up to 218 tokens, more than rollout.max_new_tokens=112"):
        build_config(RunConfig, None, [*eighteen, "rollout.max_new_tokens=112"])
    build_config(RunConfig, None, [*eighteen, "rollout.max_new_tokens=224"])
    task = ArithmeticTask(levels=[2], style="columns", max_operand=10**18 - 1)
    problems = [task.train_problem(i) for i in range(2000)]
    assert max(len(p.solution) for p in problems) + 1 <= 218
    assert 195 <= sum(len(p.solution) for p in problems) / len(problems) <= 218  # twice the 9-digit length
    assert all(task.reward(p.solution, p) == 1.0 for p in problems)  # exact beyond float precision
    assert task.reward(problems[0].solution[:-1] + str((int(problems[0].answer) + 1) % 10), problems[0]) == 0.0
    with pytest.raises(ValueError, match="task.max_operand"):
        build_config(RunConfig, None, ["task.max_operand=10000000000000000000"])


def test_held_out_split_is_disjoint_and_deterministic():
    task = ArithmeticTask(eval_size=300, seed=3)
    held = {p.prompt for p in task.eval_problems()}
    assert len(held) == 300
    assert not held & {task.train_problem(i).prompt for i in range(5000)}
    again = ArithmeticTask(eval_size=300, seed=3)
    assert [p.prompt for p in again.eval_problems()] == [p.prompt for p in task.eval_problems()]
    assert again.train_problem(123) == task.train_problem(123)
    with pytest.raises(ValueError, match="teacher style"):
        ArithmeticTask(style="fancy")
    with pytest.raises(ValueError, match="levels"):
        ArithmeticTask(levels=[0])


def test_dataset_task_with_math_verify(tmp_path):
    task = DatasetTask(SAMPLE, columns=Columns(solution="solution"), eval_size=4, seed=0)
    assert len(task.eval_problems()) == 4
    half = next(p for p in task.eval_problems() + [task.train_problem(i) for i in range(16)] if "half of 9" in p.prompt)
    assert task.reward("so it is \\boxed{4.5}", half) == 1.0  # 4.5 == 9/2, symbolically
    assert task.reward("The answer is \\boxed{5}", half) == 0.0
    assert task.reward(half.solution, half) == 1.0
    # Parquet, through datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["What is 2+2?", "What is 3+3?"], "a": ["4", "6"]}), tmp_path / "x.parquet")
    ptask = DatasetTask(
        str(tmp_path / "x.parquet"), eval_dataset=str(tmp_path / "x.parquet"), columns=Columns(question="q", answer="a")
    )
    assert ptask.reward("\\boxed{4}", ptask.eval_problems()[0]) == 1.0


def test_malformed_rows_are_reported_with_their_number(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n')
    with pytest.raises(MalformedDataError, match="line 2 is not valid JSON"):
        DatasetTask(str(bad_json))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(
        "\n".join(
            json.dumps(r)
            for r in [{"question": "a", "answer": "1"}, {"question": "b"}, {"question": "", "answer": "3"}]
        )
        + "\n"
    )
    with pytest.raises(MalformedDataError, match="row 2: missing or empty answer.*row 3: missing or empty question"):
        DatasetTask(str(missing))
    with pytest.raises(ValueError, match="does not exist"):
        DatasetTask(str(tmp_path / "nope.jsonl"))
    txt = tmp_path / "x.txt"
    txt.write_text("question,answer\n")
    with pytest.raises(ValueError, match="allowed file extensions"):
        DatasetTask(str(txt))


def test_sft_learns_and_saves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = build_tokenizer()
    model = build_model(default_model_config(tok, hidden_size=32, expert_size=32, num_layers=2), seed=0)
    task = ArithmeticTask(levels=[1])
    batch = sft_batch(tok, [task.train_problem(0)])
    # labels cover exactly the solution and EOS
    n_label = int((batch["labels"] != -100).sum())
    assert n_label == len(task.train_problem(0).solution) + 1
    losses = run_sft(model, tok, task, steps=60, batch_size=16, lr=3e-3, seed=0, log=None)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    path = save_model_dir(tmp_path / "ckpt", model, tok)
    assert (path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    tok2 = AutoTokenizer.from_pretrained(path)
    ids = tok2("<bos>12+3=", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # the text round-trips; a plain tok2(text) also starts with BOS now, as training encodes prompts
    assert tok2.decode(tok2("7+8=15#15", add_special_tokens=False).input_ids) == "7+8=15#15"
    assert tok2("7+8=15#15").input_ids[0] == tok2.bos_token_id


@pytest.mark.parametrize(
    "content, expect",
    [
        (b"", "empty"),
        (b"  \n\n \t\n", "empty"),
        (b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9", "answer": "1"}\n', "line 2 is not valid UTF-8"),
    ],
)
def test_bad_data_files(tmp_path, capsys, content, expect):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", "task.name=dataset", f"task.dataset={data}"])
    assert str(data) in err and expect in err


def test_data_too_small_for_a_held_out_split_fails_before_sft(tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    t0 = time.monotonic()
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", "task.name=dataset", f"task.dataset={data}"])
    assert "too few" in err and "task.eval_dataset" in err and time.monotonic() - t0 < 20
    assert not (tmp_path / "r").exists()


def test_data_file_warnings(tmp_path):
    from stablerl.tasks import DatasetTask

    task = DatasetTask(SAMPLE, eval_size=500)
    assert any("capped to 4" in w for w in task.warnings)
    task = DatasetTask(SAMPLE, eval_dataset=SAMPLE, eval_size=50, eval_size_set=True)
    assert any("task.eval_size=50 is ignored" in w for w in task.warnings)


def test_a_tokenizer_without_bos_encodes_the_prompt_alone():
    tok = build_tokenizer()
    tok.bos_token = None
    assert tok.bos_token_id is None
    assert encode_prompt(tok, "1+2=") == tok("1+2=", add_special_tokens=False).input_ids


def _rows(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "turns, named",
    [
        ([{"role": "hacker", "content": "2+2?"}], "role 'hacker' is not one of system, developer, user"),
        ([{"role": "assistant", "content": "4"}], "no 'user' turn (its roles: assistant)"),
        ([{"role": "system", "content": "be brief"}], "no 'user' turn (its roles: system)"),
    ],
)
def test_a_chat_prompt_without_a_user_turn_is_refused_naming_the_row(tmp_path, turns, named):
    ok = {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    rows = [ok] * 6 + [{"prompt": turns, "answer": "4"}]
    with pytest.raises(MalformedDataError, match="row 7: .*" + named.replace("(", r"\(").replace(")", r"\)")):
        DatasetTask(_rows(tmp_path, rows))
    task = DatasetTask(_rows(tmp_path, [ok] * 7))  # with a user turn: its content is the prompt
    assert task.train_problem(0).prompt == "1+1?"


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("She sold 24.\n#### 72", "72"),
        ("#### 1,072", "1072"),  # thousands separators
        ("#### -1,234.5", "-1234.5"),
        ("text #### 1,0,7,2", "1,0,7,2"),  # not a number's grouping: a list, kept as written
        ("#### 12 #### 13", "13"),  # the last '####' holds the final answer
        ("no marker, 1,072", "no marker, 1,072"),  # anything else as is
        ("#### ", None),
        ("#### 12 #### ", None),
        ("work\n####", None),
    ],
)
def test_gsm8k_answers_take_what_follows_the_last_marker_and_refuse_an_empty_one(tmp_path, answer, reference):
    rows = [{"question": f"q{i}", "answer": "1"} for i in range(6)] + [{"question": "last", "answer": answer}]
    if reference is None:
        with pytest.raises(MalformedDataError, match="row 7: nothing follows the last '####'"):
            DatasetTask(_rows(tmp_path, rows))
        return
    task = DatasetTask(_rows(tmp_path, rows), eval_size=1)
    problems = task.train_problems() + task.eval_problems()
    assert next(p.answer for p in problems if p.prompt.startswith("last")) == reference
