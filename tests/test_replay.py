"""The routing replay decision (replay.RoutingPlan): every forward of a training step, what it
replays and what it records, for every mode, model kind, N and proximal setting — written out by
hand from docs/formulation.md s.5, not derived from the code."""

import pytest
import torch
from tinyrun import args, cli_error

from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.loop import Trainer
from stablerl.models import build_tokenizer
from stablerl.replay import Forward, RoutingPlan

TI, ST = "train_infer", "stale"
# (mode, moe, N, bypass) -> (pi_old pass as (replay, capture) or None, diagnostic pass, per mini-batch)
TRUTH = {
    ("none", True, 1, False): (None, False, [(None, TI)]),
    ("none", True, 3, False): ((None, TI), False, [(None, None), (None, ST), (None, ST)]),
    ("none", True, 3, True): (None, False, [(None, TI), (None, None), (None, None)]),
    ("R2", True, 1, False): (None, False, [(None, TI)]),  # on-policy R2: the gradient forward is pi_old's
    ("R2", True, 3, False): ((None, TI), False, [("old", None)] * 3),
    ("R3", True, 1, False): (None, True, [("rollout", None)]),
    ("R3", True, 3, False): (("rollout", None), True, [("rollout", None)] * 3),
    ("R3", True, 3, True): (None, True, [("rollout", None)] * 3),
    ("none", False, 1, False): (None, False, [(None, None)]),
    ("none", False, 3, False): ((None, None), False, [(None, None)] * 3),
    ("none", False, 3, True): (None, False, [(None, None)] * 3),
}


@pytest.mark.parametrize("key", list(TRUTH), ids=["-".join(map(str, k)) for k in TRUTH])
def test_every_forward_of_a_step_replays_and_records_what_the_table_says(key):
    mode, moe, n, bypass = key
    old, diagnostic, per_k = TRUTH[key]
    plan = RoutingPlan(mode, moe, n, bypass)
    got_old = plan.old_pass()
    assert (None if got_old is None else (got_old.replay, got_old.capture)) == old
    assert plan.diagnostic_pass == diagnostic
    assert [(plan.minibatch(k).replay, plan.minibatch(k).capture) for k in range(n)] == per_k
    # a mode "does something" exactly when some forward of the step replays
    assert plan.replays == any(r is not None for r, _ in per_k + ([old] if old else []))
    assert plan.replays_rollout == (moe and mode == "R3")


def test_r2_on_policy_warns_that_it_does_nothing_and_off_policy_does_not():
    assert "does nothing on-policy" in RoutingPlan("R2", True, 1).check("qwen3_moe")[0]
    assert RoutingPlan("R2", True, 2).check("qwen3_moe") == []
    assert RoutingPlan("R3", True, 1).check("qwen3_moe") == []


@pytest.mark.parametrize("mode", ["R2", "R3"])
def test_replay_on_a_dense_model_is_refused_naming_the_model_type(mode):
    with pytest.raises(ValueError, match=rf"routing_replay={mode} needs a Mixture-of-Experts.*'llama' is dense"):
        RoutingPlan(mode, False, 2).check("llama")


def test_r2_with_the_bypass_is_refused_by_the_plan_and_by_the_config():
    with pytest.raises(ValueError, match="R2 replays the routes of the recomputed pi_old"):
        RoutingPlan("R2", True, 2, bypass=True)
    with pytest.raises(ValueError, match="R2 replays the routes of the recomputed pi_old"):
        RunConfig.model_validate({"train": {"routing_replay": "R2"}, "loss": {"proximal": "rollout"}})


def test_a_forward_replays_pi_olds_rows_trimmed_or_the_parts_own_rollout_routes():
    old = torch.arange(4 * 6).view(4, 6, 1, 1)
    rollout = torch.full((2, 5, 1, 1), -7)
    rows = torch.tensor([3, 1])
    r2 = Forward(replay="old").routes(old, rows, rollout, width=5)
    assert torch.equal(r2, old[[3, 1], :5])
    assert Forward(replay="old").routes(None, rows, rollout, width=5) is None
    assert Forward(replay="rollout").routes(old, rows, rollout, width=5) is rollout
    assert Forward().routes(old, rows, rollout, width=5) is None


def test_routing_replay_that_cannot_or_does_nothing(tmp_path, capsys):
    from stablerl.checkpoint import save_model_dir
    from stablerl.models import build_model, tiny_config

    tok = build_tokenizer()
    dense = build_model(
        tiny_config(
            "qwen3",
            len(tok),
            hidden_size=32,
            num_layers=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    path = save_model_dir(tmp_path / "dense", dense, tok)
    capsys.readouterr()  # the save's own progress output is not the CLI's
    err = cli_error(capsys, ["train", *args(path, tmp_path / "r3"), "train.routing_replay=R3"])
    assert "needs a Mixture-of-Experts model" in err and "train.routing_replay=none" in err


def test_r2_on_policy_warns(sft_ckpt, tmp_path):
    logs = []
    cfg = build_config(RunConfig, None, args(sft_ckpt, tmp_path / "r2", "train.steps=1", "train.routing_replay=R2"))
    Trainer(cfg, tmp_path / "r2", log=logs.append).run()
    assert any("R2 does nothing on-policy" in line for line in logs)
