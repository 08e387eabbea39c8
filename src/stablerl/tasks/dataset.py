"""Problems from a dataset: whatever ``datasets.load_dataset`` reads — a local file (JSONL, JSON,
Parquet, CSV, Arrow), a local directory (data files of one format, or a ``save_to_disk``
dataset) or, where the network allows, a hub id — with the split and the column mapping from
the config. The default reward is math-verify on the answer column (symbolic equivalence:
1/2 == 0.5 == \\frac{1}{2}); any reward functions can replace it (docs/your-task.md).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from stablerl.tasks.base import Problem
from stablerl.tasks.verifiers import MATH, math_answer

# file extension -> the `datasets` builder that reads it
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # what chat templates render
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class MalformedDataError(ValueError):
    pass


@dataclass(frozen=True)
class Columns:
    """Which column holds what. ``answer`` may be None when the reward functions need no
    reference answer; ``solution`` (teacher solutions) is for the cold-start SFT only."""

    question: str = "question"
    answer: str | None = "answer"
    solution: str | None = None


def check_template(template: str) -> None:
    """``task.prompt_template`` must place the question once, with no other ``{...}`` fields."""
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"task.prompt_template {template!r} is not a valid template ({type(e).__name__}: {e}); "
            "it may use only {question} (write {{ and }} for literal braces)"
        ) from None
    if "{question}" not in template:
        raise ValueError(f"task.prompt_template {template!r} must contain {{question}}")


def _check_jsonl(path: Path) -> None:
    """Line-level checks `datasets` reports badly: UTF-8, one JSON object per line, not empty."""
    rows = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MalformedDataError(
                    f"{path}: line {n} is not valid UTF-8 (byte {raw[e.start]:#04x} at "
                    f"column {e.start + 1}); allowed: UTF-8 text"
                ) from None
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


def _check_text(path: Path) -> None:
    data = path.read_bytes()
    if not data.strip():
        raise MalformedDataError(f"{path}: the file is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MalformedDataError(f"{path}: line {line} is not valid UTF-8; allowed: UTF-8 text") from None


def load_rows(source: str, split: str = "train", config: str | None = None, key: str = "task.dataset"):
    """A ``datasets.Dataset`` from a file, a directory or a hub id; errors name ``key``."""
    import datasets

    p = Path(source).expanduser()
    try:
        if p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ValueError(f"{key} {source!r}: allowed file extensions are {', '.join(BUILDERS)}")
            if p.suffix.lower() == ".jsonl" or (p.suffix.lower() == ".json" and _is_json_lines(p)):
                _check_jsonl(p)
            elif builder in ("csv", "json"):
                _check_text(p)
            elif p.stat().st_size == 0:
                raise MalformedDataError(f"{p}: the file is empty")
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        if p.is_dir():
            if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():  # save_to_disk
                ds = datasets.load_from_disk(str(p))
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            for f in sorted(p.rglob("*.jsonl")):
                _check_jsonl(f)
            return datasets.load_dataset(str(p), split=split)
        if source.count("/") == 1 and not source.startswith((".", "/", "~")) and p.suffix.lower() not in BUILDERS:
            try:
                return datasets.load_dataset(source, config, split=split)  # a hub id: the HF cache or the network
            except (ValueError, MalformedDataError):
                raise
            except Exception as e:  # noqa: BLE001 - offline, unknown repo, no such split
                from stablerl.models import hub_error

                raise MalformedDataError(hub_error(key, source, e, repo_type="dataset")) from None
        raise ValueError(f"{key} {source!r} does not exist (a local file or directory, or a hub id owner/name)")
    except (ValueError, MalformedDataError):
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable data
        what = str(e).splitlines()[0] if str(e) else ""
        raise MalformedDataError(
            f"{key} {source!r} (split {split!r}) cannot be read: {type(e).__name__}: {what}"
        ) from None


def _is_json_lines(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(1024).lstrip()
    return head[:1] == b"{"


def load_problems(
    source: str,
    columns: Columns,
    prompt_template: str = "{question}\n",
    split: str = "train",
    config: str | None = None,
    key: str = "task.dataset",
) -> list[Problem]:
    """Every row as a Problem (every column of the row goes to the reward functions); a malformed
    row is reported with its row number (1-based); a missing column names its config key."""
    check_template(prompt_template)
    ds = load_rows(source, split, config, key)
    prefix = key.rpartition(".")[0] + ".columns" if "." in key else "columns"
    if columns.question == "question" and "question" not in ds.column_names and "prompt" in ds.column_names:
        columns = replace(columns, question="prompt")  # TRL's standard format: a "prompt" column
    for role in ("question", "answer", "solution"):
        name = getattr(columns, role)
        if name is not None and name not in ds.column_names:
            raise MalformedDataError(
                f"{prefix}.{role}: no column {name!r} in {source}; its columns: {', '.join(ds.column_names)}"
            )
    problems, bad = [], []
    for i, row in enumerate(ds, start=1):
        q = row.get(columns.question)
        a = row.get(columns.answer) if columns.answer else ""
        missing = [
            c
            for c, v in ((columns.question, q), (columns.answer, a))
            if c and (v is None or str(v).strip() == "" or (isinstance(v, list) and not v))
        ]
        messages = chat_messages(q)
        if missing or not (isinstance(q, str) or messages):
            bad.append(
                f"row {i}: missing or empty {', '.join(missing) or columns.question}"
                + ("" if missing else " (a prompt is text, or a list of {role, content} chat turns)")
            )
            continue
        problem = chat_problem(messages) or answer_problem(a if columns.answer else "")
        if problem:
            bad.append(f"row {i}: {problem}")
            continue
        sol = str(row.get(columns.solution) or "") if columns.solution else ""
        # a chat prompt is given to reward functions as its last user turn; its turns are encoded
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "") if messages else q
        problems.append(
            Problem(
                prompt=text if messages else prompt_template.format(question=q),
                answer=reference_answer(a),
                solution=sol,
                fields=dict(row),
                source=f"{source} row {i}",
                messages=messages,
            )
        )
    if bad:
        raise MalformedDataError(f"{source}: {len(bad)} malformed rows: " + "; ".join(bad[:10]))
    if not problems:
        raise MalformedDataError(f"{source}: no rows")
    return problems


def chat_messages(value) -> tuple:
    """A prompt in TRL's conversational format — a list of ``{"role", "content"}`` turns — as a
    tuple of plain dicts; ``()`` for anything else (a text prompt)."""
    if not isinstance(value, list) or not value:
        return ()
    if not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return ()
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def chat_problem(messages: tuple) -> str:
    """What is wrong with a chat prompt ('' when nothing): every turn needs a role a chat template
    knows, and one of them must be the user's (the prompt reward functions see and the log shows)."""
    if not messages:
        return ""
    roles = [m["role"] for m in messages]
    unknown = [r for r in roles if r not in CHAT_ROLES]
    if unknown:
        return f"chat turn role {unknown[0]!r} is not one of {', '.join(CHAT_ROLES)}"
    if "user" not in roles:
        return f"the chat prompt has no 'user' turn (its roles: {', '.join(roles)})"
    return ""


def answer_problem(value) -> str:
    """What is wrong with a reference answer ('' when nothing): GSM8K's ``####`` must be followed
    by the final answer."""
    text = str(value)
    if "####" in text and not text.rsplit("####", 1)[1].strip():
        return f"nothing follows the last '####' of the answer {text[-60:]!r} (GSM8K writes '#### <final answer>')"
    return ""


THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


def reference_answer(value) -> str:
    """The reference answer of a row: GSM8K writes its worked solution, then ``#### 72``; the final
    answer is what follows the last ``####``, its thousands separators dropped when they group
    thousands (``1,072`` -> ``1072``; ``1,0,7,2`` stays as written: a list, not a number).
    Anything else as is."""
    text = str(value)
    if "####" not in text:
        return text
    final = text.rsplit("####", 1)[1].strip()
    return final.replace(",", "") if THOUSANDS.fullmatch(final) else final


class DatasetTask:
    """Training problems from ``dataset``; the held-out split is ``eval_dataset`` or, without one,
    a seeded slice of at most a fifth of ``dataset``. ``warnings`` lists what the task did
    instead of what was asked (a capped held-out split, an ignored ``eval_size``); the trainer
    prints them."""

    name = "dataset"
    reward_fns = [MATH]

    def __init__(
        self,
        dataset: str,
        *,
        columns: Columns = Columns(),
        split: str = "train",
        config: str | None = None,
        eval_dataset: str | None = None,
        eval_split: str = "train",
        eval_size: int = 200,
        seed: int = 0,
        prompt_template: str = "{question}\n",
        eval_size_set: bool = False,
    ):
        self.warnings: list[str] = []
        self._train = load_problems(dataset, columns, prompt_template, split, config)
        if eval_dataset:
            self._eval = load_problems(
                eval_dataset, columns, prompt_template, eval_split, config, key="task.eval_dataset"
            )
            if eval_size_set:
                self.warnings.append(
                    f"task.eval_size={eval_size} is ignored: task.eval_dataset supplies the "
                    f"held-out set ({len(self._eval)} problems, all evaluated)"
                )
        else:  # hold out a seeded slice of the training data, at most a fifth of it
            n = len(self._train)
            n_eval = min(eval_size, n // 5)
            if n_eval == 0:
                raise MalformedDataError(
                    f"{dataset}: {n} rows are too few to hold out an evaluation split (at most a fifth of the "
                    "rows is held out, so at least 5 are needed); add rows or set task.eval_dataset"
                )
            if n_eval < eval_size:
                self.warnings.append(
                    f"task.eval_size={eval_size} capped to {n_eval}: the held-out split is at "
                    f"most a fifth of the {n} rows of {dataset} (set task.eval_dataset for more)"
                )
            order = list(range(n))
            random.Random(seed).shuffle(order)
            held = set(order[:n_eval])
            self._eval = [self._train[i] for i in sorted(held)]
            self._train = [p for i, p in enumerate(self._train) if i not in held]
        self.seed = seed
        self._order: tuple[int, list[int]] = (-1, [])

    def train_problems(self) -> list[Problem]:
        """Every training problem (a finite task; the built-in arithmetic stream has no such list)."""
        return list(self._train)

    def drop(self, unwanted) -> tuple[int, int]:
        """Remove the problems ``unwanted(problem)`` is true for (e.g. over-long prompts); returns how
        many training and held-out problems went. Neither split may end up empty."""
        train = [p for p in self._train if not unwanted(p)]
        held = [p for p in self._eval if not unwanted(p)]
        if not train or not held:
            raise MalformedDataError(
                "skipping the rows task.long_prompts=skip drops leaves no "
                f"{'training' if not train else 'held-out'} problems"
            )
        gone = (len(self._train) - len(train), len(self._eval) - len(held))
        self._train, self._eval = train, held
        self._order = (-1, [])
        return gone

    def train_problem(self, index: int) -> Problem:
        # epoch-wise reshuffled order, deterministic in (seed, index): resumable
        epoch, pos = divmod(index, len(self._train))
        if self._order[0] != epoch:
            order = list(range(len(self._train)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._train[self._order[1][pos]]

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def reward(self, response: str, problem: Problem) -> float:
        return math_answer(problem.prompt, response, **problem.reward_fields())
