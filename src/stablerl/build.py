"""Building a run, once, before its first step: the checks that need the model, the starting
policy (a checkpoint, ``model.path`` or the cold start), the KL reference, the fixed lag and the
rollout engine. The loop (loop.py) calls these in order and then only loops."""

from __future__ import annotations

from pathlib import Path

import torch

from stablerl import checkpoint
from stablerl import distributed as D
from stablerl.config import RunConfig
from stablerl.families import replay_refusal
from stablerl.models import build_model, is_moe, load_model, load_policy, model_skeleton
from stablerl.pipeline import LaggedWeights
from stablerl.replay import RoutingPlan
from stablerl.resume import check_reference, saved_changes
from stablerl.rollout import RolloutEngine, build_engine
from stablerl.rundir import RunDir, RunState
from stablerl.sft import cold_start, sft_output_dir


def check_layout(cfg: RunConfig, world: D.World) -> None:
    """The rollout batch must deal out to the ranks in whole groups: fail before any work."""
    P, K, R = cfg.batch.prompts_per_step, world.size, cfg.rollout.workers
    if P % K:
        raise ValueError(
            f"batch.prompts_per_step={P} does not divide by the {K} ranks (the learner ranks: "
            "WORLD_SIZE less rollout.workers): each rank trains whole groups; use a multiple of them"
        )
    if R and P % R:
        raise ValueError(
            f"batch.prompts_per_step={P} does not divide by rollout.workers={R}: each worker samples "
            "whole groups; use a multiple of the number of workers"
        )


def check_model(cfg: RunConfig, model) -> list[str]:
    """Errors for settings that cannot work on this model; warnings for those that do nothing."""
    moe = is_moe(model)
    if cfg.train.routing_replay != "none" and not moe:  # dense, or an MoE family replay does not cover
        raise ValueError(replay_refusal(cfg.train.routing_replay, model.config))
    return RoutingPlan.of(cfg, moe).check(model.config.model_type)


def resume_point(cfg: RunConfig, files: RunDir, resume: bool, log) -> tuple[Path | None, dict]:
    """The checkpoint a resume continues from (None: from step 0) and the config changes it
    makes; a fresh run refuses a directory that already holds one."""
    run_dir = Path(files)
    if not resume:
        if files.is_run():
            raise ValueError(
                f"run_dir {run_dir} already holds a run; resume it with --resume {run_dir} or pick another run_dir"
            )
        return None, {}
    changes, notes = saved_changes(run_dir, cfg)
    ckpt, damaged = checkpoint.latest_good(run_dir)
    for w in damaged + notes:
        log(f"[warning] {w}")
    if ckpt is None and damaged:
        raise ValueError(
            f"{run_dir}: every checkpoint is damaged ({damaged[0]}); remove "
            f"{files.checkpoints} to start the run again from step 0"
        )
    if ckpt is None:
        log(f"[resume] {run_dir} has no complete checkpoint yet: starting it again from step 0")
    return ckpt, changes


def starting_policy(cfg: RunConfig, task, world: D.World, ckpt: Path | None, log):
    """(model, tokenizer, source): the policy the run starts from and where it was read (a
    rollout worker reads the model from there too). With several learner ranks only rank 0
    reads the weights; the others build a meta-device skeleton and receive their shards from it
    (Learner._place): no full copy on them."""
    holds_weights = world.is_main or not world.distributed
    if ckpt is not None and not cfg.model.lora.enabled:  # a LoRA checkpoint holds the adapters only
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(ckpt)
        model = build_model(config) if holds_weights else model_skeleton(config)
        return model, AutoTokenizer.from_pretrained(ckpt), ckpt
    source = None
    if cfg.model.path:
        source = Path(cfg.model.path)
    elif world.is_main:
        source = cold_start(cfg, task, log)
    # the others wait for rank 0's SFT, outside the collective timeout
    source = Path(D.broadcast_after_long_work(str(source) if source else ""))
    model, tokenizer = load_policy(source, weights=holds_weights)
    return model, tokenizer, source


def reference_policy(cfg: RunConfig, world: D.World, state: RunState):
    """The KL penalty's frozen reference: the run's starting weights (model.path, or the cold
    start), read again from where they came from — on a resume too, where they must be the weights
    ``state`` recorded (their digest, kept in ``state``)."""
    path = Path(cfg.model.path) if cfg.model.path else sft_output_dir(cfg)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"loss.kl_beta > 0: the reference policy (the run's starting weights) is not at {path} "
            "any more; restore it there, or set loss.kl_beta=0"
        )
    state.reference_digest = check_reference(path, state.reference_digest)
    if world.distributed and not world.is_main:  # rank 0 sends the shards (Learner._place)
        return load_policy(path, weights=False)[0]
    return load_model(path)


def fixed_lag(cfg: RunConfig) -> LaggedWeights | None:
    """The fixed lag: the engine samples step s with version max(0, s - 1 - eta) (pipeline.py);
    with workers the learners keep the versions the workers still need, to send them."""
    lagged = cfg.rollout.max_staleness or cfg.rollout.workers
    return LaggedWeights(cfg.rollout.max_staleness) if lagged else None


def first_weights(lag: LaggedWeights | None, state: RunState, ckpt: Path | None, stream):
    """(version, weights) that sample the next step, streamed from the learner once (``stream``:
    a collective when sharded): into the lag's versions, or straight into the engine."""
    if lag is None:
        return state.step, stream()
    if ckpt is not None:
        lag.load(ckpt, state.step, stream())
        return lag.advance(state.step)
    lag.keep(0, stream())  # version 0 samples the first eta + 1 steps
    return 0, lag.versions[0]


def rollout_engine(
    cfg: RunConfig, world: D.World, model: torch.nn.Module, tokenizer, weights, version: int, log_dir=None
) -> RolloutEngine | None:
    """The learner's own rollout engine; with rollout workers the learners sample nothing (no
    engine here: evaluation builds its own). When sharded, the model object is the learner's, so
    the engine reads a skeleton. vLLM servers (rollout.engine=vllm_server) log into ``log_dir``."""
    if cfg.rollout.workers:
        return None
    structure = model_skeleton(model.config) if world.distributed else model
    seed, distributed = cfg.train.seed, world.distributed
    return build_engine(
        cfg.rollout,
        structure,
        tokenizer,
        seed=seed,
        distributed=distributed,
        weights=weights,
        version=version,
        log_dir=log_dir,
        timeout_s=cfg.distributed.timeout_s,
    )
