"""What a task is: problems with a verifiable answer, a train stream, a held-out split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    prompt: str          # the text the policy continues
    answer: str          # the reference answer the verifier checks against
    solution: str = ""   # a teacher solution (response text) for cold-start SFT
    level: int = 0       # difficulty level (0 = unknown)


class Task(Protocol):
    name: str

    def train_problem(self, index: int) -> Problem:
        """The index-th problem of the training stream (deterministic: resumable)."""
        ...

    def eval_problems(self) -> list[Problem]:
        """The held-out evaluation split (disjoint from the training stream)."""
        ...

    def reward(self, response: str, problem: Problem) -> float:
        """Verifier: 1.0 if the response's final answer is correct, else 0.0. May raise."""
        ...
