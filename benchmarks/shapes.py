"""The model shapes the benchmarks measure, as overrides of ``default_model_config``: the default
tiny MoE, and examples/deep_moe's shape read from its config (one definition of it)."""

from pathlib import Path

import torch
import yaml

DEEP_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "deep_moe" / "config.yaml"
SHAPES = {"default": {}, "deep": yaml.safe_load(DEEP_CONFIG.read_text())["model"]}


def decode_model(shape: str | None, dtype: torch.dtype = torch.float32):
    """A model for the decode benchmarks, with no EOS so that every response has the requested length:
    the 64-wide tiny Qwen3-MoE over a 64-token vocabulary (``shape=None``), or ``SHAPES[shape]`` over
    the run's tokenizer."""
    from stablerl.models import build_model, build_tokenizer, default_model_config, tiny_config

    if shape is None:
        config = tiny_config("qwen3_moe", pad_token_id=0, eos_token_id=None)
    else:
        config = default_model_config(build_tokenizer(), **SHAPES[shape])
        config.eos_token_id, config.pad_token_id = None, 0
    return build_model(config, seed=0, dtype=dtype).eval()
