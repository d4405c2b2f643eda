"""Strings read from the lock object, made safe to print.

Holder identities, waiters and KEYs are written by anyone with ``patch`` on
the lock object. Printed raw, an escape sequence in one can retitle or clear
an operator's terminal, or set its clipboard (OSC 52); a bidi override can
make a line read differently from what it holds. So every C0 and C1 control
character, DEL, a bidi embedding, override or isolate character
(U+202A to U+202E, U+2066 to U+2069), and a lone surrogate (which no output stream
can encode) is shown as a visible escape: ``\\x1b``, ``\\u202e``. A backslash is
left as it is.
"""

from __future__ import annotations

import re

__all__ = [
    "printable",
    "printable_json",
]

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with each unsafe character as a Python-style escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_python_escape, text)


def printable_json(line: str) -> str:
    """A JSON text with each unsafe character as a JSON escape (``\\u009b``): the same JSON.

    For text from ``json.dumps(..., ensure_ascii=False)``, which leaves DEL, C1
    controls and bidi characters raw. Outside strings JSON has only ASCII
    punctuation and whitespace, so every character replaced was inside a string.
    """
    return _UNSAFE.sub(_json_escape, line)


def _python_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"
