"""Rollout engines: the inference policy mu_old that samples responses."""

from functools import partial

from stablerl.rollout.base import RolloutBatch, RolloutEngine, concat
from stablerl.rollout.local import LocalEngine
from stablerl.seeds import weight_noise_seed

__all__ = ["RolloutBatch", "RolloutEngine", "LocalEngine", "build_engine", "concat"]


def build_engine(
    cfg,
    model,
    tokenizer,
    *,
    seed: int = 0,
    distributed: bool = False,
    weights=None,
    version: int = 0,
    log_dir=None,
    timeout_s: float = 1800.0,
) -> RolloutEngine:
    """The engine ``cfg`` (a ``RolloutConfig``) names, holding ``model``'s current weights (or
    ``weights``, a state dict or a stream of ``(name, tensor)``: ``model`` may then be a
    meta-device skeleton) as policy version ``version``: ``LocalEngine`` or
    (``rollout.engine=vllm``) ``VllmEngine`` or (``vllm_server``) ``VllmServerEngine``, whose
    servers log into ``log_dir`` and answer within ``timeout_s``."""
    if cfg.engine == "local":
        return LocalEngine(
            model,
            cfg.precision,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            weight_noise=cfg.weight_noise,
            noise_seed=partial(weight_noise_seed, seed) if cfg.weight_noise_redraw else None,
            weights=weights,
            version=version,
            drop_finished=cfg.drop_finished,
            compile=cfg.compile,
        )
    if cfg.weight_noise:
        raise ValueError(
            "rollout.weight_noise perturbs the local engine's weights; it has no effect with "
            f"rollout.engine={cfg.engine} (set it to 0, or use rollout.engine=local)"
        )
    if cfg.engine == "vllm_server":
        from stablerl.rollout.vllm_server import VllmServerEngine  # imports vllm: only when asked for

        common = dict(cfg=cfg.vllm, seed=seed, distributed=distributed, weights=weights, version=version)
        return VllmServerEngine(model, tokenizer, cfg.precision, **common, log_dir=log_dir, timeout_s=timeout_s)
    from stablerl.rollout.vllm import VllmEngine  # imports vllm: only when asked for

    common = dict(cfg=cfg.vllm, seed=seed, distributed=distributed, weights=weights, version=version)
    return VllmEngine(model, tokenizer, cfg.precision, **common)
