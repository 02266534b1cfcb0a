"""Write grants: who may write which namespace of a sparse table.

Rows of `user:<id>` and `task:<id>` namespaces belong to that user or task. An online update
(memory/sparse/online.py) writes them only when the caller hands over that namespace's
`WriteGrant`; the shared `knowledge` namespace is the operator's, named by its name. A server
authenticates a tenant's user, asks its `NamespaceAuthority` for `grant("user:<id>")` and passes
the grant along with that user's updates; nothing a request carries can name another namespace.

A grant is HMAC-SHA256(key, namespace) under the authority's secret key: unforgeable without the
key, checked without a list of issued grants, and valid in every process that shares the key (a
server's configured secret; by default a fresh random key that lives as long as the authority).
Its token is a bearer credential: `repr` never shows it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from memstack.errors import MemstackError
from memstack.memory.sparse.table import namespace_reasons

SHARED = "knowledge"          # the operator's namespace: written by name, no grant
_DOMAIN = b"memstack-write-grant\x00"


class NamespaceAccessError(MemstackError, PermissionError):
    """A write to a namespace without a valid grant for it (a server answers 403)."""


@dataclass(frozen=True, repr=False)
class WriteGrant:
    """The capability to write one namespace, issued by a `NamespaceAuthority`."""

    namespace: str
    token: str

    def __repr__(self) -> str:
        return f"WriteGrant({self.namespace!r})"


class NamespaceAuthority:
    """Issues and checks `WriteGrant`s (see the module docstring). `key`: at least 16 bytes of a
    secret shared by the processes whose grants must agree; None: a fresh random key."""

    def __init__(self, key: bytes | None = None):
        if key is not None and (not isinstance(key, bytes) or len(key) < 16):
            raise ValueError("a NamespaceAuthority key must be at least 16 bytes of secret (or None for a random one)")
        self._key = key if key is not None else secrets.token_bytes(32)

    def _token(self, namespace: str) -> str:
        return hmac.new(self._key, _DOMAIN + namespace.encode(), hashlib.sha256).hexdigest()

    def grant(self, namespace: str) -> WriteGrant:
        """The grant for one `user:<id>` / `task:<id>` namespace (the caller has authenticated its owner)."""
        reasons = namespace_reasons(namespace)
        if not reasons and namespace == SHARED:
            reasons = [f"{SHARED!r} is the shared namespace: it is written by name, not through a grant"]
        if reasons:
            raise ValueError("; ".join(reasons))
        return WriteGrant(namespace, self._token(namespace))

    def check(self, grant: object) -> str:
        """The namespace `grant` lets its holder write; NamespaceAccessError if it is not a grant of
        this authority (forged, edited, or issued under another key)."""
        if not isinstance(grant, WriteGrant):
            raise NamespaceAccessError(f"expected a WriteGrant, got {type(grant).__name__}")
        if not (isinstance(grant.namespace, str) and isinstance(grant.token, str)
                and hmac.compare_digest(grant.token, self._token(grant.namespace))):
            raise NamespaceAccessError(f"the grant for {grant.namespace!r} was not issued by this updater's authority "
                                       "(forged, edited, or from another key); nothing was written")
        return grant.namespace


__all__ = ["NamespaceAccessError", "NamespaceAuthority", "SHARED", "WriteGrant"]
