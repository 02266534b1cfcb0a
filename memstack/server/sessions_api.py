"""Memory sessions over HTTP (memstack's extension beside the OpenAI routes).

    POST   /v1/sessions          {id?} -> a new, empty session of the calling tenant
    GET    /v1/sessions          this tenant's sessions
    GET    /v1/sessions/{id}     one of them (tokens held, computed, where its K/V lives, busy)
    DELETE /v1/sessions/{id}     close it (its K/V blocks go back to the pool)

A completion or chat request with `"session": id` continues that session's document: its prompt
is appended to what the session holds and decoding resumes from the memory state and K/V the
previous request left (the engine's memory sessions, docs/runtime.md). Sessions are owned by the
tenant the API key names -- another tenant's id is "not found", exactly like an unknown one.
"""
from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from memstack.engine.memory_sessions import SessionError
from memstack.server.errors import APIError
from memstack.server.openai_api import state_of, tenant_of
from memstack.server.schemas import SESSION_ID, Model
from memstack.server.tenants import Tenant

router = APIRouter()


class SessionCreate(Model):
    id: Annotated[str, Field(pattern=SESSION_ID)] | None = Field(None, description="default: a random id")


def _refused(e: SessionError) -> APIError:
    text = "; ".join(e.reasons)
    if any(r.startswith("no session") for r in e.reasons):
        return APIError(404, text, "id", code="session_not_found")
    return APIError(409, text, "id", code="session_conflict")


async def _call(request: Request, fn, *args):
    st = state_of(request)
    try:
        return await st.loop.call(fn, *args)
    except SessionError as e:
        raise _refused(e) from None


def _public(info: dict) -> dict:
    return {"id": info["id"], "object": "session", "tokens": info["tokens"], "computed": info["computed"],
            "where": info["where"], "blocks": info["blocks"], "busy": info["busy"] is not None}


@router.post("/v1/sessions")
async def create_session(body: SessionCreate, request: Request, tenant: Tenant = Depends(tenant_of)):
    ms = state_of(request).loop.engine.memory_sessions
    sid = body.id or "sess_" + secrets.token_urlsafe(18)
    await _call(request, ms.create, tenant.name, sid)
    return _public(await _call(request, ms.info, tenant.name, sid))


@router.get("/v1/sessions")
async def list_sessions(request: Request, tenant: Tenant = Depends(tenant_of)):
    ms = state_of(request).loop.engine.memory_sessions
    return {"object": "list", "data": [_public(i) for i in await _call(request, ms.list, tenant.name)]}


@router.get("/v1/sessions/{sid}")
async def get_session(sid: str, request: Request, tenant: Tenant = Depends(tenant_of)):
    ms = state_of(request).loop.engine.memory_sessions
    return _public(await _call(request, ms.info, tenant.name, sid))


@router.delete("/v1/sessions/{sid}")
async def delete_session(sid: str, request: Request, tenant: Tenant = Depends(tenant_of)):
    ms = state_of(request).loop.engine.memory_sessions
    await _call(request, ms.close, tenant.name, sid)
    return {"id": sid, "object": "session", "deleted": True}
