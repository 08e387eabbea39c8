"""Tiny model configurations built locally (nothing is downloaded), and model helpers.

The default is a tiny Qwen3-MoE; a tiny config of every MoE family routing replay supports
(``stablerl.families``) and a dense Qwen3 exist so routing and the engines are tested on each.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from stablerl.config import DEFAULT_CONTEXT
from stablerl.families import FAMILIES as MOE_FAMILIES
from stablerl.families import tiny_common, tiny_family_config
from stablerl.moe import use_fast_experts
from stablerl.routing import moe_routers
from stablerl.rundir import RunDir

# every MoE family of stablerl.families, and a dense Qwen3
FAMILIES = (*MOE_FAMILIES, "qwen3")


def tiny_config(
    family: str = "qwen3_moe",
    vocab_size: int = 64,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    expert_size: int = 64,
    max_positions: int = 512,
    **overrides,
) -> PretrainedConfig:
    """A tiny HF config of ``family``; ``overrides`` are passed to the config class."""
    if family == "qwen3":
        from transformers import Qwen3Config

        common = tiny_common(vocab_size, hidden_size, num_layers, max_positions)
        cfg = Qwen3Config(**common, intermediate_size=2 * expert_size, head_dim=hidden_size // 4)
    elif family in FAMILIES:
        cfg = tiny_family_config(
            family,
            vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_experts=num_experts,
            top_k=top_k,
            expert_size=expert_size,
            max_positions=max_positions,
        )
    else:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def is_moe(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a Mixture-of-Experts model whose routes stablerl can capture and replay."""
    try:
        moe_routers(model)
    except ValueError:
        return False
    return True


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of an HF causal LM (the unit of FSDP sharding and of activation
    checkpointing)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def build_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A freshly initialized causal LM from ``config`` (deterministic given ``seed``), MoE experts
    on stablerl's training kernel (``stablerl.moe``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return use_fast_experts(model)


def model_skeleton(config: PretrainedConfig):
    """The model of ``config`` on the meta device: its structure (modules, experts implementation,
    config) without memory for weights — for a rank that receives its shards from another
    (distributed/fsdp.py) and for an engine that gets its weights streamed in."""
    with torch.device("meta"):
        return build_model(config)


def load_model(path, dtype: torch.dtype = torch.float32):
    """An HF checkpoint (a local directory, or a hub id: the HF cache, or a download where the
    network allows) as a causal LM, MoE experts on stablerl's training kernel."""
    check_model_dir(path)
    try:
        return use_fast_experts(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    except (OSError, ValueError, KeyError) as e:
        if is_hub_id(path):
            raise ValueError(hub_error("model.path", str(path), e)) from None
        raise ValueError(f"model.path {str(path)!r} could not be loaded as a causal LM: {e}") from None


def is_hub_id(path) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face Hub repository id."""
    from pathlib import Path

    text = str(path)
    return (
        text.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and not Path(text).exists()
        and all(part and " " not in part for part in text.split("/"))
    )


def hub_error(key: str, repo: str, e: BaseException, repo_type: str = "model") -> str:
    """What to do when a hub id cannot be fetched (typically: no network here)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return (
        f"{key} {repo!r} is not a local directory and could not be fetched from the Hugging Face Hub "
        f"({first[:200]}); on a machine with network: `hf download {repo}{kind} --local-dir DIR`, then set "
        f"{key}=DIR"
    )


def check_model_dir(path, key: str = "model.path", weights: bool = True) -> None:
    """A clear error unless ``path`` is a local HF model directory or a hub id (which
    ``from_pretrained`` resolves from the HF cache or, where the network allows, the hub)."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        if is_hub_id(path) and key == "model.path":
            return
        raise ValueError(
            f"{key} {str(path)!r} does not exist; give a local HF checkpoint directory "
            "(config.json + weights + tokenizer)"
        )
    run = RunDir(p)
    if run.looks_like_run():
        raise ValueError(
            f"{key} {str(path)!r} is a stablerl run directory, not a model; give one of its HF "
            f"exports, RUN_DIR/export/step_N ({_export_hint(run, None)})"
        )
    # RUN_DIR/checkpoints/step_N: its structure and tokenizer serve (a rollout worker's), not its weights
    if weights and (p / "state.json").is_file() and (p / "dcp").is_dir():
        step = int(p.name.removeprefix("step_")) if p.name.removeprefix("step_").isdigit() else None
        raise ValueError(
            f"{key} {str(path)!r} is a training checkpoint (sharded weights and optimizer state for "
            f"--resume), not an HF model; give the run's HF export, RUN_DIR/export/step_N "
            f"({_export_hint(RunDir(p.parent.parent), step)})"
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"{key} {str(path)!r} is not an HF model directory (no config.json)")


def _export_hint(run: RunDir, step: int | None) -> str:
    """Which export of ``run`` to give instead: the one of ``step`` when it exists, else the newest."""
    exports = sorted(run.exports.glob("step_*")) if run.exports.is_dir() else []
    if step is not None and run.export(step).is_dir():
        return f"{run.export(step)}"
    if exports:
        return f"e.g. {exports[-1]}"
    return "it has none yet: runs export at their end and every checkpoint.export_every steps"


def load_policy(path, weights: bool = True):
    """Model and tokenizer of an HF checkpoint directory (the tokenizer gets a pad token).
    ``weights=False``: the model as a meta-device skeleton (its structure from the config, no
    memory for weights), for a rank that receives its shards from another (distributed/fsdp.py)."""
    from transformers import AutoConfig, AutoTokenizer

    if weights:
        model = load_model(path)
    else:
        check_model_dir(path, weights=False)
        model = model_skeleton(AutoConfig.from_pretrained(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        if is_hub_id(path):
            raise ValueError(hub_error("model.path", str(path), e)) from None
        raise ValueError(f"model.path {str(path)!r} has no usable tokenizer: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, add_bos_on_encode(tokenizer)


def add_bos_on_encode(tokenizer):
    """Make ``tokenizer(text)`` start with BOS when the tokenizer has one, as the trainer encodes
    prompts (``generation.encode_prompt``): an exported tokenizer then encodes a prompt under plain
    HF use exactly as training did. Tokenizers that add it already, or have no BOS, are unchanged."""
    bos = tokenizer.bos_token_id
    if bos is None or not hasattr(tokenizer, "_tokenizer") or tokenizer("a").input_ids[:1] == [bos]:
        return tokenizer
    from tokenizers.processors import TemplateProcessing

    token = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A $B:1", special_tokens=[(token, bos)]
    )
    return tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each sequence's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------
# The default tokenizer: character level over printable ASCII, built locally with `tokenizers`
# and wrapped as a `transformers` fast tokenizer, so `save_pretrained` / `AutoTokenizer` work.
# --------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return add_bos_on_encode(tokenizer)


# a small chat template for the default tokenizer (task.chat_template=true), in the usual shape:
# BOS, one "[role] content" line per turn, then the assistant's turn opened
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def build_default_policy(model_cfg, tokenizer):
    """The default tiny MoE shaped by the config's ``model`` section, freshly initialized."""
    m = model_cfg
    config = default_model_config(
        tokenizer,
        family=m.family,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_experts=m.num_experts,
        top_k=m.top_k,
        expert_size=m.expert_size or m.hidden_size,
        max_positions=m.max_positions,
    )
    return build_model(config, seed=m.init_seed)


def default_model_config(tokenizer, **overrides) -> PretrainedConfig:
    """The default policy: a tiny Qwen3-MoE (4 layers, 8 experts, top-2; ``family`` another MoE family)
    over ``tokenizer``."""
    settings = dict(
        family="qwen3_moe",
        hidden_size=96,
        num_layers=4,
        num_experts=8,
        top_k=2,
        expert_size=96,
        max_positions=DEFAULT_CONTEXT,
    )
    settings.update(overrides)
    family = settings.pop("family")
    return tiny_config(
        family,
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **settings,
    )
