"""`stablerl repro`: every experiment's configurations run (a step each), the report is written,
finished runs are skipped; and the collapse definition on hand-made reward curves."""

import json

import pytest

from stablerl.config import RunConfig
from stablerl.config_io import build_config
from stablerl.repro import EXPERIMENTS, collapse_step, run_experiment, write_report
from stablerl.repro.stats import collapse, run_stats


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_configuration_runs(name, tmp_path, sft_ckpt_for_repro, monkeypatch):
    tiny = [
        "train.steps=1",
        "batch.prompts_per_step=2",
        "batch.group_size=4",
        "rollout.max_new_tokens=10",
        "task.eval_size=4",
        "eval.samples=1",
        "log.tensorboard=false",
        "task.levels=[1]",
        "model.hidden_size=32",
        "model.num_layers=2",
        "sft.steps=3",
        "sft.batch_size=8",
        f"sft.output_dir={sft_ckpt_for_repro}",
    ]
    if name.startswith("cold-start"):  # each teacher style needs its own cold start ...
        tiny = [t for t in tiny if not t.startswith("sft.output_dir")]
        monkeypatch.chdir(tmp_path)  # ... at its default path, runs/sft/<hash>: here, not in the checkout
    variants = None
    if name.startswith(("long-", "signal-")):
        # every variant's real configuration is valid (the long task's length check included) ...
        exp = EXPERIMENTS[name]
        for v in exp["variants"]:
            build_config(RunConfig, None, exp["base"] + exp["variants"][v] + ["train.seed=0", f"run_dir={tmp_path}/x"])
        # ... and the machinery runs on the short task, one rung of the ladder
        tiny += ["task.style=steps", "task.max_operand=99"]
        # (experiments 3 and 4: their smallest N / lag only; the signal experiments: all four)
        variants = [
            v
            for v in exp["variants"]
            if "/" not in v
            or name.startswith("signal-")
            or (v.startswith("fp8_w8a8/") and v.count("/") == 1)
            or v.startswith(("fp8_w8a8/n2/", "fp8_w8a8/eta1/"))
        ]
    steps = 1
    if name in ("staleness", "long-lag"):
        # a lag of eta needs more than eta steps (a larger one is refused): two steps, lags 0 and 1
        steps, tiny = 2, [t for t in tiny if t != "train.steps=1"] + ["train.steps=2"]
        variants = [v for v in (variants or EXPERIMENTS[name]["variants"]) if "eta0" in v or "eta1" in v]
    logs = []
    dirs = run_experiment(name, tmp_path, seeds=1, extra=tiny, log=logs.append, variants=variants)
    assert len(dirs) == len(variants or EXPERIMENTS[name]["variants"])
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["steps"] == steps and summary["aborted"] is None
    paths = write_report(name, tmp_path, seeds=1)
    assert paths["png"].stat().st_size > 10_000
    if name == "dose-response":
        assert paths["dose_png"].stat().st_size > 10_000
        # two tables (training reward, held-out accuracy), each a header, a rule and a row per level
        table = (tmp_path / name / "dose_table.md").read_text()
        assert sum(line.startswith("| ") for line in table.splitlines()) == 2 * (1 + len(EXPERIMENTS[name]["rows"]))
    rows = json.loads(paths["json"].read_text())
    assert [r["variant"] for r in rows] == (variants or list(EXPERIMENTS[name]["variants"]))
    if EXPERIMENTS[name].get("reference"):
        assert paths["paired_md"].is_file()
    if EXPERIMENTS[name].get("preregistered"):
        # one table row per finished run, after the header
        text = paths["readings_md"].read_text()
        assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + len(dirs)
    if name == "long-dose":  # with the cold start's dose axis beside the runs, the dose figure
        (tmp_path / name / "dose_axis.json").write_text(
            json.dumps({"fp8_w8a8": {"kl_k1": 1e-3, "seq_log_w_mean": -0.1}})
        )
        paths = write_report(name, tmp_path, seeds=1)
        assert paths["dose_png"].stat().st_size > 5_000
    logs.clear()
    run_experiment(
        name, tmp_path, seeds=1, extra=tiny, log=logs.append, variants=variants
    )  # finished runs are not repeated
    assert all("skipped" in line for line in logs)


@pytest.fixture(scope="module")
def sft_ckpt_for_repro(tmp_path_factory):
    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.sft import cold_start
    from stablerl.tasks import build_task

    out = tmp_path_factory.mktemp("sft") / "ckpt"
    cfg = build_config(
        RunConfig,
        None,
        [
            "model.hidden_size=32",
            "model.num_layers=2",
            "sft.steps=3",
            "sft.batch_size=8",
            "task.levels=[1]",
            f"sft.output_dir={out}",
        ],
    )
    return cold_start(cfg, build_task(cfg.task), log=lambda *_: None)


def test_collapse_definition():
    def rows(rewards):
        return [{"step": i + 1, "reward_mean": r} for i, r in enumerate(rewards)]

    stable = [0.3] * 20 + [0.5] * 60
    assert collapse_step(rows(stable)) is None
    collapsing = [0.3] * 20 + [0.6] * 40 + [0.05] * 40  # falls and never recovers
    step = collapse_step(rows(collapsing))
    assert 60 < step < 80
    dip = [0.3] * 20 + [0.6] * 40 + [0.05] * 15 + [0.6] * 25  # recovers: not a collapse
    assert collapse_step(rows(dip)) is None
    assert collapse_step(rows(stable[:10]), aborted=True) == 11


def test_collapse_catches_both_entropy_directions():
    def rows(rewards, entropy):
        return [{"step": i + 1, "reward_mean": r, "entropy": h} for i, (r, h) in enumerate(zip(rewards, entropy))]

    rewards = [0.3] * 20 + [0.6] * 40 + [0.05] * 40
    # without IS (the paper): the entropy drops sharply and the reward follows
    # (the 20-step mean of the reward goes below half its peak 0.6 once 11 of its 20 values are 0.05)
    assert collapse(rows(rewards, [0.1] * 55 + [0.01] * 45)) == (71, "reward fell, entropy dropped")
    # off-policy without clipping: the entropy blows up; flagged at the blow-up, before the reward falls
    step, how = collapse(rows([0.5] * 100, [0.1] * 50 + [1.0] * 50))
    assert (step, how) == (53, "entropy blew up")  # the 10-step mean passes 3 x 0.1 at the 3rd value of 1.0
    # a healthy run whose entropy falls as it learns (reward up) is not a collapse
    assert collapse(rows([0.3] * 20 + [0.8] * 80, [0.1] * 20 + [0.02] * 80)) == (None, "")
    # steps and windows are optimizer steps: N mini-batches per rollout step, so at N = 4 the reward
    # window is 5 rollout steps, below half the peak 0.6 once 3 of its 5 values are 0.05 (rollout step 63)
    assert collapse(rows(rewards, [0.1] * 100), n=4) == (4 * 63, "reward fell")
    # and the final reward is over the last 20 optimizer steps' worth: 5 rollout steps at N = 4
    assert run_stats({}, rows(rewards[:57] + [0.2, 0.2, 0.4, 0.4, 0.4], [0.1] * 62), n=4)[
        "final_reward"
    ] == pytest.approx((0.2 * 2 + 0.4 * 3) / 5)
    assert run_stats({}, rows(rewards, [0.1] * 100))["final_reward"] == pytest.approx(0.05)


def test_the_deep_moe_example_builds_the_shape_it_names():
    """examples/deep_moe/config.yaml: 8 layers, 32 experts, top-4, experts 48 wide; the parameter
    count against a hand count of a Qwen3-MoE layer."""
    from pathlib import Path

    from stablerl.config import RunConfig
    from stablerl.config_io import build_config
    from stablerl.models import build_default_policy, build_tokenizer

    cfg = build_config(RunConfig, str(Path(__file__).parents[1] / "examples" / "deep_moe" / "config.yaml"), [])
    tok = build_tokenizer()
    model = build_default_policy(cfg.model, tok)
    c = model.config
    assert (c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (8, 32, 4, 48)
    h, v, e, i, hd = 96, len(tok), 32, 48, 96 // 4
    attention = h * 4 * hd + 2 * (h * 2 * hd) + 4 * hd * h + 2 * hd  # q, k, v, o, q/k norms
    moe = h * e + e * 3 * h * i  # router, experts (gate, up, down)
    per_layer = attention + moe + 2 * h  # + two RMSNorms
    assert sum(p.numel() for p in model.parameters()) == v * h + 8 * per_layer + h  # tied embedding, final norm


def test_variants_filter_names_what_is_allowed(tmp_path, capsys):
    from stablerl.cli import main

    with pytest.raises(ValueError, match="unknown variant\\(s\\) of staleness: nope; allowed: eta0, eta0_bypass"):
        run_experiment("staleness", tmp_path, seeds=1, variants=["eta1", "nope"])
    assert main(["repro", "staleness", "--variants", "nope", "--out", str(tmp_path)]) != 0
    assert "unknown variant(s) of staleness: nope" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started


def test_paired_interval_hand_worked():
    from stablerl.repro.stats import paired_interval

    # mean 0.01, sd 0.02, se 0.02 / sqrt(3); t(2 df, 97.5%) = 4.303 -> half-width 0.04969
    mean, lo, hi = paired_interval([0.01, 0.03, -0.01])
    assert mean == pytest.approx(0.01) and lo == pytest.approx(0.01 - 0.049687, abs=1e-5)
    assert hi == pytest.approx(0.01 + 0.049687, abs=1e-5)
    assert paired_interval([0.2]) is None and paired_interval([]) is None


def _rows(key, values, every=1):
    return [{"step": i * every, key: v} for i, v in enumerate(values)]


def test_preregistered_collapse_parts_on_hand_made_curves():
    from stablerl.repro.stats import collapse_c1, collapse_c2, collapse_c3, collapse_preregistered

    # C1: peak 0.6 at eval 2; from eval 4 on every value <= 0.45 (two evaluations at least)
    acc = _rows("eval/sampled_acc", [0.4, 0.5, 0.6, 0.5, 0.44, 0.40], every=20)
    assert collapse_c1(acc) == 80
    assert collapse_c1(_rows("eval/sampled_acc", [0.4, 0.6, 0.5, 0.44])) is None  # one evaluation only
    assert collapse_c1(_rows("eval/sampled_acc", [0.6, 0.4, 0.5, 0.4])) is None  # 0.5 > 0.6 - 0.15: recovered
    # C2: early median 1e-3; the running median (10 steps) reaches 1e-2 and stays
    kl = _rows("train_infer_kl_k1", [1e-3] * 10 + [2e-2] * 30)
    # at step 14 the window holds five 1e-3 and five 2e-2: its median, the mean of the middle two,
    # is 1.05e-2 >= 10 x 1e-3
    assert collapse_c2(kl) == 14
    assert collapse_c2(_rows("train_infer_kl_k1", [1e-3] * 10 + [2e-2] * 10 + [1e-3] * 10)) is None
    # C3: entropy drops below half the reference's for 20 steps
    ref = _rows("entropy", [1.0] * 60)
    ent = _rows("entropy", [1.0] * 20 + [0.2] * 40)
    step, how = collapse_c3(ent, ref)
    assert how == "drop" and 20 < step < 30
    assert collapse_c3(_rows("entropy", [1.0] * 20 + [0.2] * 15 + [1.0] * 25), ref) == (None, "")
    # the definition: C1, or C2 and C3 together
    both = [{**a, **b} for a, b in zip(kl, _rows("entropy", [1.0] * 10 + [0.1] * 30))]
    step, how = collapse_preregistered(both, ref[:40])
    assert how == "C2+C3 (drop)" and step >= 14
    assert collapse_preregistered(kl, None) == (None, "")  # C2 alone is not a collapse
    assert collapse_preregistered(acc, None) == (80, "C1")


def test_paired_references_within_a_row():
    from stablerl.repro.experiments import reference_of

    pairs = {"on_no_is": "on_minirl", "off_r2": "off_noreplay"}
    assert reference_of("nvfp4/on_no_is", pairs) == "nvfp4/on_minirl"
    assert reference_of("fp32/off_r2", pairs) == "fp32/off_noreplay"
    assert reference_of("fp32/on_minirl", pairs) is None  # a reference is not compared with itself
    assert reference_of("eta4", "eta0") == "eta0" and reference_of("eta0", "eta0") is None


def test_a_second_preregistered_comparison_is_tabled_after_the_references():
    """Amendment 6 compares clip_r3_bypass with its reference and with its decoupled twin
    (``also_compare``): both rows, hand-computed (differences +0.1, +0.2, 0.0: mean 0.1, sd 0.1,
    t(2) = 4.303, half-width 4.303 * 0.1 / sqrt(3) = 0.248)."""
    from stablerl.repro.report import paired_table

    finals = {"noclip_noreplay": (0.4, 0.4, 0.4), "clip_r3": (0.5, 0.6, 0.7), "clip_r3_bypass": (0.6, 0.8, 0.7)}
    by_seed = {
        f"fp8_w8a8/eta1/{name}": {seed: _run([0.6, a], [0.1, 0.1], [1e-3, 1e-3]) for seed, a in enumerate(accs)}
        for name, accs in finals.items()
    }
    text = paired_table(
        by_seed, {"clip_r3": "noclip_noreplay", "clip_r3_bypass": "noclip_noreplay"}, also={"clip_r3_bypass": "clip_r3"}
    )
    rows = [line for line in text.splitlines() if line.startswith("| fp8")]
    assert rows == [
        "| fp8_w8a8/eta1/clip_r3 | fp8_w8a8/eta1/noclip_noreplay"
        " | 3 | +0.100, +0.200, +0.300 | +0.200 | [-0.048, +0.448] |",
        "| fp8_w8a8/eta1/clip_r3_bypass | fp8_w8a8/eta1/noclip_noreplay"
        " | 3 | +0.200, +0.400, +0.300 | +0.300 | [+0.052, +0.548] |",
        "| fp8_w8a8/eta1/clip_r3_bypass | fp8_w8a8/eta1/clip_r3"
        " | 3 | +0.100, +0.200, +0.000 | +0.100 | [-0.148, +0.348] |",
    ]
    assert EXPERIMENTS["long-lag"]["also_compare"] == {"clip_r3_bypass": "clip_r3"}


def _run(acc, entropy, kl, n=1, every=1):
    """(summary, rows, N) of a hand-made run: evaluations every ``every`` steps."""
    rows = [
        {"step": i, "reward_mean": 0.5, "entropy": e, "train_infer_kl_k1": k, "train_infer_kl": k}
        for i, (e, k) in enumerate(zip(entropy, kl))
    ]
    for j, a in enumerate(acc):
        rows[j * every]["eval/sampled_acc"] = a
    return {"steps": len(rows)}, rows, n


def test_readings_compare_each_run_with_its_own_rung_and_seed():
    from stablerl.repro.reading import dose_points, evaluation_noise, readings, readings_table

    flat = [1.0] * 60
    by_seed = {
        # the reference of the "hi" rung: seed 0's entropy flat, seed 1's falling at step 20
        "hi/on_minirl": {
            0: _run([0.5, 0.6, 0.6], flat, [1e-3] * 60, every=20),
            1: _run([0.52, 0.6, 0.62], [1.0] * 20 + [0.2] * 40, [1e-3] * 60, every=20),
        },
        # no IS: entropy drops to 0.2 at step 20 and the KL rises 20x from step 15. C2: the 10-step
        # running median reaches 1.05e-2 >= 10 x 1e-3 when five of its values are 2e-2 (step 19);
        # C3: the trailing 10-step mean of the entropy falls below 0.5 x 1.0 when seven are 0.2
        # (step 26) and stays out for 20 steps: C2 and C3 on seed 0, collapse at the later, 26;
        # on seed 1 its reference's entropy falls the same way, so C2 without C3: no collapse
        "hi/on_no_is": {
            0: _run([0.48, 0.5, 0.5], [1.0] * 20 + [0.2] * 40, [1e-3] * 15 + [2e-2] * 45, every=20),
            1: _run([0.55, 0.5, 0.5], [1.0] * 20 + [0.2] * 40, [1e-3] * 15 + [2e-2] * 45, every=20),
        },
        # another rung: C3 must not compare with the hi rung's reference (it has none: '-')
        "lo/on_no_is": {0: _run([0.5, 0.1, 0.1], flat, [1e-3] * 60, every=20)},
    }
    read = readings(by_seed, "on_minirl")
    assert read["hi/on_no_is"][0]["c3_reference"] == "hi/on_minirl"
    assert read["hi/on_no_is"][0]["c2_step"] == 19 and read["hi/on_no_is"][0]["c3"] == 26
    assert read["hi/on_no_is"][0]["c3_direction"] == "drop"
    assert read["hi/on_no_is"][0]["prereg_step"] == 26 and read["hi/on_no_is"][0]["prereg_how"] == "C2+C3 (drop)"
    assert read["hi/on_no_is"][1]["c3"] is None and read["hi/on_no_is"][1]["prereg_step"] is None
    assert read["hi/on_minirl"][0]["c3_reference"] is None and read["lo/on_no_is"][0]["c3_reference"] is None
    # experiments 3 and 4 compare with experiment 1's run of the same rung and seed (another pool)
    other = {"hi/n4/clip_r2": {0: by_seed["hi/on_no_is"][0]}}
    moved = readings(other, "on_minirl", pool={**by_seed, **other})["hi/n4/clip_r2"][0]
    assert moved["c3_reference"] == "hi/on_minirl" and moved["c3"] == 26
    assert readings(other, "on_minirl")["hi/n4/clip_r2"][0]["c3_reference"] is None  # not in its own pool
    # C1 alone decides where there is no reference: 0.5 -> 0.1, two evaluations below the peak - 0.15
    assert read["lo/on_no_is"][0]["prereg_step"] == 20 and read["lo/on_no_is"][0]["prereg_how"] == "C1"
    # the cold start's spread across variants, per seed: seed 0 reads 0.5, 0.48, 0.5; seed 1 0.52, 0.55;
    # across seeds the means 0.49333 and 0.535 differ by 0.04167
    per_seed, across = evaluation_noise(read)
    assert per_seed == pytest.approx({0: 0.02, 1: 0.03}) and across == pytest.approx(0.041667, abs=1e-5)
    table = readings_table(read, {"on_no_is": "on_minirl"})
    row = next(line for line in table.splitlines() if line.startswith("| hi/on_no_is | 0 |"))
    assert "| 15.25 |" in row  # its mean k1 KL over its reference's, same seed: (15e-3 + 45 x 2e-2) / 60 / 1e-3
    # the dose figure's points: final accuracy minus the same rung's reference, paired by seed
    pts = dose_points(read, {"on_no_is": "on_minirl"}, {"hi": {"kl_k1": 3e-2}, "lo": {"kl_k1": 1e-4}})
    assert len(pts) == 1  # the lo rung has no reference run: no point
    (p,) = pts
    assert p["rung"] == "hi" and p["dose_k1"] == 3e-2 and p["diffs"] == pytest.approx([-0.1, -0.12])
    # mean -0.11, sd 0.01414, two pairs: t(1 df) = 12.706, half-width 12.706 x 0.01414 / sqrt(2) = 0.12706
    assert p["mean"] == pytest.approx(-0.11) and p["lo"] == pytest.approx(-0.23706, abs=1e-5)
    assert p["hi"] == pytest.approx(0.01706, abs=1e-5)


def test_a_report_is_regenerated_from_run_records_when_the_run_directories_are_gone(tmp_path):
    """Every finished run leaves a small record beside the report; with the run directories
    deleted (a lost machine), the report reads the records and writes the same tables."""
    import gzip
    import shutil

    from stablerl.repro.records import pack, read_record, record_path
    from stablerl.repro.runner import run_dir_of
    from stablerl.repro.stats import finished_runs_by_seed

    name = "long-dose"
    made = {
        ("nvfp4/on_minirl", 0): _run([0.5, 0.6, 0.4], [1.0] * 41, [1e-3] * 41, every=20),
        ("nvfp4/on_no_is", 0): _run([0.45, 0.7, 0.8], [1.0] * 41, [2e-3] * 41, every=20),
        ("nvfp4/on_minirl", 1): _run([0.5, 0.55, float("nan")], [1.0] * 41, [1e-3] * 41, every=20),
    }
    for (variant, seed), (summary, rows, _) in made.items():
        d = run_dir_of(tmp_path, name, variant, seed)
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # an interrupted run resumes later: it gets no record
    d = run_dir_of(tmp_path, name, "nvfp4/on_r3", 0)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"steps": 3, "interrupted": True}))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 0.5}) + "\n")

    first = write_report(name, tmp_path, seeds=2)
    table, paired = first["json"].read_text(), first["paired_md"].read_text()
    readings_md = first["readings_md"].read_text()
    for (variant, seed), (summary, rows, n) in made.items():
        record = record_path(tmp_path, name, variant, seed)
        assert read_record(record) == (summary, rows, n) or seed == 1  # NaN != NaN: checked below
        assert record.read_bytes() == pack(summary, rows, n)  # deterministic: no timestamp
        assert gzip.decompress(record.read_bytes())[:1] == b"{"
    nan_run = read_record(record_path(tmp_path, name, "nvfp4/on_minirl", 1))[1]
    assert nan_run[40]["eval/sampled_acc"] != nan_run[40]["eval/sampled_acc"]  # a NaN survives the round trip
    assert not record_path(tmp_path, name, "nvfp4/on_r3", 0).exists()
    stamp = record_path(tmp_path, name, "nvfp4/on_no_is", 0).stat().st_mtime_ns

    for variant in ("nvfp4/on_minirl", "nvfp4/on_no_is"):  # the finished runs' directories
        shutil.rmtree(run_dir_of(tmp_path, name, variant, 0).parent)
    runs = finished_runs_by_seed(name, tmp_path, 2)
    assert sorted(runs["nvfp4/on_minirl"]) == [0, 1] and sorted(runs["nvfp4/on_no_is"]) == [0]
    assert runs["nvfp4/on_minirl"][1][1][:3] == made[("nvfp4/on_minirl", 1)][1][:3]
    again = write_report(name, tmp_path, seeds=2)
    assert again["json"].read_text() == table and again["paired_md"].read_text() == paired
    assert again["readings_md"].read_text() == readings_md
    # the report's rewrite of an unchanged record leaves the file alone (no churn in git)
    assert record_path(tmp_path, name, "nvfp4/on_no_is", 0).stat().st_mtime_ns == stamp
    # its paired difference is the hand-worked one: 0.8 - 0.4
    assert "| nvfp4/on_no_is | nvfp4/on_minirl | 1 | +0.400 |" in paired


def test_report_only_runs_nothing(tmp_path, capsys):
    from stablerl.cli import main

    assert main(["repro", "long-dose", "--report-only", "--out", str(tmp_path)]) == 0
    assert "no finished run or record" in capsys.readouterr().out
    assert not (tmp_path / "long-dose" / "nvfp4").exists()


def test_a_run_whose_record_is_kept_is_not_run_again(tmp_path, capsys):
    """After a lost machine the records are copied back and the runner resumes the set: a run
    whose directory is gone but whose record is there is finished (the report reads it), so it
    is skipped, not trained a second time; a run with neither is started."""
    from stablerl.repro.records import pack, record_path
    from stablerl.repro.runner import has_record_only, run_dir_of, run_experiment

    summary, rows, n = _run([0.5, 0.6, 0.4], [1.0] * 41, [1e-3] * 41, every=20)
    record = record_path(tmp_path, "long-dose", "nvfp4/on_minirl", 0)
    record.parent.mkdir(parents=True)
    record.write_bytes(pack(summary, rows, n))
    assert has_record_only(tmp_path, "long-dose", "nvfp4/on_minirl", 0)
    assert not has_record_only(tmp_path, "long-dose", "nvfp4/on_minirl", 1)
    said = []
    run_experiment("long-dose", tmp_path, [0], log=said.append, variants=["nvfp4/on_minirl"])
    assert said == ["[repro long-dose] 1/1 nvfp4/on_minirl seed 0: done (its record is kept), skipped"]
    assert not run_dir_of(tmp_path, "long-dose", "nvfp4/on_minirl", 0).exists()
    # the command line says the seed is done, not that another process still runs it
    from stablerl.cli import main

    assert main(["repro", "long-dose", "--seeds", "1", "--variants", "nvfp4/on_minirl", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "[repro long-dose] seeds 0..0 done; table:" in printed and "another process" not in printed
    # a run directory (an interrupted run) wins over a record: it is resumed, not skipped
    run_dir_of(tmp_path, "long-dose", "nvfp4/on_minirl", 0).mkdir(parents=True)
    assert not has_record_only(tmp_path, "long-dose", "nvfp4/on_minirl", 0)
