"""What `pip install kubelock` carries, and the harness's first run as a newcomer sees it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_tool_and_not_the_test_harness(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kubelock-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kubelock/cli.py" in names
    assert "kubelock/election.py" in names
    assert [name for name in names if name.startswith("kubelock/testing")] == []


def test_running_the_harness_module_prints_no_runtime_warning() -> None:
    # A wrong argument: the module runs (its usage line) without building anything.
    result = subprocess.run(
        [sys.executable, "-m", "kubelock.testing.assets", "--no-such-option"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "usage: python -m kubelock.testing.assets" in result.stderr
    assert "Warning" not in result.stderr, result.stderr
