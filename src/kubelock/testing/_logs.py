"""Reading the end of a daemon's log, for error messages (no other imports of the harness).

Kept apart from :mod:`kubelock.testing.assets` so that importing the harness
does not import that module before ``python -m kubelock.testing.assets`` runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["tail"]


def tail(path: Path, *, lines: int = 30) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 16384))
            text = file.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
