"""CI hygiene: `.ci/run` leaves no virtual environment behind, and `pytest -m slow` with no slow
test selected is a success, not pytest's "no tests collected" (exit code 5)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ci_script_removes_its_environment_even_when_a_step_fails(tmp_path):
    """`python3 -m venv` is faked (it makes the folder and an empty activate script), and the
    install step fails: the script must still remove what it made under $TMPDIR."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "python3"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; : > "$3/bin/activate"; exit 0; fi\n'
                    'exit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (fake_bin / "python").symlink_to(fake)
    (fake_bin / "chromium").symlink_to(fake)  # present: the script installs nothing
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "TMPDIR": str(scratch)}
    result = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert result.returncode == 3
    assert list(scratch.iterdir()) == []


def test_selecting_slow_tests_when_there_are_none_succeeds(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "slow", str(REPO / "tests" / "data_prep" / "test_inputs.py")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deselected" in result.stdout
