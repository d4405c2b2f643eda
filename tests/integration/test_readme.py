"""The README's quick start: every command in it runs, here or in .ci/run."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

from kubelock.testing import ControlPlane

REPO = Path(__file__).resolve().parents[2]


def quick_start() -> list[str]:
    """The commands of the README's first code block (comments stripped)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None, "the README opens with a sh code block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_is_the_demo_and_the_tests_and_ci_runs_the_tests() -> None:
    assert quick_start() == ["scripts/dev demo", "scripts/dev test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^scripts/dev test$", ci, re.M), ".ci/run must run the README's test command"


@pytest.mark.timeout(600)
def test_the_demo_runs_and_shows_three_holds_one_at_a_time(control_plane: ControlPlane) -> None:
    """`scripts/dev demo` as a user runs it (asking for `control_plane` has the binaries ready)."""
    result = subprocess.run(
        ["scripts/dev", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "three holds, one at a time" in result.stdout
    bars = re.findall(
        r"^  (one|two|three)\s+\.*(#+)\s+([\d.]+)s -\s+([\d.]+)s$", result.stdout, re.M
    )
    assert sorted(name for name, *_ in bars) == ["one", "three", "two"]
    holds = sorted((float(start), float(end)) for _, _, start, end in bars)
    for (_, end), (start, _) in itertools.pairwise(holds):
        assert end <= start
