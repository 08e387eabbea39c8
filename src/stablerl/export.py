"""`stablerl export RUN_DIR`: a run's checkpoint as a model others load.

A full fine-tune's checkpoint becomes an HF checkpoint; a LoRA run's (``model.lora``) a peft
adapter directory (``PeftModel.from_pretrained(base, DIR)``) and, with ``merged``, also the merged
model in ``DIR/merged`` that plain transformers loads. The base of a LoRA run is read from where the
run read it (``model.path`` or the cold start) and must be the one the adapters were trained on.
"""

from __future__ import annotations

from pathlib import Path

from stablerl import checkpoint
from stablerl.config import RunConfig
from stablerl.rundir import RunDir, read_config


def _checkpoint_of(run_dir: Path, step: int | None) -> Path:
    if step is None:
        ckpt, _ = checkpoint.latest_good(run_dir)
        if ckpt is None:
            raise ValueError(f"{run_dir} has no intact checkpoint to export")
        return ckpt
    ckpt = RunDir(run_dir).checkpoint(step)
    if not ckpt.is_dir() or checkpoint.damage(ckpt) is not None:
        kept = ", ".join(p.name for p in checkpoint.complete_checkpoints(run_dir)) or "none"
        raise ValueError(f"{run_dir} has no intact checkpoint of step {step} (kept: {kept})")
    return ckpt


def export_run(run_dir: Path, out: Path | None = None, step: int | None = None, merged: bool = False) -> Path:
    """Write the export of ``run_dir``'s checkpoint (the latest intact one, or ``step``) to ``out``
    (default RUN_DIR/export/step_N) and return where."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from stablerl.lora import check_base, export_lora, lora_policy
    from stablerl.models import build_model, load_policy
    from stablerl.sft import sft_output_dir

    run_dir = Path(run_dir)
    cfg = RunConfig.model_validate(read_config(run_dir))
    ckpt = _checkpoint_of(run_dir, step)
    out = Path(out) if out is not None else RunDir(run_dir).export(checkpoint.load_state(ckpt).step)
    if not cfg.model.lora.enabled:
        if merged:
            raise ValueError(f"{run_dir} is a full fine-tune: its export is the model itself (drop --merged)")
        model = build_model(AutoConfig.from_pretrained(ckpt))
        model.load_state_dict(checkpoint.load_model_weights(ckpt))
        return checkpoint.save_model_dir(out, model, AutoTokenizer.from_pretrained(ckpt))
    base = Path(cfg.model.path) if cfg.model.path else sft_output_dir(cfg)
    model, tokenizer = load_policy(base)
    model, digest = lora_policy(model, cfg.model.lora, cfg.train.seed, "fp32")
    check_base(ckpt, digest, str(base))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    checkpoint.load(ckpt, model, optimizer)
    return export_lora(out, model, model.state_dict(), tokenizer, merged, str(base))
