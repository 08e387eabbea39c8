"""LoRA adapters through `peft` (``model.lora``; docs/lora.md).

``apply_lora`` injects peft's LoRA layers into the HF model in place (``peft.get_peft_model``) and
freezes everything else: the model object stays the HF causal LM, so sharding, routing capture and
replay, activation checkpointing and compilation see the structure they know. The attention and
dense MLP projections get peft's ``lora.Linear``; a MoE model's packed experts get peft's
``ParamWrapper`` (``target_parameters``: one rank-r adapter per expert, applied to the packed
weight on every forward). The routers stay frozen unless ``model.lora.train_router``; they score
the LoRA-adapted hidden states either way, so routing replay is unchanged.

With LoRA the KL reference is the base itself with the adapters switched off (``adapters_off``):
no second copy of the model. The engines get the merged weights (``merged_weights``: base +
scaling x B A under the base's names); checkpoints hold the trained tensors only, with a
fingerprint of the base they belong to (``base_digest``); exports are peft adapter directories
(``save_adapter``) that ``peft.PeftModel.from_pretrained`` loads onto the base.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from stablerl.config import LoraConfig

ADAPTER = "default"  # peft's adapter name: one adapter per run
BASE_FILE = "lora_base.json"  # in a checkpoint: the base's fingerprint and the adapters' settings
_SAMPLE = 1 << 16  # elements of each tensor the fingerprint reads


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries peft LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _packed_experts(model: nn.Module) -> list[str]:
    """``target_parameters`` suffixes of the packed experts (``mlp.experts.gate_up_proj`` ...)."""
    found: list[str] = []
    for name, module in model.named_modules():
        for param in ("gate_up_proj", "down_proj"):
            p = getattr(module, param, None)
            if isinstance(p, nn.Parameter) and p.dim() == 3:
                suffix = f"{name.split('.')[-2]}.{name.split('.')[-1]}.{param}" if "." in name else f"{name}.{param}"
                if suffix not in found:
                    found.append(suffix)
    return found


def peft_config(model: nn.Module, cfg: LoraConfig):
    """The ``peft.LoraConfig`` of ``model.lora`` for this model: the named linear layers it has
    (never the LM head) and, on a MoE with ``experts``, the packed experts' weights."""
    from peft import LoraConfig as PeftLoraConfig

    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = [t for t in cfg.target_modules if t in linear and t != "lm_head"]
    params = _packed_experts(model) if cfg.experts else []
    if not modules and not params:
        raise ValueError(
            f"model.lora.target_modules {cfg.target_modules} match no linear layer of this "
            f"{model.config.model_type} model (it has {sorted(linear - {'lm_head'})})"
        )
    if params and cfg.dropout > 0:
        raise ValueError(
            f"model.lora.dropout={cfg.dropout}: peft's adapters on packed expert weights take no dropout; "
            "set model.lora.dropout=0, or model.lora.experts=false"
        )
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=modules or None,
        target_parameters=params or None,
        bias="none",
    )


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0, base_dtype: torch.dtype | None = None) -> nn.Module:
    """Inject LoRA into ``model`` in place and freeze all but the adapters (and the routers with
    ``train_router``); returns the same model object. The adapters' A matrices are drawn from
    ``seed`` (B = 0: the model starts as the base). ``base_dtype``: the frozen base's storage dtype
    (the adapters stay fp32). Works on a meta-device skeleton too (a rank that receives its shards)."""
    from peft import get_peft_model

    config = peft_config(model, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, adapter_name=ADAPTER)
    model = peft_model.get_base_model()
    if cfg.train_router:
        from stablerl.models import is_moe
        from stablerl.routing import moe_routers

        if not is_moe(model):
            raise ValueError("model.lora.train_router: this model has no MoE routers; set it to false")
        for router in moe_routers(model):
            router.requires_grad_(True)
    if base_dtype is not None:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(base_dtype)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Forwards inside compute the base alone (peft's ``disable_adapter``, layer by layer): the KL
    reference of a LoRA run."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


# --------------------------------------------------------------------------------------------
# Merged weights: what an engine loads
# --------------------------------------------------------------------------------------------
def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


def delta_weight(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """scaling x B A in the layout of the weight ``layer`` adapts, from full A and B (peft's own
    ``get_delta_weight`` reads the module's parameters, which may be shards)."""
    from peft.tuners.lora import ParamWrapper

    scaling = layer.scaling[ADAPTER]
    dtype = torch.promote_types(A.dtype, torch.float32)
    A, B = A.to(dtype), B.to(dtype)
    if not isinstance(layer, ParamWrapper) or layer.num_experts == 1:
        return (B @ A * scaling).reshape(B.shape[0], A.shape[1])
    E = layer.num_experts
    A3 = A.reshape(E, -1, A.shape[-1])  # [E, r, in]
    B3 = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # [E, out, r]
    delta = torch.bmm(B3, A3) * scaling  # [E, out, in]
    return delta if layer._did_swap_in_out_features else delta.transpose(1, 2)


def merged_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream ``tensors`` (``(name, full tensor)`` of the LoRA model's state dict, e.g.
    ``fsdp.iter_full_tensors``) as the plain model's: every adapted weight W + scaling x B A (in
    fp32, returned in W's dtype), under the base model's names; the adapters themselves dropped.
    A LoRA layer's tensors are held until its last one has arrived, then released."""
    layers = _lora_layers(model)
    owners = sorted(layers, key=len)
    # the outermost LoRA layer holding each state-dict key: its group is merged when complete
    keys = list(model.state_dict().keys())
    owner_of = {k: next((o for o in owners if k.startswith(o + ".")), None) for k in keys}
    remaining: dict[str, int] = {}
    for o in owner_of.values():
        if o is not None:
            remaining[o] = remaining.get(o, 0) + 1
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        owner = owner_of.get(name)
        if owner is None:
            yield name, t
            continue
        group = held.setdefault(owner, {})
        group[name] = t
        remaining[owner] -= 1
        if remaining[owner] == 0:
            yield from _merge_group(owner, held.pop(owner), layers)


def _merge_group(owner: str, group: dict[str, torch.Tensor], layers: dict[str, nn.Module]):
    from peft.tuners.lora import ParamWrapper

    merged = {_base_name(k): v for k, v in group.items() if ".lora_" not in k}
    for name, layer in layers.items():
        if name != owner and not name.startswith(owner + "."):
            continue
        A, B = group[f"{name}.lora_A.{ADAPTER}.weight"], group[f"{name}.lora_B.{ADAPTER}.weight"]
        target = _base_name(name) + "." + (layer.parameter_name if isinstance(layer, ParamWrapper) else "weight")
        W = merged[target]
        delta = delta_weight(layer, A, B).to(W.device)
        merged[target] = (W.to(delta.dtype) + delta).to(W.dtype)
    yield from merged.items()


# --------------------------------------------------------------------------------------------
# The base's fingerprint, and peft adapter directories
# --------------------------------------------------------------------------------------------
def base_digest(model: nn.Module) -> str:
    """A fingerprint of the frozen base: every base tensor's name and shape, and the fp32 values of
    up to 65,536 evenly spaced elements of it (cheap for a 30B model, and any fine-tune of a base
    changes them). Computed on the plain base, before LoRA is applied."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        h.update(f"{_base_name(name)}:{tuple(t.shape)}".encode())
        h.update(flat[::step][:_SAMPLE].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def write_base_record(directory: Path, digest: str, cfg: LoraConfig, base: str) -> None:
    record = {"base_digest": digest, "base": base, "lora": cfg.model_dump(mode="json")}
    (Path(directory) / BASE_FILE).write_text(json.dumps(record, indent=1))


def check_base(ckpt: Path, digest: str, base: str) -> None:
    """Refuse to load adapters trained on another base (a clear error naming both)."""
    path = Path(ckpt) / BASE_FILE
    if not path.is_file():
        raise ValueError(f"{ckpt} holds no LoRA adapters ({BASE_FILE} is missing); it is not a model.lora checkpoint")
    saved = json.loads(path.read_text())
    if saved.get("base_digest") != digest:
        raise ValueError(
            f"{ckpt} holds adapters for the base {saved.get('base')!r} (digest {saved.get('base_digest')}), "
            f"but this run's base {base!r} has digest {digest}: LoRA adapters only apply to the base they "
            "were trained on; set model.path to that base"
        )


def adapter_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained tensors of ``full`` (a full state dict of the LoRA model) under peft's names."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=full, adapter_name=ADAPTER).items()
    }


def save_adapter(path: Path, model: nn.Module, full: dict[str, torch.Tensor], base: str | None = None) -> Path:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) that
    ``PeftModel.from_pretrained(base_model, path)`` loads; ``full`` is the LoRA model's full state
    dict. Trained routers (``train_router``) are not LoRA tensors: they are written whole to
    ``routers.safetensors`` beside it, under the base model's names."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER]
    config.base_model_name_or_path = base
    config.save_pretrained(str(path))
    tensors = {f"base_model.model.{k}": v for k, v in adapter_state_dict(model, full).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    if trained:
        routers = {_base_name(n): full[n].contiguous() for n in sorted(trained)}
        save_file(routers, str(path / "routers.safetensors"), metadata={"format": "pt"})
    return path


def lora_policy(model: nn.Module, cfg: LoraConfig, seed: int, train_dtype: str) -> tuple[nn.Module, str]:
    """(``model`` with LoRA applied, the base's fingerprint), on every learner rank: the rank that
    holds the weights computes the fingerprint, a meta-device skeleton receives it. The frozen base
    is stored in the training dtype (bf16: half the memory of the fp32 master weights a full
    fine-tune keeps); the adapters, their gradients and optimizer state stay fp32."""
    from stablerl import distributed as D
    from stablerl.distributed.fsdp import is_meta

    digest = D.broadcast_object(None if is_meta(model) else base_digest(model))
    base_dtype = torch.bfloat16 if train_dtype == "bf16" else None
    return apply_lora(model, cfg, seed=seed, base_dtype=base_dtype), digest


def export_lora(
    path: Path, model: nn.Module, full: dict[str, torch.Tensor], tokenizer, merged: bool, base: str
) -> Path:
    """A LoRA run's export in ``path``: the peft adapter directory with the tokenizer and, with
    ``merged``, the merged model in ``path/merged`` (an HF checkpoint plain transformers loads).
    Built in ``<path>.tmp`` and renamed into place when complete."""
    import shutil

    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model
    from stablerl.rundir import publish_dir

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(tmp, model, full, base)
    tokenizer.save_pretrained(tmp)
    if merged:
        plain = build_model(model.config)
        save_model_dir(tmp / "merged", plain, tokenizer, dict(merged_weights(model, full.items())))
    return publish_dir(tmp, path)
