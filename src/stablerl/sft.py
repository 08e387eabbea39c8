"""Cold start: supervised fine-tuning on teacher solutions.

The loss is the mean token cross-entropy of ``solution + EOS`` given ``BOS + prompt`` (prompt
tokens are not trained on). The result is saved as an HF checkpoint (safetensors) plus the
tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``.

A long cold start (the long-reasoning task's takes most of an hour on a CPU core) is resumable:
every ``sft.checkpoint_every`` steps its whole state (weights, AdamW moments, schedule, losses) is
written atomically next to the cache directory, and a cold start that finds it goes on from there to
the state an uninterrupted one reaches (bit-identical within a process, tests/test_rundir.py; across
processes SFT on CPU differs at round-off anyway, docs/training.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from pathlib import Path

import torch

from stablerl.checkpoint import save_model_dir
from stablerl.config import DEFAULT_CONTEXT
from stablerl.generation import encode_sft_row
from stablerl.models import build_default_policy, build_tokenizer
from stablerl.preflight import check_prompts, check_sft_rows
from stablerl.rundir import atomic_write_bytes, waiting_lock
from stablerl.tasks.base import Problem, Task

# SFT draws the task's stream from here on, so SFT and RL see different problems
SFT_STREAM_OFFSET = 10_000_000


def sft_batch(
    tokenizer, problems: list[Problem], chat_template: bool = False, system_prompt: str | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the solution)."""
    rows, labels = [], []
    for p in problems:
        if not p.solution:
            raise ValueError(f"problem {p.prompt!r} has no teacher solution to fine-tune on")
        row, label = encode_sft_row(tokenizer, p, chat_template, system_prompt)
        rows.append(row)
        labels.append(label)
    T = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (T - len(r)) for r in labels])
    return {
        "input_ids": ids,
        "attention_mask": (torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]).long(),
        "labels": lab,
    }


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )


def run_sft(
    model,
    tokenizer,
    task: Task,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup: int = 20,
    log_every: int = 50,
    log=print,
    chat_template: bool = False,
    system_prompt: str | None = None,
    state_path: Path | None = None,
    checkpoint_every: int = 0,
    settings: dict | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place on ``task``'s training stream; returns the loss per step.

    AdamW with linear warm-up then cosine decay to 10% of ``lr``. Problems are drawn from the
    task's stream at indices offset by a large constant, so SFT and RL see different problems.

    With ``state_path`` and ``checkpoint_every`` > 0 the state is saved there every that many
    steps, and a state found there at the start is resumed from (it must have been written with
    the same ``settings``: what the cold start depends on).
    """
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    losses, first = [], 0
    if state_path is not None and Path(state_path).is_file():
        first, losses = _load_sft_state(Path(state_path), model, opt, schedule, settings)
        if log:
            log(f"[sft] resuming at step {first}/{steps} from {state_path}")
    t0 = time.perf_counter()
    for step in range(first, steps):
        problems = [task.train_problem(SFT_STREAM_OFFSET + step * batch_size + i) for i in range(batch_size)]
        batch = sft_batch(tokenizer, problems, chat_template, system_prompt)
        _check_context(batch, model.config, step)
        loss = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % log_every == 0:
            log(
                f"[sft] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
        if state_path is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_sft_state(Path(state_path), step + 1, losses, model, opt, schedule, settings)
    model.eval()
    return losses


def _check_context(batch: dict, config, step: int) -> None:
    """A teacher row longer than the model's context is an error naming the way out."""
    context = getattr(config, "max_position_embeddings", None)
    if context and batch["input_ids"].shape[1] > context:
        raise ValueError(
            f"SFT step {step}: a teacher row of {batch['input_ids'].shape[1]} tokens is longer than "
            f"the model's context ({context} tokens); raise model.max_positions (the default model) "
            "or use shorter solutions"
        )


def _save_sft_state(path: Path, step: int, losses: list[float], model, opt, schedule, settings: dict | None) -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "step": step,
            "losses": losses,
            "settings": settings,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": schedule.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buf,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _load_sft_state(path: Path, model, opt, schedule, settings: dict | None) -> tuple[int, list[float]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        raise ValueError(
            f"{path} holds a partial cold start of other settings ({_differing(state.get('settings'), settings)} "
            "differ); remove it, or set sft.output_dir to another directory"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), list(state["losses"])


def _differing(saved, wanted) -> str:
    """The settings (``section.key``) in which two cold-start keys (``_sft_key``, parsed) differ."""
    if not (isinstance(saved, list) and isinstance(wanted, list) and len(saved) == len(wanted) == 3):
        return "all settings"
    names = [
        f"{section}.{k}"
        for section, a, b in zip(("model", "task", "sft"), saved, wanted)
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return ", ".join(names) or "the settings"


SFT_TASK_KEYS = {
    "name",
    "levels",
    "style",
    "seed",
    "max_operand",
    "dataset",
    "dataset_config",
    "split",
    "eval_dataset",
    "eval_split",
    "columns",
    "prompt_template",
    "chat_template",
    "system_prompt",
}
SFT_NOT_IN_KEY = {"output_dir", "checkpoint_every"}


def sft_output_dir(cfg) -> Path:
    """Where the cold start of ``cfg`` (a RunConfig) is cached: keyed on the model, the task and
    the SFT settings — and on the *content* of the task's data files, so editing a data file
    gives a new cold start instead of silently reusing the old one."""
    if cfg.sft.output_dir:
        return Path(cfg.sft.output_dir)
    return Path("runs") / "sft" / hashlib.sha256(_sft_key(cfg).encode()).hexdigest()[:12]


def _sft_key(cfg) -> str:
    """What a cold start depends on: the model, the task's SFT data (not the reward functions, the
    held-out size or the pool), the SFT settings (not where it is saved, nor how often its partial
    state is)."""
    task = cfg.task.model_dump(include=SFT_TASK_KEYS)
    for key in ("dataset", "eval_dataset"):
        if task.get(key):
            task[key] = _data_digest(task[key])
    # the default context and family are left out, so cold starts trained before model.max_positions
    # and model.family existed keep their keys; any other is a different model and gets its own
    defaults = {"max_positions": DEFAULT_CONTEXT, "family": "qwen3_moe"}
    model = cfg.model.model_dump(exclude={k for k, v in defaults.items() if getattr(cfg.model, k) == v})
    return json.dumps([model, task, cfg.sft.model_dump(exclude=SFT_NOT_IN_KEY)], sort_keys=True)


def sft_state_path(out: Path) -> Path:
    """Where the partial state of the cold start cached at ``out`` lives while it trains."""
    return out.with_name(out.name + ".partial.pt")


def _data_digest(source: str) -> str:
    """The content of a local data file or directory (every file in it), or a hub id as given."""
    p = Path(source).expanduser()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    if not files:
        return source
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(p) if p.is_dir() else "").encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cold_start(cfg, task: Task, log=print) -> Path:
    """The SFT checkpoint for ``cfg`` (trained and saved the first time, reused afterwards)."""
    out = sft_output_dir(cfg)
    if (out / "config.json").is_file():
        log(f"[cold start] reusing {out}")
        return out
    check_teacher_solutions(cfg, task)
    # several processes may need the same cold start at once (`stablerl repro` side by side): one
    # trains it, the others wait for it and reuse it
    with waiting_lock(
        out.with_name(out.name + ".lock"),
        on_wait=lambda: log(f"[cold start] another process is training {out}; waiting for it"),
    ):
        if (out / "config.json").is_file():
            log(f"[cold start] reusing {out}")
            return out
        return _train_cold_start(cfg, task, out, log)


def check_teacher_solutions(cfg, task: Task) -> None:
    """Every training row of a finite task has a teacher solution, or a one-line error naming
    task.columns.solution and model.path: checked before anything is built or written (the SFT
    would stop at its first batch)."""
    finite = getattr(task, "train_problems", None)
    unsolved = [p for p in finite() if not p.solution] if finite else []
    if unsolved:
        raise ValueError(
            f"the cold start (no model.path) fine-tunes on teacher solutions, but {len(unsolved)} training "
            f"rows have none in task.columns.solution={cfg.task.columns.solution!r} (e.g. {unsolved[0].source}); "
            "set task.columns.solution to your data's solution column, or model.path to a model to train"
        )


def _train_cold_start(cfg, task: Task, out: Path, log) -> Path:
    log(f"[cold start] building the tiny {cfg.model.family} model and checking the task's rows")
    tokenizer = build_tokenizer()
    model = build_default_policy(cfg.model, tokenizer)
    # before any step: the prompts a run of these settings would refuse, and a dataset's teacher rows
    # the model's context cannot hold (a stream's rows run_sft checks step by step, from step 0)
    check_prompts(task, [], tokenizer, cfg, model.config, log)
    finite = getattr(task, "train_problems", None)
    if finite:
        check_sft_rows(finite(), tokenizer, cfg, model.config)
    log(
        f"[cold start] SFT of the tiny {cfg.model.family} model "
        f"({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"for {cfg.sft.steps} steps -> {out}"
    )
    state = sft_state_path(out)
    run_sft(
        model,
        tokenizer,
        task,
        steps=cfg.sft.steps,
        batch_size=cfg.sft.batch_size,
        lr=cfg.sft.lr,
        seed=cfg.sft.seed,
        log=log,
        chat_template=cfg.task.chat_template,
        system_prompt=cfg.task.system_prompt,
        state_path=state,
        checkpoint_every=cfg.sft.checkpoint_every,
        settings=json.loads(_sft_key(cfg)),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = save_model_dir(out, model, tokenizer)
    state.unlink(missing_ok=True)  # the finished checkpoint supersedes it
    return saved
