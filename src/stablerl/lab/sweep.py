"""The lab's sweeps: how far each surrogate's exact gradient is from the true gradient as the
training-inference discrepancy (pi_old vs mu_old) and the policy staleness (theta vs theta_old)
grow. ``run_lab`` returns one JSON-able dict with every figure; ``stablerl lab`` prints and plots it.
"""

from __future__ import annotations

import copy
import time

import torch

from stablerl.config import LabConfig, LossConfig
from stablerl.diagnostics import first_order_gap
from stablerl.lab.exact import (
    compare,
    policy_forward,
    surrogate_estimator,
    surrogate_gradient,
    true_gradient,
    true_objective,
)
from stablerl.lab.policy import (
    EnumerablePolicy,
    ResponseSpace,
    enumerate_responses,
    logp_from_logits,
    token_kl,
    token_logp,
)

# The surrogates compared: MiniRL (docs/formulation.md s.6, default IS and clip), one ablation per
# practice, two peers, and every training-inference correction stablerl has (docs/objectives.md),
# each on top of MiniRL. Names are the lab's; the configs are ordinary LossConfigs.
SURROGATES: dict[str, LossConfig] = {
    "minirl": LossConfig(),
    "minirl_no_is": LossConfig(is_mode="none"),
    "minirl_untruncated_is": LossConfig(is_cap=1e9),
    "minirl_no_clip": LossConfig(clip=False),
    "minirl_length_norm": LossConfig(aggregation="seq_mean_token_mean"),
    "cispo": LossConfig(algorithm="cispo"),
    "gspo": LossConfig(algorithm="gspo", aggregation="seq_mean_token_mean"),
    "icepop": LossConfig(is_mode="token_mask", is_low=0.5, is_cap=5.0),
    "seq_truncate": LossConfig(is_mode="sequence_truncate"),
    "seq_mask": LossConfig(is_mode="sequence_mask"),
    "reject_geo": LossConfig(reject="sequence_geo"),
    "opsm": LossConfig(opsm_delta=0.05),
    "m2po": LossConfig(m2_threshold=0.04),
    # prime-rl's default loss: the uncapped ratio pi_theta/mu on the tokens its probability-difference
    # mask (0.2 each way) keeps, in place of the ratio clip
    "dppo": LossConfig(algorithm="dppo", is_cap=1e9),
}


def warm_start(policy: EnumerablePolicy, space: ResponseSpace, target: float, lr: float = 0.02) -> int:
    """Ascend the exact objective until it reaches ``target`` (the lab's cold start); returns steps."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for step in range(500):
        objective = true_objective(policy, space)
        if float(objective.detach()) >= target:
            return step
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    raise RuntimeError(f"warm start did not reach expected reward {target} in 500 steps")


def perturbed(policy: EnumerablePolicy, noise: float, seed: int) -> EnumerablePolicy:
    """A copy whose weights carry relative noise ``noise`` (one fixed direction per seed), the
    lab's stand-in for an inference engine's different numerics."""
    g = torch.Generator().manual_seed(seed + 1)
    out = copy.deepcopy(policy)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def stale_policies(
    policy: EnumerablePolicy, space: ResponseSpace, steps: list[int], lr: float
) -> dict[int, EnumerablePolicy]:
    """theta_k for every k in ``steps``: Adam steps on the exact unclipped MiniRL surrogate with
    pi_old = mu_old = the starting policy (pure staleness, as N mini-batches of one rollout
    batch would move it). Unclipped so the distance grows steadily with k."""
    old_logp = token_logp(policy, space).detach()
    theta = copy.deepcopy(policy)
    opt = torch.optim.Adam(theta.parameters(), lr=lr)
    cfg = LossConfig(clip=False, is_mode="none")
    out = {0: copy.deepcopy(theta)}
    for k in range(1, max(steps) + 1):
        grads = surrogate_gradient(theta, space, old_logp, old_logp, cfg)
        opt.zero_grad()
        offset = 0
        for p in theta.parameters():  # the surrogate gradient is an ascent direction
            p.grad = -grads[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        opt.step()
        if k in steps:
            out[k] = copy.deepcopy(theta)
    return out


def evaluate_point(
    theta: EnumerablePolicy, old: EnumerablePolicy, mu_logits: torch.Tensor, space: ResponseSpace
) -> dict:
    """Every surrogate's exact gradient against the true gradient at theta, for responses sampled
    from the policy with logits ``mu_logits`` (mu_old) and pi_old given by ``old``."""
    g_true = true_gradient(theta, space)
    with torch.no_grad():
        old_logits, theta_logits = old.logits(space.features), theta.logits(space.features)
        rollout_logp = logp_from_logits(mu_logits, space)
        old_logp = logp_from_logits(old_logits, space)
        theta_logp = logp_from_logits(theta_logits, space)
        point = {
            # per-token KLs, exact: KL(mu_old || pi_old) under mu_old, KL(pi_old || pi_theta) under pi_old
            "train_infer_kl": token_kl(mu_logits, old_logits, rollout_logp.sum(-1).exp(), space),
            "staleness_kl": token_kl(old_logits, theta_logits, old_logp.sum(-1).exp(), space),
            # its expectation under mu_old, exactly
            "first_order_gap": float(
                (rollout_logp.sum(-1).exp() * first_order_gap(theta_logp, rollout_logp, space.mask)).sum()
            ),
            "objective": float(true_objective(theta, space)),
        }
    forward = policy_forward(theta, space)
    point["surrogates"] = {}
    for name, cfg in SURROGATES.items():
        mean, variance = surrogate_estimator(
            theta, space, old_logp, rollout_logp, cfg, logp=theta_logp, forward=forward
        )
        # the spread of a one-response estimate, relative to the size of what it estimates
        point["surrogates"][name] = {**compare(mean, g_true), "rel_std": variance**0.5 / float(g_true.norm())}
    return point


def run_lab(cfg: LabConfig) -> dict:
    t0 = time.perf_counter()
    space = enumerate_responses(cfg.num_content_tokens, cfg.max_len, cfg.target_sum)
    base = EnumerablePolicy(cfg.num_content_tokens, cfg.max_len, cfg.hidden, cfg.init_scale, cfg.seed)
    warm_steps = warm_start(base, space, cfg.warm_start_reward)
    with torch.no_grad():
        base_logits = base.logits(space.features)

    discrepancy = []
    for noise in cfg.discrepancy_noise:
        with torch.no_grad():
            mu_logits = perturbed(base, noise, cfg.seed).logits(space.features)
        discrepancy.append({"noise": noise, **evaluate_point(base, base, mu_logits, space)})
    casts = []
    for precision in cfg.casts:
        with torch.no_grad():
            mu_logits = base.logits(space.features, precision)
        casts.append({"precision": precision, **evaluate_point(base, base, mu_logits, space)})
    staleness = []
    for k, theta in stale_policies(base, space, cfg.staleness_steps, cfg.staleness_lr).items():
        staleness.append({"steps": k, **evaluate_point(theta, base, base_logits, space)})
    return {
        "config": cfg.model_dump(),
        "responses": int(space.tokens.shape[0]),
        "parameters": sum(p.numel() for p in base.parameters()),
        "warm_start_steps": warm_steps,
        "expected_reward": float(true_objective(base, space).detach()),
        "surrogates": {name: c.model_dump() for name, c in SURROGATES.items()},
        "discrepancy": discrepancy,
        "casts": casts,
        "staleness": staleness,
        "seconds": time.perf_counter() - t0,
    }
