"""The model shapes the benchmarks measure, as overrides of ``default_model_config``: the default
tiny MoE, and examples/deep_moe's shape read from its config (one definition of it)."""

from pathlib import Path

import yaml

DEEP_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "deep_moe" / "config.yaml"
SHAPES = {"default": {}, "deep": yaml.safe_load(DEEP_CONFIG.read_text())["model"]}
