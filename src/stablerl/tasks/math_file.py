"""Math problems from local JSONL or Parquet files, loaded with `datasets`, checked with
`math-verify` (symbolic equivalence: 1/2 == 0.5 == \\frac{1}{2})."""

from __future__ import annotations

import random
from pathlib import Path

from stablerl.tasks.base import Problem
from stablerl.tasks.verifiers import MATH, math_answer


class MalformedDataError(ValueError):
    pass


def load_problems(path: str, question_field: str, answer_field: str, solution_field: str | None = None,
                  prompt_template: str = "{question}\n") -> list[Problem]:
    """Every row as a Problem; a malformed row is reported with its row number (1-based)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {path!r} does not exist")
    fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix)
    if fmt is None:
        raise ValueError(f"data file {path!r}: allowed extensions are .jsonl, .json, .parquet")
    check_template(prompt_template)
    if fmt == "json":
        _check_jsonl(p)
    elif p.stat().st_size == 0:
        raise MalformedDataError(f"{path}: the file is empty")
    from datasets import load_dataset

    try:
        ds = load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise MalformedDataError(f"{path}: cannot be read as {p.suffix[1:]} ({type(e).__name__}: {e})") from None
    for name, key in ((question_field, "task.question_field"), (answer_field, "task.answer_field"),
                      (solution_field, "task.solution_field")):
        if name is not None and name not in ds.column_names:
            raise MalformedDataError(f"{path}: no column {name!r} ({key}); columns: {', '.join(ds.column_names)}")
    problems, bad = [], []
    for i, row in enumerate(ds, start=1):
        q, a = row.get(question_field), row.get(answer_field)
        if not isinstance(q, str) or not q.strip() or a is None or str(a).strip() == "":
            missing = [f for f, v in ((question_field, q), (answer_field, a)) if v is None or str(v).strip() == ""]
            bad.append(f"row {i}: missing or empty {', '.join(missing) or question_field}")
            continue
        sol = str(row.get(solution_field) or "") if solution_field else ""
        problems.append(Problem(prompt=prompt_template.format(question=q), answer=str(a), solution=sol,
                                fields=dict(row)))
    if bad:
        raise MalformedDataError(f"{path}: {len(bad)} malformed rows: " + "; ".join(bad[:10]))
    if not problems:
        raise MalformedDataError(f"{path}: no rows")
    return problems


def check_template(template: str) -> None:
    """``task.prompt_template`` must place the question once, with no other ``{...}`` fields."""
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"task.prompt_template {template!r} is not a valid template ({type(e).__name__}: {e}); "
                         "it may use only {question} (write {{ and }} for literal braces)") from None
    if "{question}" not in template:
        raise ValueError(f"task.prompt_template {template!r} must contain {{question}}")


def _check_jsonl(path: Path) -> None:
    import json

    rows = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MalformedDataError(f"{path}: line {n} is not valid UTF-8 (byte {raw[e.start]:#04x} at "
                                         f"column {e.start + 1}); allowed: UTF-8 text") from None
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedDataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise MalformedDataError(f"{path}: line {n} is not a JSON object")
                rows += 1
    if rows == 0:
        raise MalformedDataError(f"{path}: the file is empty (no JSON rows); allowed: one JSON object per line")


class MathFileTask:
    """``warnings`` lists what the task did instead of what was asked (a capped held-out split,
    an ignored ``eval_size``); the trainer prints them."""

    name = "math_file"
    reward_fns = [MATH]

    def __init__(self, train_file: str, eval_file: str | None = None, question_field: str = "question",
                 answer_field: str = "answer", solution_field: str | None = None, eval_size: int = 200,
                 seed: int = 0, prompt_template: str = "{question}\n", eval_size_set: bool = False):
        self.warnings: list[str] = []
        self._train = load_problems(train_file, question_field, answer_field, solution_field, prompt_template)
        if eval_file:
            self._eval = load_problems(eval_file, question_field, answer_field, solution_field, prompt_template)
            if eval_size_set:
                self.warnings.append(f"task.eval_size={eval_size} is ignored: task.eval_file supplies the "
                                     f"held-out set ({len(self._eval)} problems, all evaluated)")
        else:  # hold out a seeded slice of the training file, at most a fifth of it
            n = len(self._train)
            n_eval = min(eval_size, n // 5)
            if n_eval == 0:
                raise MalformedDataError(
                    f"{train_file}: {n} rows are too few to hold out an evaluation split (at most a fifth of "
                    "the rows is held out, so at least 5 are needed); add rows or set task.eval_file")
            if n_eval < eval_size:
                self.warnings.append(f"task.eval_size={eval_size} capped to {n_eval}: the held-out split is at "
                                     f"most a fifth of the {n} rows of {train_file} (set task.eval_file for more)")
            order = list(range(n))
            random.Random(seed).shuffle(order)
            held = set(order[:n_eval])
            self._eval = [self._train[i] for i in sorted(held)]
            self._train = [p for i, p in enumerate(self._train) if i not in held]
        self.seed = seed

    def train_problem(self, index: int) -> Problem:
        # epoch-wise reshuffled order, deterministic in (seed, index)
        epoch, pos = divmod(index, len(self._train))
        order = list(range(len(self._train)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return self._train[order[pos]]

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def reward(self, response: str, problem: Problem) -> float:
        return math_answer(problem.prompt, response, **problem.reward_fields())
