"""kubelock: run a command while holding a named lock kept in the Kubernetes API.

``async with kubelock.Lock("migrations") as held:`` for trio code;
``with kubelock.hold("migrations"):`` for blocking code.

The supported API is what this module exports (``__all__`` below), plus
:mod:`kubelock.testing` for tests. Every other module is kubelock's own
machinery: each lists in its ``__all__`` what the rest of kubelock may use,
and may change between releases.
"""

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import (
    ApiError,
    ConfigError,
    Conflict,
    Forbidden,
    KubelockError,
    LeaseLost,
    Unreachable,
    UsageError,
)
from .settings import ElectionTiming

if TYPE_CHECKING:
    from ._lock import Held, Lock, hold

_LAZY = frozenset({"Held", "Lock", "hold"})


def __getattr__(name: str) -> object:
    # The lock API imports trio; `kubelock --help`, `--version` and usage errors
    # (which import this package through kubelock.cli) need not pay for it.
    if name in _LAZY:
        from . import _lock

        return getattr(_lock, name)
    raise AttributeError(f"module 'kubelock' has no attribute {name!r}")


__all__ = [
    "ApiError",
    "ConfigError",
    "Conflict",
    "ElectionTiming",
    "Forbidden",
    "Held",
    "KubelockError",
    "LeaseLost",
    "Lock",
    "Unreachable",
    "UsageError",
    "__version__",
    "hold",
]
