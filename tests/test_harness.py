"""The test command's own selection: the vLLM suite's `--vllm-only` (tests/conftest.py) combines
with a user's `-m` instead of being replaced by it (`scripts/test.sh -m 'not slow'` must not run
the main suite in the vLLM environment)."""

import os
import subprocess
import sys
from pathlib import Path

SAMPLE = """
import pytest

@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_slow(): pass

@pytest.mark.vllm
def test_vllm_fast(): pass

@pytest.mark.slow
def test_main_slow(): pass

def test_main_fast(): pass
"""


def _collected(where: Path, *args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "--collect-only", "-q", *args],
        cwd=where,
        env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},  # a user's -n or -m stays out
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode in (0, 5), out.stdout + out.stderr
    return sorted(line.split("::")[1] for line in out.stdout.splitlines() if "::" in line)


def test_vllm_only_keeps_the_vllm_tests_a_user_m_selects(tmp_path):
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n    vllm: vllm\n")
    assert _collected(tmp_path, "--vllm-only") == ["test_vllm_fast", "test_vllm_slow"]
    assert _collected(tmp_path, "--vllm-only", "-m", "not slow") == ["test_vllm_fast"]
    assert _collected(tmp_path, "-m", "not slow") == ["test_main_fast", "test_vllm_fast"]
    vllm_run = [
        line
        for line in (Path(__file__).parents[1] / "scripts/test.sh").read_text().splitlines()
        if line.startswith(".venv-vllm/bin/python -m pytest")
    ]
    assert len(vllm_run) == 1
    pytest_args = vllm_run[0].split(" -m pytest ", 1)[1]
    assert "--vllm-only" in pytest_args and "-m" not in pytest_args.split()
