"""What a task is: problems with a verifiable answer, a train stream, a held-out split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    prompt: str  # the text the policy continues
    answer: str  # the reference answer the verifier checks against
    solution: str = ""  # a teacher solution (response text) for cold-start SFT
    level: int = 0  # difficulty level (0 = unknown)
    fields: dict = field(default_factory=dict, compare=False)  # the row's other columns, for reward fns
    source: str = field(default="", compare=False)  # where it came from, for messages ("data.jsonl row 7")
    messages: tuple = field(default=(), compare=False)  # a chat prompt (TRL's conversational format): its turns

    def reward_fields(self) -> dict:
        """The keyword arguments of a reward function call: ``answer`` and the row's columns
        (``prompt`` and ``completion`` are the call's positional arguments, so never fields)."""
        extra = {k: v for k, v in self.fields.items() if k not in ("prompt", "completion")}
        return {**extra, "answer": self.answer}


class Task(Protocol):
    name: str
    reward_fns: list[str]  # the task's verifier(s), as import paths (stablerl.tasks.verifiers)

    def train_problem(self, index: int) -> Problem:
        """The index-th problem of the training stream (deterministic: resumable)."""
        ...

    def eval_problems(self) -> list[Problem]:
        """The held-out evaluation split (disjoint from the training stream)."""
        ...

    def reward(self, response: str, problem: Problem) -> float:
        """The verifier called in this process (tests, quick checks); training and evaluation
        score through ``stablerl.tasks.reward.RewardPool``. May raise."""
        ...
