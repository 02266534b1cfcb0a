"""User and task memory routes: learn while serving, and keep, move or forget what was learned.

    POST /v1/memory/learn     {user | task, facts: [text] | messages: [{role, content}]} -> an online update
    GET  /v1/memory/log       ?user=<id> | ?task=<id> -> the versions of its rows, HEAD marked
    POST /v1/memory/rollback  {user | task, version} -> HEAD moves there; the next request reads it
    POST /v1/memory/export    {user | task} -> {data: base64 safetensors delta (checksummed)}
    POST /v1/memory/import    {user | task, data} -> the delta applied onto its empty rows
    POST /v1/memory/forget    {user | task} -> everything of it, in every tier, gone (and what was removed)

Every route names exactly one of `user` (one of the authenticated tenant's declared users, keys
file `users:`) or `task` (one of its tasks, `tasks:`); any other name -- unknown, or another
tenant's -- is the same 404 (`user_not_found` / `task_not_found`). Nothing in a body names a
namespace: the server derives `tenant:<name>/user:<id>` or `tenant:<name>/task:<id>`. A completion
or chat request reads its user's and its task's rows together (`user` and `task` on the request).
Learning runs in a worker thread (engine/user_memory.py) on a copy of the rows, so other requests
keep being served; the new rows are installed in the engine thread between two steps, before the
response returns: the next request reads them. Refusals (bad input, rate limit 429, the safety
policy) change nothing and list every reason.

Forget (engine/forget.py, engine/user_memory.py): in the engine thread, requests reading the
namespace are aborted, every memory drops its rows / datastore entries of it (persisted), memory
sessions that read it are closed, and the cached K/V blocks made under it (device pool, host and
disk tiers) are dropped -- other users' cached blocks stay; then every stored version is deleted.
The response lists what each tier removed and `left` (all zeros: nothing of it remains).
"""
from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from memstack.engine.user_memory import MemoryRefused
from memstack.server.errors import APIError
from memstack.server.openai_api import state_of, tenant_of
from memstack.server.schemas import Message, Model, Str
from memstack.server.tenants import Tenant

router = APIRouter()
UserId = Annotated[str, Field(min_length=1, max_length=64)]
Fact = Annotated[str, Field(min_length=1, max_length=4096)]


class UserBody(Model):
    """Names the memory a route acts on: exactly one of a user or a task of the tenant."""

    user: UserId | None = None
    task: UserId | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _target(cls, data, handler):
        """Every reason at once: the body-level ones (`reasons`) beside the fields' own errors."""
        try:
            body = handler(data)
        except ValidationError as e:
            errors = [{"type": x["type"], "loc": x["loc"], "input": x.get("input"), "ctx": x.get("ctx") or {}}
                      for x in e.errors()]
            try:                                      # the raw body: its fields may be anything here
                early = cls.model_construct(**data).reasons() if isinstance(data, dict) else []
            except Exception:  # noqa: BLE001 -- a field too broken to judge: its own error says so
                early = []
            errors += [{"type": PydanticCustomError("body", r), "loc": (), "input": data} for r in early]
            raise ValidationError.from_exception_data(e.title, errors) from None
        if reasons := body.reasons():
            raise ValueError("; ".join(reasons))
        return body

    def reasons(self) -> list[str]:
        return ["give exactly one of user or task (whose memory this is)"] if (self.user is None) == (
            self.task is None) else []

    @property
    def who(self) -> dict:
        return {"user": self.user} if self.user is not None else {"task": self.task}


class LearnBody(UserBody):
    facts: Annotated[list[Fact], Field(min_length=1, max_length=64)] | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=64)] | None = None

    def reasons(self) -> list[str]:
        r = super().reasons()
        if (self.facts is None) == (self.messages is None):
            r.append("give exactly one of facts (texts to remember) or messages (a conversation turn)")
        if self.messages is not None and not any(m.role == "user" and m.text.strip() for m in self.messages):
            r.append("messages: a conversation turn to learn from needs a non-empty user message")
        return r


class RollbackBody(UserBody):
    version: Annotated[int, Field(ge=1, le=2**31 - 1, strict=True)]


class ImportBody(UserBody):
    data: Annotated[Str, Field(min_length=1, max_length=64 << 20)]


def _memory(request: Request, tenant: Tenant, who: dict):
    """(server state, namespace) of the route's user or task; 404 for any name not the tenant's."""
    st = state_of(request)
    if getattr(st, "memory", None) is None:
        raise APIError(404, "this server has no user memory (serve a model whose memory has per-user rows)",
                       code="memory_not_enabled")
    (kind, name), = who.items()
    ns = tenant.user_namespace(name) if kind == "user" else tenant.task_namespace(name)
    if ns is None:
        raise APIError(404, f"no {kind} {name!r} in this tenant", kind, code=f"{kind}_not_found")
    return st, ns


def _install(st):
    rows = st.memory.rows

    def install(ns: str, table) -> None:            # waits until the engine thread has installed it
        st.loop.post(rows.install, ns, table).result(timeout=60)
    return install


async def _run(fn, *args):
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except MemoryRefused as e:
        raise APIError(e.status, "; ".join(e.reasons), code="memory_refused") from None


@router.post("/v1/memory/learn")
async def learn(body: LearnBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.who)
    if st.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: it cannot learn from text", "facts")
    texts = body.facts if body.facts is not None else [m.text for m in body.messages if m.role == "user" and m.text.strip()]
    ids = [[st.tokenizer.eot_id] + st.tokenizer.encode(t) for t in texts]     # each text starts a document
    out = await _run(st.memory.learn, ns, ids, _install(st), {"source": "facts" if body.facts else "messages"})
    return {"object": "memory.update", **body.who, **{k: v for k, v in out.items() if k != "namespace"}}


@router.get("/v1/memory/log")
async def log(request: Request, user: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
              task: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
              tenant: Tenant = Depends(tenant_of)):
    if (user is None) == (task is None):
        raise APIError(400, "give exactly one of user or task (whose memory this is)", "user")
    who = {"user": user} if user is not None else {"task": task}
    st, ns = _memory(request, tenant, who)
    return {"object": "memory.log", **who, **await _run(st.memory.log, ns)}


@router.post("/v1/memory/rollback")
async def rollback(body: RollbackBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.who)
    out = await _run(st.memory.rollback, ns, body.version, _install(st))
    return {"object": "memory.rollback", **body.who, "head": out["head"]}


@router.post("/v1/memory/export")
async def export(body: UserBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.who)
    out = await _run(st.memory.export, ns)
    return {"object": "memory.delta", **body.who, **{k: v for k, v in out.items() if k != "namespace"}}


@router.post("/v1/memory/import")
async def import_(body: ImportBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.who)
    out = await _run(st.memory.import_, ns, body.data, _install(st))
    return {"object": "memory.import", **body.who, "version": out["version"], "head": out["head"]}


@router.post("/v1/memory/forget")
async def forget(body: UserBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.who)
    engine = st.loop.engine

    def drop(name: str) -> dict:                    # in the engine thread, between two steps
        try:
            return st.loop.post(engine.forget, name).result(timeout=600)
        except Exception as e:  # noqa: BLE001 -- e.g. a datastore that could not be written back
            raise MemoryRefused(f"forget did not finish ({type(e).__name__}: {e}); what it removed stays removed, "
                                "the stored versions are kept: retry the forget", status=500) from None
    out = await _run(st.memory.forget, ns, drop)
    return {"object": "memory.forget", **body.who, **{k: v for k, v in out.items() if k != "namespace"}}


__all__ = ["router"]
