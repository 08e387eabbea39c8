"""The command line: versions, printed configs, model paths, hub ids."""

import pytest
from tinyrun import cli_error, train

from stablerl.cli import main
from stablerl.config import RunConfig
from stablerl.config_io import build_config


def test_model_paths(tmp_path, capsys, sft_ckpt):
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", f"model.path={tmp_path / 'nope'}"])
    assert "model.path" in err and "does not exist" in err and "hub" not in err
    (tmp_path / "notamodel").mkdir()
    err = cli_error(capsys, ["train", f"run_dir={tmp_path / 'r'}", f"model.path={tmp_path / 'notamodel'}"])
    assert "not an HF model directory" in err
    # `stablerl eval` given a run directory says which directory to give instead
    run_dir = tmp_path / "run"
    train(sft_ckpt, run_dir, "train.steps=1")
    err = cli_error(capsys, ["eval", str(run_dir)])
    assert "run directory" in err and "export" in err


def test_cli_version_print_config_and_list_index_overrides(capsys, tmp_path):
    import yaml

    from stablerl import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stablerl {__version__}"
    assert (
        main(
            [
                "train",
                "--print-config",
                f"run_dir={tmp_path / 'r'}",
                "loss.eps_high=0.3",
                "eval.sets=[{name: t, dataset: x.jsonl}]",
                "eval.sets.0.samples=7",
                "eval.sets.0.prompt_template=Q: {question}",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"]["eps_high"] == 0.3 and printed["eval"]["sets"][0]["samples"] == 7
    assert printed["eval"]["sets"][0]["prompt_template"] == "Q: {question}"
    assert not (tmp_path / "r").exists()  # nothing ran
    with pytest.raises(ValueError, match=r"eval.sets has 1 entries .* '3' is not one of them"):
        build_config(RunConfig, None, ["eval.sets=[{name: t, dataset: x}]", "eval.sets.3.samples=1"])


def test_hub_ids_are_accepted_and_offline_says_how_to_download(monkeypatch, capsys):
    # this machine has no hub: fail fast, as offline would (the libraries read the variable at import)
    import datasets
    import huggingface_hub

    from stablerl.models import is_hub_id, load_policy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert is_hub_id("Qwen/Qwen3-0.6B") and not is_hub_id("./Qwen/x") and not is_hub_id("a/b/c")
    with pytest.raises(ValueError, match=r"hf download stablerl-test/no-such-model --local-dir DIR"):
        load_policy("stablerl-test/no-such-model")
    rc = main(["eval", "stablerl-test/no-such-model"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=r"hf download stablerl-test/no-such-data --repo-type dataset"):
        from stablerl.tasks import Columns, load_problems

        load_problems("stablerl-test/no-such-data", Columns())


def test_eval_of_a_training_checkpoint_points_to_the_runs_export_of_that_step(sft_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(sft_ckpt, run_dir, "train.steps=2", "checkpoint.every=1")
    capsys.readouterr()  # the run's own output
    err = cli_error(capsys, ["eval", str(run_dir / "checkpoints" / "step_000002")])
    assert "training checkpoint" in err and str(run_dir / "export" / "step_000002") in err
    err = cli_error(capsys, ["eval", str(run_dir / "checkpoints" / "step_000001")])  # no export of step 1
    assert "training checkpoint" in err and f"e.g. {run_dir / 'export' / 'step_000002'}" in err
    err = cli_error(
        capsys, ["train", f"run_dir={tmp_path / 'r2'}", f"model.path={run_dir / 'checkpoints' / 'step_000001'}"]
    )
    assert "model.path" in err and "training checkpoint" in err


@pytest.mark.parametrize("seeds", ["0", "-1"])
def test_repro_with_no_seeds_is_refused_not_a_silent_success(capsys, tmp_path, seeds):
    err = cli_error(capsys, ["repro", "staleness", "--seeds", seeds, "--out", str(tmp_path)])
    assert f"--seeds {seeds}" in err and "at least 1" in err
    assert not any(tmp_path.iterdir())
