"""The built-in task: multi-step addition with a short worked solution.

A problem at level L adds L + 1 numbers in [0, 99]:

    prompt   "17+25+8="
    steps    "17+25=42;42+8=50#50"      (teacher style 'steps', the default)
    direct   "#50"                       (style 'direct': the answer only)
    noisy    like 'steps', but 30% of solutions carry one arithmetic slip (style 'noisy')
    columns  "7+5+8+0=20;1+2+0+2=5#50"  (style 'columns': digit by digit from the units, each column's
             digits plus the carry in; the answer is the last digit of every column's sum)
    noisy_columns  like 'columns', but 30% of solutions carry one slip in a column's sum

The column styles are the long-reasoning ones: a worked solution of level L with d-digit numbers
is d columns of 2(L + 1) + ~4 characters (tokens, for the character-level default tokenizer):
level 5 with ``max_operand`` 999999 runs 109 tokens (99999: 91), and the answer depends on
every step.

The reward is 1 iff the text after the last '#' is exactly the correct sum. Problems are generated
from a seed, so the training stream is infinite and reproducible; the held-out split is a fixed
set of prompts that the training stream skips.
"""

from __future__ import annotations

import random

from stablerl.tasks.base import Problem
from stablerl.tasks.verifiers import ARITHMETIC, arithmetic_answer

STYLES = ("steps", "direct", "noisy", "columns", "noisy_columns")


class ArithmeticTask:
    name = "arithmetic"
    reward_fns = [ARITHMETIC]

    def __init__(
        self,
        levels: list[int] = (1, 2, 3),
        style: str = "steps",
        eval_size: int = 200,
        seed: int = 0,
        max_operand: int = 99,
    ):
        if style not in STYLES:
            raise ValueError(f"unknown teacher style {style!r}; allowed: {', '.join(STYLES)}")
        if not levels or any(not 1 <= lv <= 6 for lv in levels):
            raise ValueError(f"levels must be a non-empty list of integers in [1, 6], got {list(levels)}")
        self.levels, self.style, self.seed, self.max_operand = list(levels), style, seed, max_operand
        rng = random.Random(f"eval-{seed}")
        self._eval: list[Problem] = []
        seen: set[str] = set()
        while len(self._eval) < eval_size:
            p = self._make(rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                self._eval.append(p)
        self._eval_prompts = seen

    def _make(self, rng: random.Random) -> Problem:
        level = rng.choice(self.levels)
        nums = [rng.randint(0, self.max_operand) for _ in range(level + 1)]
        prompt = "+".join(map(str, nums)) + "="
        total = sum(nums)
        return Problem(prompt=prompt, answer=str(total), solution=self._solution(nums, rng), level=level)

    def _solution(self, nums: list[int], rng: random.Random) -> str:
        if self.style == "direct":
            return f"#{sum(nums)}"
        if self.style in ("columns", "noisy_columns"):
            return column_solution(nums, rng, slip_rate=0.3 if self.style == "noisy_columns" else 0.0)
        slip = rng.randrange(len(nums) - 1) if self.style == "noisy" and rng.random() < 0.3 else -1
        steps, acc = [], nums[0]
        for i, n in enumerate(nums[1:]):
            new = acc + n + (rng.choice([-10, -1, 1, 10]) if i == slip else 0)
            steps.append(f"{acc}+{n}={new}")
            acc = new
        return ";".join(steps) + f"#{acc}"

    def train_problem(self, index: int) -> Problem:
        rng = random.Random(f"train-{self.seed}-{index}")
        while True:  # the held-out prompts never appear in training
            p = self._make(rng)
            if p.prompt not in self._eval_prompts:
                return p

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def reward(self, response: str, problem: Problem) -> float:
        return arithmetic_answer(problem.prompt, response, **problem.reward_fields())


def column_solution(nums: list[int], rng: random.Random, slip_rate: float = 0.0) -> str:
    """Column addition from the units: ``d1+d2+...+dn+carry=sum`` per column (a number without
    that digit contributes 0), ``;`` between columns, then ``#`` and the answer the columns give
    (every column sum's last digit, and the final carry in front). With probability
    ``slip_rate`` one column's sum is off by one and the rest follows from it, so the answer is
    wrong the way a slip makes it wrong."""
    width = len(str(max(nums)))
    digits = [str(n).zfill(width)[::-1] for n in nums]  # units first
    slip = rng.randrange(width) if slip_rate and rng.random() < slip_rate else -1
    steps, out, carry = [], [], 0
    for col in range(width):
        column = [int(d[col]) for d in digits]
        total = sum(column) + carry + (rng.choice([-1, 1]) if col == slip else 0)
        total = max(total, 0)
        steps.append("+".join(map(str, column)) + f"+{carry}={total}")
        out.append(str(total % 10))
        carry = total // 10
    answer = (str(carry) if carry else "") + "".join(reversed(out))
    return ";".join(steps) + f"#{int(answer)}"
