"""What an API call is about: one namespaced object, its paths, and how messages name it."""

from __future__ import annotations

import dataclasses
from urllib.parse import quote

__all__ = ["Target"]


@dataclasses.dataclass(frozen=True)
class Target:
    """One namespaced object: where it is in the API, and how messages name it."""

    group: str  # "" for the core group
    version: str
    resource: str  # plural: "leases", "endpoints", "configmaps"
    namespace: str
    name: str

    @property
    def api_version(self) -> str:
        """``coordination.k8s.io/v1``, or ``v1`` for the core group."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def collection_path(self) -> str:
        """``/apis/coordination.k8s.io/v1/namespaces/ns/leases``; core objects under ``/api/v1``."""
        prefix = f"/apis/{self.api_version}" if self.group else f"/api/{self.version}"
        return f"{prefix}/namespaces/{quote(self.namespace, safe='')}/{self.resource}"

    @property
    def path(self) -> str:
        """The object's own path: :attr:`collection_path` and its name."""
        return f"{self.collection_path}/{quote(self.name, safe='')}"

    def __str__(self) -> str:
        return f'{self.resource} "{self.name}" in namespace "{self.namespace}"'

    def rbac_rule(self, verb: str) -> str:
        return f'{{apiGroups: ["{self.group}"], resources: ["{self.resource}"], verbs: ["{verb}"]}}'
