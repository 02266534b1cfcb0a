"""Tenants: API keys -> tenant, and every namespace a tenant's requests may touch.

The tenant -- never the client -- decides the prefix-cache salt, the session namespace and every
memory namespace (DESIGN.md, the converged system): a request carries an API key, the key names a
tenant, and only the tenant's own namespaces are derived for it. Nothing in a request body names
a salt or a namespace.

Keys come from a YAML/JSON file and/or the environment variable ``MEMSTACK_API_KEYS``:

    # keys.yaml                                  # MEMSTACK_API_KEYS="acme=sk-...,beta=sk-..."
    tenants:
      - name: acme
        keys: ["sk-acme-0123456789abcdef"]       # plaintext keys (>= 16 characters), or
        key_sha256: ["<64 hex digits>"]          # their SHA-256, so the file holds no secret
        pin_quota_blocks: 64                     # KV blocks its pinned prefixes may hold
        kv_quota_blocks: 2048                    # KV blocks its requests in flight may reserve
        max_concurrent: 64                       # requests in flight
        users: [alice, bob]                      # its users: each has its own memory (user:<id> rows)
        tasks: [support]                         # its tasks: memory its requests read beside a user's (task:<id>)

Only SHA-256 digests of keys are kept in memory; a presented key is hashed and compared with every
digest in constant time (`hmac.compare_digest`, no early exit), and keys are never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memstack.errors import ConfigError

ENV_VAR = "MEMSTACK_API_KEYS"
MIN_KEY_LEN = 16
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")     # a user id (memory namespaces `user:<id>`)
ANONYMOUS = "default"          # the single tenant of a server without keys


@dataclass(frozen=True)
class Tenant:
    name: str
    pin_quota_blocks: int | None = None      # None: the server's default (a share of the pool)
    kv_quota_blocks: int | None = None       # None: the whole pool
    max_concurrent: int | None = None        # None: no per-tenant limit
    users: tuple[str, ...] = ()              # declared users (their memory namespaces); none: no user memory
    tasks: tuple[str, ...] = ()              # declared tasks (task:<id> namespaces a request reads with its user's)

    @property
    def salt(self) -> str:
        """The prefix-cache salt: cached KV blocks are keyed under it, so tenants never share one."""
        return f"tenant:{self.name}"

    def namespace(self, kind: str, ident: str) -> str:
        """A memory/session namespace of this tenant (`user:<id>`, `task:<id>`, `session:<id>`)."""
        return f"tenant:{self.name}/{kind}:{ident}"

    def user_namespace(self, user: str) -> str | None:
        """The memory namespace of one of this tenant's declared users; None for any other name
        (undeclared, or another tenant's: the same answer, so nothing leaks across tenants)."""
        return self.namespace("user", user) if isinstance(user, str) and user in self.users else None

    def task_namespace(self, task: str) -> str | None:
        """The memory namespace of one of this tenant's declared tasks; None for any other name."""
        return self.namespace("task", task) if isinstance(task, str) and task in self.tasks else None


class Tenants:
    """Who may call the server. Without keys, every request is the anonymous tenant."""

    def __init__(self, entries: list[tuple[bytes, Tenant]] = ()):
        self._entries = list(entries)
        self.anonymous = None if self._entries else Tenant(ANONYMOUS)

    @property
    def required(self) -> bool:
        return bool(self._entries)

    @property
    def names(self) -> list[str]:
        return sorted({t.name for _, t in self._entries})

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer <key>` header, or None (wrong or missing key)."""
        if not self._entries:
            return self.anonymous
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogatepass")).digest()
        found = None
        for d, tenant in self._entries:                    # every entry, no early exit
            if hmac.compare_digest(d, digest) and found is None:
                found = tenant
        return found

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, keys_file: str | Path | None = None, environ: dict[str, str] | None = None) -> "Tenants":
        """Tenants from a keys file and/or MEMSTACK_API_KEYS; raises ConfigError with every reason."""
        environ = os.environ if environ is None else environ
        reasons: list[str] = []
        specs: list[dict[str, Any]] = []
        if keys_file is not None:
            specs += _read_file(Path(keys_file), reasons)
        if environ.get(ENV_VAR):
            specs += _read_env(environ[ENV_VAR], reasons)
        entries: list[tuple[bytes, Tenant]] = []
        by_name: dict[str, Tenant] = {}
        seen: set[bytes] = set()
        for i, spec in enumerate(specs):
            where = spec.pop("_where", f"tenant #{i}")
            tenant, digests = _tenant(spec, where, reasons)
            if tenant is None:
                continue
            if tenant.name in by_name and by_name[tenant.name] != tenant:
                reasons.append(f"{where}: tenant {tenant.name!r} is defined twice with different quotas")
            by_name.setdefault(tenant.name, tenant)
            for d in digests:
                if d in seen:
                    reasons.append(f"{where}: a key of tenant {tenant.name!r} is also given to another entry")
                seen.add(d)
                entries.append((d, by_name[tenant.name]))
        if reasons:
            raise ConfigError(reasons, what="API keys")
        return cls(entries)


def _read_file(path: Path, reasons: list[str]) -> list[dict]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        reasons.append(f"{path}: cannot read the keys file ({type(e).__name__}: {e})")
        return []
    items = doc.get("tenants") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        reasons.append(f"{path}: expected a mapping with a non-empty list 'tenants'")
        return []
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            reasons.append(f"{path}: tenants[{i}] must be a mapping, got {type(item).__name__}")
            continue
        out.append({**item, "_where": f"{path}: tenants[{i}]"})
    return out


def _read_env(value: str, reasons: list[str]) -> list[dict]:
    out = []
    for i, part in enumerate(p for p in value.split(",") if p.strip()):
        name, sep, key = part.strip().partition("=")
        if not sep:
            reasons.append(f"{ENV_VAR} entry #{i}: expected TENANT=KEY")   # the entry may hold a key: not echoed
            continue
        out.append({"name": name, "keys": [key], "_where": f"{ENV_VAR} entry #{i}"})
    return out


def _tenant(spec: dict, where: str, reasons: list[str]) -> tuple[Tenant | None, list[bytes]]:
    known = {"name", "keys", "key_sha256", "pin_quota_blocks", "kv_quota_blocks", "max_concurrent", "users", "tasks"}
    n0 = len(reasons)
    if unknown := sorted(set(spec) - known):
        reasons.append(f"{where}: unknown field(s) {unknown}; valid: {sorted(known)}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        reasons.append(f"{where}: name must match {NAME_RE.pattern}, got {name!r}")
    digests = []
    keys, hashes = spec.get("keys") or [], spec.get("key_sha256") or []
    if not isinstance(keys, list) or not isinstance(hashes, list):
        reasons.append(f"{where}: keys and key_sha256 must be lists")
        keys, hashes = [], []
    for j, k in enumerate(keys):
        if not isinstance(k, str) or len(k.strip()) < MIN_KEY_LEN or k != k.strip() or any(c.isspace() for c in k):
            reasons.append(f"{where}: keys[{j}] must be a string of >= {MIN_KEY_LEN} characters without spaces")
        else:
            digests.append(hashlib.sha256(k.encode("utf-8", "surrogatepass")).digest())
    for j, h in enumerate(hashes):
        if not isinstance(h, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", h):
            reasons.append(f"{where}: key_sha256[{j}] must be 64 hex digits")
        else:
            digests.append(bytes.fromhex(h))
    if not keys and not hashes:
        reasons.append(f"{where}: give at least one key (keys or key_sha256)")
    quotas = {}
    for f in ("pin_quota_blocks", "kv_quota_blocks", "max_concurrent"):
        v = spec.get(f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "pin_quota_blocks" else 1)):
            reasons.append(f"{where}: {f} must be an integer >= {0 if f == 'pin_quota_blocks' else 1} or null, got {v!r}")
        quotas[f] = v
    ids = {}
    for f in ("users", "tasks"):
        v = ids[f] = spec.get(f) or []
        if not isinstance(v, list) or any(not isinstance(u, str) or not USER_RE.fullmatch(u) for u in v):
            reasons.append(f"{where}: {f} must be a list of ids matching {USER_RE.pattern}, got {v!r}")
        elif len(set(v)) != len(v):
            reasons.append(f"{where}: {f} lists a {f[:-1]} twice")
    if len(reasons) > n0:
        return None, []
    return Tenant(name, **quotas, users=tuple(ids["users"]), tasks=tuple(ids["tasks"])), digests


__all__ = ["Tenant", "Tenants", "ENV_VAR", "ANONYMOUS"]
