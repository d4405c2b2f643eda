"""kubelock: run a command while holding a named lock kept in the Kubernetes API.

``async with kubelock.Lock("migrations") as held:`` for trio code;
``with kubelock.hold("migrations"):`` for blocking code.
"""

from ._lock import Held, Lock, hold
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
