"""rollout.weight_noise_redraw: the engine's weight noise drawn anew for every policy version,
seeded by (train.seed, version) alone — so it differs between versions and is identical on every
rank (two independent builds) and after a resume (an engine built at that version)."""

import pytest
import torch

from stablerl.config import RolloutConfig
from stablerl.models import build_model, build_tokenizer, tiny_config
from stablerl.rollout import build_engine


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    model = build_model(tiny_config("qwen3_moe", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id), seed=0)
    return model, tok


def engine_weights(setup, version, redraw=True, seed=0, load_after=None):
    """The engine's copy of the weights at ``version``: built at it (a resume, another rank) or,
    with ``load_after``, built at that version and synced to ``version`` (a running run)."""
    model, tok = setup
    cfg = RolloutConfig(precision="fp32", weight_noise=0.1, weight_noise_redraw=redraw)
    start = version if load_after is None else load_after
    engine = build_engine(cfg, model, tok, seed=seed, version=start)
    if load_after is not None:
        engine.load_weights(model.state_dict(), version=version)
    assert engine.version == version
    return {k: v.clone() for k, v in engine.model.state_dict().items()}


def noisy(weights):
    return [k for k in weights if "embed" not in k and "lm_head" not in k and weights[k].dim() >= 2]


def same(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_redrawn_noise_differs_between_versions(setup):
    v3, v4 = engine_weights(setup, 3), engine_weights(setup, 4)
    keys = noisy(v3)
    assert keys and not any(torch.equal(v3[k], v4[k]) for k in keys)
    model = setup[0].state_dict()
    assert all(not torch.equal(v3[k], model[k]) for k in keys)  # noise is there at all


def test_redrawn_noise_is_identical_across_builds_and_on_resume(setup):
    running = engine_weights(setup, 5, load_after=4)  # synced to version 5 during the run
    resumed = engine_weights(setup, 5)  # built at version 5 (a resume; another rank's engine)
    assert same(running, resumed, list(running))


def test_redrawn_noise_depends_on_the_run_seed(setup):
    a, b = engine_weights(setup, 2, seed=0), engine_weights(setup, 2, seed=1)
    assert not any(torch.equal(a[k], b[k]) for k in noisy(a))


def test_a_fixed_pattern_is_the_same_at_every_version(setup):
    a, b = engine_weights(setup, 3, redraw=False), engine_weights(setup, 9, redraw=False, seed=7)
    assert same(a, b, list(a))


def test_redraw_without_noise_is_refused():
    with pytest.raises(ValueError, match="weight_noise_redraw"):
        RolloutConfig(weight_noise_redraw=True)
