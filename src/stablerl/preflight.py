"""Checks made at start-up, before any sampling or training: every prompt fits (one over-long row
must never take the machine down), one step's rollout batch fits in memory, and train.compile has
the C++ compiler it needs on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stablerl.config import RunConfig
from stablerl.generation import encode_problem, encode_sft_row
from stablerl.tasks import Problem

# no tokenizer in use packs more characters than this into one token on average: a prompt longer
# than this many characters per allowed token is over-long without being tokenized (tokenizing a
# 10 MB row is itself what takes the memory)
MAX_CHARS_PER_TOKEN = 32


def prompt_limit(cfg: RunConfig, model_config) -> tuple[int, str]:
    """The longest prompt a run accepts, in tokens, and what sets it: ``task.max_prompt_tokens``,
    or the model's context less ``rollout.max_new_tokens`` when that is smaller (the hard limit)."""
    context = getattr(model_config, "max_position_embeddings", None)
    room = context - cfg.rollout.max_new_tokens if context else None
    if room is not None and room < 1:
        raise ValueError(
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {context} tokens; lower it"
        )
    if room is not None and room < cfg.task.max_prompt_tokens:
        return room, (
            f"the model's context ({context} tokens) less rollout.max_new_tokens ({cfg.rollout.max_new_tokens})"
        )
    return cfg.task.max_prompt_tokens, "task.max_prompt_tokens"


def over_long(
    problems: list[Problem], tokenizer, cfg: RunConfig, limit: int, lengths: dict | None = None
) -> list[tuple[Problem, int | None]]:
    """``(problem, its length in tokens)`` for every prompt longer than ``limit`` (None: rejected
    on its character count alone, never tokenized); ``lengths`` collects every measured length."""
    out = []
    for p in problems:
        if len(p.prompt) > MAX_CHARS_PER_TOKEN * limit:
            out.append((p, None))
            continue
        n = len(encode_problem(tokenizer, p, cfg.task))
        if lengths is not None:
            lengths[id(p)] = n
        if n > limit:
            out.append((p, n))
    return out


def check_sft_rows(problems: list[Problem], tokenizer, cfg: RunConfig, model_config) -> None:
    """The cold start's teacher rows (prompt + solution + EOS) against the model's context: a row
    longer than it would train positions the model does not declare, and a run of these settings
    would refuse the cold start only after it had trained (``check_prompts`` checks the prompts)."""
    context = getattr(model_config, "max_position_embeddings", None)
    if not context:
        return
    lengths = [
        (p, len(encode_sft_row(tokenizer, p, cfg.task.chat_template, cfg.task.system_prompt)[0]))
        for p in problems
        if p.solution
    ]
    over = [(p, n) for p, n in lengths if n > context]
    if over:
        p, n = max(over, key=lambda x: x[1])
        raise ValueError(
            f"{len(over)} of {len(lengths)} teacher rows checked are longer than the model's context "
            f"({context} tokens), the longest {n} tokens ({p.prompt[:60]!r}); raise model.max_positions "
            "(the default model) or use shorter solutions"
        )


def check_prompts(task, eval_sets, tokenizer, cfg: RunConfig, model_config, log=print) -> int:
    """Every prompt of the task (its held-out split, its training rows when it has a finite list,
    and every ``eval.sets`` entry) against the prompt limit; over-long rows stop the run naming
    the first ones, or with ``task.long_prompts=skip`` are dropped and counted. Returns the
    longest prompt kept, in tokens."""
    limit, why = prompt_limit(cfg, model_config)
    finite = getattr(task, "train_problems", None)
    groups = [("held-out", task.eval_problems())]
    groups += [("training", finite())] if finite else [("training", [task.train_problem(i) for i in range(8)])]
    groups += [(f"eval.sets[{s.cfg.name}]", s.problems) for s in eval_sets]
    lengths: dict[int, int] = {}
    found = [(name, p, n) for name, problems in groups for p, n in over_long(problems, tokenizer, cfg, limit, lengths)]
    longest = max((n for n in lengths.values() if n <= limit), default=1)
    if not found:
        return longest
    in_eval_sets = any(name.startswith("eval.sets") for name, _, _ in found)  # those cannot be skipped
    if cfg.task.long_prompts == "skip" and hasattr(task, "drop") and not in_eval_sets:
        bad = {id(p) for _, p, _ in found}
        n_train, n_eval = task.drop(lambda p: id(p) in bad)
        log(
            f"[warning] task.long_prompts=skip: dropped {n_train} training and {n_eval} held-out rows whose prompt "
            f"is over {limit} tokens ({why})"
        )
        return longest
    shown = "; ".join(
        f"{_where(p, name)}: " + (f"over {MAX_CHARS_PER_TOKEN * limit} characters" if n is None else f"{n} tokens")
        for name, p, n in found[:3]
    )
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    skip = "" if in_eval_sets else " or set task.long_prompts=skip to drop such rows"
    fix = (
        "lower rollout.max_new_tokens, raise model.max_positions (the default model)"
        if limit < cfg.task.max_prompt_tokens
        else "raise task.max_prompt_tokens (up to the model's context)"
    )
    raise ValueError(
        f"{len(found)} prompts are longer than {limit} tokens, the limit set by {why}: {shown}{more}; "
        f"shorten them, {fix}{skip}"
    )


def _where(p: Problem, group: str) -> str:
    return p.source or f"{group} prompt {p.prompt[:30]!r}"


# --------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_memory_bytes(cfg: RunConfig, model_config, ranks: int, prompt_tokens: int) -> int:
    """A lower estimate of what one step holds at its peak on one rank (CPU): sampling's KV cache
    and per-step logits for the rank's responses, or the training forward's logits and
    activations for one micro-batch — whichever is larger. Order of magnitude, not a promise."""
    B = cfg.batch.prompts_per_step * cfg.batch.group_size // max(1, ranks)
    T = prompt_tokens + cfg.rollout.max_new_tokens
    layers = getattr(model_config, "num_hidden_layers", 1)
    heads = getattr(model_config, "num_attention_heads", 1)
    kv_heads = getattr(model_config, "num_key_value_heads", heads)
    hidden = getattr(model_config, "hidden_size", 1)
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    vocab = getattr(model_config, "vocab_size", 1)
    engine_bytes = 4 if cfg.rollout.precision == "fp32" else 2
    kv_cache = 2 * layers * B * kv_heads * head_dim * T * engine_bytes
    logits = 4 * B * vocab * 4  # logits, filtered, log-softmax, noise: float32 each
    mb = min(B, cfg.batch.micro_batch_size)
    train = mb * T * (3 * vocab * 4 + 16 * layers * hidden * 4)
    return max(kv_cache + logits, train)


def check_memory(cfg: RunConfig, model_config, ranks: int, prompt_tokens: int) -> None:
    """A clear error, before any work, when one step cannot fit in this machine's memory."""
    need, have = step_memory_bytes(cfg, model_config, ranks, prompt_tokens), available_memory()
    if have is None or need <= 0.9 * have:
        return
    gib = 2**30
    raise ValueError(
        f"one step would need about {need / gib:.1f} GiB per process (batch.prompts_per_step="
        f"{cfg.batch.prompts_per_step} x batch.group_size={cfg.batch.group_size} responses of up to "
        f"{prompt_tokens} + {cfg.rollout.max_new_tokens} tokens over {ranks} rank(s)), but "
        f"{have / gib:.1f} GiB is available; lower batch.prompts_per_step, batch.micro_batch_size or "
        "rollout.max_new_tokens, or spread the batch over more ranks"
    )


def check_compiler(cfg: RunConfig, device: torch.device) -> None:
    """``train.compile`` on CPU and ``rollout.compile`` (the local engine runs on CPU) need a C++
    compiler (inductor builds its kernels with one): a clear error before any work where there is
    none, instead of a traceback at the first update or rollout."""
    keys = [
        k
        for k, on in (
            ("train.compile", cfg.train.compile and device.type == "cpu"),
            ("rollout.compile", cfg.rollout.compile and cfg.rollout.engine == "local"),
        )
        if on
    ]
    if not keys:
        return
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    on, off = " and ".join(f"{k}=true" for k in keys), " and ".join(f"{k}=false" for k in keys)
    try:
        compiler = cpp_builder.get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ValueError(
            f"{on} needs a C++ compiler on CPU (torch.compile builds its kernels with one) and none "
            f"works here (torch looked for $CXX, then g++); install g++ (e.g. apt-get install g++) or set {off}"
        ) from None
    error = compiler_error(compiler)
    if error:
        raise ValueError(
            f"{on}: the C++ compiler {compiler} cannot build a shared library ({error}), which torch.compile "
            f"needs on CPU; fix it (or point $CXX at one that works) or set {off}"
        )


def compiler_error(compiler: str) -> str:
    """'' when ``compiler`` builds a tiny shared library as inductor builds its kernels, else the
    first line of what it printed (a compiler that answers --version may still fail to build)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text('extern "C" int stablerl_probe(int x) { return x + 1; }\n')
        try:
            done = subprocess.run(
                [compiler, "-shared", "-fPIC", "-O0", str(src), "-o", str(Path(tmp) / "probe.so")],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
    if done.returncode == 0:
        return ""
    lines = (done.stderr or done.stdout).strip().splitlines()
    return (lines[0][:200] if lines else "") or f"exit status {done.returncode}"
