"""User memory routes: learn while serving, and keep, move or forget what was learned.

    POST /v1/memory/learn     {user, facts: [text] | messages: [{role, content}]} -> an online update
    GET  /v1/memory/log       ?user=<id> -> the versions of the user's rows, HEAD marked
    POST /v1/memory/rollback  {user, version} -> HEAD moves there; the next request reads it
    POST /v1/memory/export    {user} -> {data: base64 safetensors delta (checksummed)}
    POST /v1/memory/import    {user, data} -> the delta applied onto the user's empty rows
    POST /v1/memory/forget    {user} -> rows, every stored version, sessions, K/V: gone (and what was removed)

`user` is one of the authenticated tenant's declared users (keys file `users:`); any other name
-- unknown, or another tenant's -- is the same 404. Nothing in a body names a namespace: the
server derives `tenant:<name>/user:<id>`. Learning runs in a worker thread (engine/user_memory.py)
on a copy of the user's rows, so other requests keep being served; the new rows are installed in
the engine thread between two steps, before the response returns: the user's next request reads
them. Refusals (bad input, rate limit 429, the safety policy) change nothing and list every reason.
"""
from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field, model_validator

from memstack.engine.user_memory import MemoryRefused
from memstack.server.errors import APIError
from memstack.server.openai_api import state_of, tenant_of
from memstack.server.schemas import Message, Model, Str
from memstack.server.tenants import Tenant

router = APIRouter()
UserId = Annotated[str, Field(min_length=1, max_length=64)]
Fact = Annotated[str, Field(min_length=1, max_length=4096)]


class UserBody(Model):
    user: UserId


class LearnBody(UserBody):
    facts: Annotated[list[Fact], Field(min_length=1, max_length=64)] | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.facts is None) == (self.messages is None):
            raise ValueError("give exactly one of facts (texts to remember) or messages (a conversation turn)")
        if self.messages is not None and not any(m.role == "user" and m.text.strip() for m in self.messages):
            raise ValueError("messages: a conversation turn to learn from needs a non-empty user message")
        return self


class RollbackBody(UserBody):
    version: Annotated[int, Field(ge=1, le=2**31 - 1, strict=True)]


class ImportBody(UserBody):
    data: Annotated[Str, Field(min_length=1, max_length=64 << 20)]


def _memory(request: Request, tenant: Tenant, user: str):
    st = state_of(request)
    if getattr(st, "memory", None) is None:
        raise APIError(404, "this server has no user memory (serve a model whose memory has per-user rows)",
                       code="memory_not_enabled")
    ns = tenant.user_namespace(user)
    if ns is None:
        raise APIError(404, f"no user {user!r} in this tenant", "user", code="user_not_found")
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
    st, ns = _memory(request, tenant, body.user)
    if st.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: it cannot learn from text", "facts")
    texts = body.facts if body.facts is not None else [m.text for m in body.messages if m.role == "user" and m.text.strip()]
    ids = [[st.tokenizer.eot_id] + st.tokenizer.encode(t) for t in texts]     # each text starts a document
    out = await _run(st.memory.learn, ns, ids, _install(st), {"source": "facts" if body.facts else "messages"})
    return {"object": "memory.update", "user": body.user, **{k: v for k, v in out.items() if k != "namespace"}}


@router.get("/v1/memory/log")
async def log(request: Request, user: Annotated[str, Query(min_length=1, max_length=64)],
              tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, user)
    return {"object": "memory.log", "user": user, **await _run(st.memory.log, ns)}


@router.post("/v1/memory/rollback")
async def rollback(body: RollbackBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.user)
    out = await _run(st.memory.rollback, ns, body.version, _install(st))
    return {"object": "memory.rollback", "user": body.user, "head": out["head"]}


@router.post("/v1/memory/export")
async def export(body: UserBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.user)
    out = await _run(st.memory.export, ns)
    return {"object": "memory.delta", "user": body.user, **{k: v for k, v in out.items() if k != "namespace"}}


@router.post("/v1/memory/import")
async def import_(body: ImportBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.user)
    out = await _run(st.memory.import_, ns, body.data, _install(st))
    return {"object": "memory.import", "user": body.user, "version": out["version"], "head": out["head"]}


@router.post("/v1/memory/forget")
async def forget(body: UserBody, request: Request, tenant: Tenant = Depends(tenant_of)):
    st, ns = _memory(request, tenant, body.user)
    engine = st.loop.engine

    def drop(name: str) -> dict:                    # in the engine thread, between two steps
        return st.loop.post(forget_in_engine, engine, name).result(timeout=60)
    out = await _run(st.memory.forget, ns, drop)
    return {"object": "memory.forget", "user": body.user, **{k: v for k, v in out.items() if k != "namespace"}}


def forget_in_engine(engine, ns: str) -> dict:
    """Everything the engine holds for namespace `ns`: its requests in flight (aborted), every
    memory's rows / entries of it (`Memory.forget`), its memory sessions and their K/V blocks, and
    cached prefix blocks (keys do not record their user, so the whole prefix cache is dropped)."""
    aborted = [r.id for r in list(engine.requests.values()) if r.namespace == ns and not r.finished]
    for rid in aborted:
        engine.abort(rid)
    rows = sum(m.forget(ns) for m in engine.serving.memory.memories)
    sessions = [sid for (t, sid) in list(engine.memory_sessions.sessions) if t == ns]
    for sid in sessions:
        engine.memory_sessions.close(ns, sid)
    cached = engine.pool.reset_cache() if engine.prefix_caching else 0
    left = sum(m.namespace_rows() is not None and m.namespace_rows().table(ns) is not None
               for m in engine.serving.memory.memories)
    return {"tables_dropped": rows, "requests_aborted": len(aborted), "sessions_closed": len(sessions),
            "cached_blocks_dropped": cached, "tables_left": left}


__all__ = ["router", "forget_in_engine"]
