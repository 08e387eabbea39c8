"""Math problems from local JSONL or Parquet files, loaded with `datasets`, checked with
`math-verify` (symbolic equivalence: 1/2 == 0.5 == \\frac{1}{2})."""

from __future__ import annotations

import random
from pathlib import Path

from stablerl.tasks.base import Problem


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
    if fmt == "json":
        _check_jsonl(p)
    from datasets import load_dataset

    ds = load_dataset(fmt, data_files=str(p), split="train")
    problems, bad = [], []
    for i, row in enumerate(ds, start=1):
        q, a = row.get(question_field), row.get(answer_field)
        if not isinstance(q, str) or not q.strip() or a is None or str(a).strip() == "":
            missing = [f for f, v in ((question_field, q), (answer_field, a)) if v is None or str(v).strip() == ""]
            bad.append(f"row {i}: missing or empty {', '.join(missing) or question_field}")
            continue
        sol = str(row.get(solution_field) or "") if solution_field else ""
        problems.append(Problem(prompt=prompt_template.format(question=q), answer=str(a), solution=sol))
    if bad:
        raise MalformedDataError(f"{path}: {len(bad)} malformed rows: " + "; ".join(bad[:10]))
    if not problems:
        raise MalformedDataError(f"{path}: no rows")
    return problems


def _check_jsonl(path: Path) -> None:
    import json

    with path.open() as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedDataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise MalformedDataError(f"{path}: line {n} is not a JSON object")


class MathFileTask:
    name = "math_file"

    def __init__(self, train_file: str, eval_file: str | None = None, question_field: str = "question",
                 answer_field: str = "answer", solution_field: str | None = None, eval_size: int = 200,
                 seed: int = 0, prompt_template: str = "{question}\n"):
        self._train = load_problems(train_file, question_field, answer_field, solution_field, prompt_template)
        if eval_file:
            self._eval = load_problems(eval_file, question_field, answer_field, solution_field, prompt_template)
        else:  # hold out a seeded slice of the training file
            rng = random.Random(seed)
            order = list(range(len(self._train)))
            rng.shuffle(order)
            n_eval = min(eval_size, len(order) // 5)
            held = set(order[:n_eval])
            self._eval = [self._train[i] for i in sorted(held)]
            self._train = [p for i, p in enumerate(self._train) if i not in held]
        if not self._train:
            raise MalformedDataError(f"{train_file}: no training rows left after holding out the eval split")
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
        from math_verify import parse, verify

        gold = parse(problem.answer if "$" in problem.answer else f"${problem.answer}$")
        return float(verify(gold, parse(response)))
