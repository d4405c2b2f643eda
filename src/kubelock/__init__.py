"""kubelock: run a command while holding a named lock kept in the Kubernetes API."""

from ._version import __version__

__all__ = ["__version__"]
