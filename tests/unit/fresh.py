"""Run Python code in a fresh interpreter, for what only a new process can show (imports)."""

from __future__ import annotations

import subprocess
import sys


def output_of(code: str) -> str:
    """What ``python -c code`` prints, run by this interpreter in a new process."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
