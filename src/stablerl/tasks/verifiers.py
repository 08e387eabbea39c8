"""The built-in reward functions, and how any reward function is named and found.

Every reward function — built-in or a user's — has one of two signatures:

    fn(prompt: str, completion: str, **fields) -> float                  # stablerl's, one response
    fn(completions: list[str], **kwargs) -> list[float]                 # TRL's, every response at once

``fields`` are the problem's columns (``answer`` always; for a data file, every column of its
row). A function is named by an import path, ``package.module:function``, or by a file path,
``path/to/rewards.py:function``. The trainer never calls one in its own process: they run in
the worker processes of ``stablerl.tasks.reward.RewardPool``.

This module imports nothing heavy at load time: the pool's workers import it on start-up.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

ARITHMETIC = "stablerl.tasks.verifiers:arithmetic_answer"
MATH = "stablerl.tasks.verifiers:math_answer"

_ANSWER = re.compile(r"#(-?\d+)\s*$")


def arithmetic_answer(prompt: str, completion: str, answer: str, **_) -> float:
    """1 iff the text after the last '#' is exactly the reference answer (the arithmetic task)."""
    m = _ANSWER.search(completion)
    return float(m is not None and m.group(1) == str(answer))


def math_answer(prompt: str, completion: str, answer: str, **_) -> float:
    """1 iff math-verify finds the completion's final answer equivalent to ``answer``
    (1/2 == 0.5 == \\frac{1}{2}). math-verify bounds its parsing with ``signal.alarm``, which
    works only in a process's main thread: the reward pool's workers call it there."""
    from math_verify import parse, verify

    answer = str(answer)
    gold = parse(answer if "$" in answer else f"${answer}$")
    return float(verify(gold, parse(completion)))


def spec_name(spec: str) -> str:
    """A short name for logs and metrics: the function's name (``math_answer``)."""
    return spec.rpartition(":")[2]


def check_spec(spec: str) -> tuple[str, str, bool]:
    """``(module part, function name, is a file path)`` of a spec, checked without importing
    anything: the format, and for a file path that it is an existing ``.py`` file."""
    module_part, sep, fn_name = spec.rpartition(":")
    if not sep or not module_part or not fn_name.isidentifier():
        raise ValueError(f"reward function {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    is_file = module_part.endswith(".py") or "/" in module_part or "\\" in module_part
    if is_file:
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: file {module_part!r} does not exist")
        if path.suffix != ".py":
            raise ValueError(
                f"reward function {spec!r}: {module_part!r} is not a Python file; a file path must "
                "name a .py file ('path/to/file.py:function')"
            )
    return module_part, fn_name, is_file


def resolve(spec: str) -> Callable[..., float]:
    """The function a spec names (importing its module: only ever in a reward worker);
    ``ValueError`` naming the spec and what is allowed otherwise."""
    module_part, fn_name, is_file = check_spec(spec)
    if is_file:
        path = Path(module_part).expanduser().resolve()
        name = f"stablerl_user_rewards_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - a user file that fails to import is a config error
                raise ValueError(
                    f"reward function {spec!r}: importing {module_part} failed: {type(e).__name__}: {e}"
                ) from None
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"reward function {spec!r}: cannot import module {module_part!r} ({type(e).__name__}: {e})"
            ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: module {module_part!r} has no function {fn_name!r}")
    try:
        if is_batched(fn):
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
                raise TypeError
        else:
            inspect.signature(fn).bind_partial("prompt", "completion")
    except TypeError:
        raise ValueError(
            f"reward function {spec!r}: it must accept (prompt, completion, **fields), or TRL's (completions, **kwargs)"
        ) from None
    except ValueError:  # no signature to inspect (a builtin): it is called and judged by its result
        pass
    return fn


def is_batched(fn) -> bool:
    """TRL's reward signature, ``fn(completions, **kwargs) -> list[float]``: one call for all the
    responses, with ``prompts`` and every dataset column as lists (recognised by its first
    parameter's name, ``completions``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "completions"
