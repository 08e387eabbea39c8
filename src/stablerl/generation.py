"""Encode -> generate -> decode -> score: the one way stablerl samples responses and rewards them
(the RL loop's rollouts, held-out evaluation), whatever the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stablerl.config import SamplingConfig, TaskConfig
from stablerl.rollout.base import RolloutBatch, RolloutEngine
from stablerl.tasks import Problem, RewardPool, RewardResult


def encode_problem(tokenizer, problem, task: TaskConfig) -> list[int]:
    """The token ids of a problem's prompt: its chat turns when it has them (TRL's conversational
    format), else its text as ``task`` says (chat template or BOS + text)."""
    return _prompt_ids(tokenizer, problem, task.chat_template, task.system_prompt)


def _prompt_ids(tokenizer, problem, chat_template: bool, system_prompt: str | None) -> list[int]:
    if problem.messages:
        return encode_messages(tokenizer, list(problem.messages), system_prompt)
    return encode_prompt(tokenizer, problem.prompt, chat_template, system_prompt)


def encode_sft_row(
    tokenizer, problem, chat_template: bool = False, system_prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """A cold start's teacher row: the prompt's tokens then the solution's and EOS, and its labels
    (-100 on the prompt, where the SFT takes no loss)."""
    prompt = _prompt_ids(tokenizer, problem, chat_template, system_prompt)
    target = tokenizer(problem.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + target, [-100] * len(prompt) + target


def encode_messages(tokenizer, messages: list[dict], system_prompt: str | None = None) -> list[int]:
    """Chat turns through the tokenizer's chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the prompts are chat messages (a conversational prompt column), but the model's tokenizer "
            "has no chat template; use a tokenizer that has one, or plain-text prompts"
        )
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_prompt(tokenizer, prompt: str, chat_template: bool = False, system_prompt: str | None = None) -> list[int]:
    """The token ids the policy continues: ``BOS + prompt`` (the prompt alone for a tokenizer
    without BOS), or with ``chat_template`` the
    tokenizer's chat template around it (an optional system turn, the prompt as the user's turn,
    then the assistant's turn opened), as instruct models were trained."""
    if not chat_template:
        # tokenizers without a BOS token (Qwen's: bos_token null) start with the prompt itself
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        return bos + tokenizer(prompt, add_special_tokens=False).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "task.chat_template=true, but the model's tokenizer has no chat template; set "
            "task.chat_template=false or use a tokenizer that has one"
        )
    return encode_messages(tokenizer, [{"role": "user", "content": prompt}], system_prompt)


def prompt_turns(problem, task: TaskConfig) -> tuple:
    """The chat turns the model saw, when its prompt went through a chat template (chat-turn
    prompts, or ``task.chat_template``); ``()`` for a plain-text prompt. TRL-style reward
    functions get them as ``prompts`` and their completions as turns too (reward.py)."""
    if not (problem.messages or task.chat_template):
        return ()
    turns = list(problem.messages) or [{"role": "user", "content": problem.prompt}]
    if task.system_prompt and not any(m["role"] == "system" for m in turns):
        turns = [{"role": "system", "content": task.system_prompt}, *turns]
    return tuple(turns)


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    return [
        tokenizer.decode(batch.response_ids[i][batch.response_mask[i]], skip_special_tokens=True)
        for i in range(len(batch))
    ]


@dataclass
class Scored:
    """``n`` samples of each problem, in problem order: the batch (rewards set, and how it was
    sampled), the decoded texts and the reward pool's result."""

    batch: RolloutBatch
    texts: list[str]
    result: RewardResult


def sample_and_score(
    engine: RolloutEngine,
    tokenizer,
    problems: list[Problem],
    n: int,
    rewards: RewardPool,
    sampling: SamplingConfig,
    seeds: list[int],
    task: TaskConfig,
    *,
    capture_routes: bool = False,
) -> Scored:
    """Sample ``n`` responses to each of ``problems`` (response ``i * n + j`` is problem ``i``'s
    ``j``-th, with seed ``seeds[i * n + j]``) and score them in the reward pool."""
    encoded = [encode_problem(tokenizer, p, task) for p in problems]
    batch = engine.generate(
        [e for e in encoded for _ in range(n)], sampling, seeds=seeds, capture_routes=capture_routes
    )
    batch.sampling = sampling  # the learner reads temperature and length limit from the batch
    texts = decode_responses(tokenizer, batch)
    turns = [prompt_turns(p, task) for p in problems]
    result = rewards.score(
        [
            (p.prompt, t, p.reward_fields(), c)
            for (p, c), t in zip(((p, c) for p, c in zip(problems, turns) for _ in range(n)), texts)
        ]
    )
    batch.rewards = torch.tensor(result.total)
    return Scored(batch, texts, result)
