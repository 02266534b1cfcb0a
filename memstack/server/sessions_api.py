"""Memory sessions over HTTP (memstack's extension beside the OpenAI routes).

    POST   /v1/sessions          {id?} -> a new, empty session of the calling tenant
    GET    /v1/sessions          this tenant's sessions
    GET    /v1/sessions/{id}     one of them (tokens held, computed, where its K/V lives, busy)
    DELETE /v1/sessions/{id}     close it (its K/V blocks go back to the pool)
    POST   /v1/sessions/{id}/export  -> {manifest, tensors}: the session as the library exports it
    POST   /v1/sessions/import   {manifest, tensors, id?} -> the session, under this tenant again

A completion or chat request with `"session": id` continues that session's document: its prompt
is appended to what the session holds and decoding resumes from the memory state and K/V the
previous request left (the engine's memory sessions, docs/runtime.md). Sessions are owned by the
tenant the API key names -- another tenant's id is "not found", exactly like an unknown one.

Export / import carry exactly the library's export (engine/memory_sessions.py): `manifest` is the
sealed document's text (tenant, id, model namespace, tokens, state structure, K/V bookkeeping,
every field under one SHA-256) and `tensors` the base64 of the safetensors file it names by its
SHA-256 -- so a file exported by `MemorySessions.export` can be uploaded, and an HTTP export saved
as `<name>.json` + its tensor file imports with the library. An import is validated by the library
(every reason listed, nothing changed on refusal): a document of another tenant, another model or
engine layout, a manifest or tensor file that fails its checksum, tokens outside the vocabulary.
Its K/V stays in host memory until a request continues it. Its blocks count against the tenant's
KV quota (pins.py) like those of any session; the body is bounded by `max_import_bytes`, and a
tenant holds at most `max_sessions` sessions.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
import tempfile
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import Field

from memstack.atomic import versioned_name_re
from memstack.engine.memory_sessions import SessionError
from memstack.server.errors import APIError
from memstack.server.openai_api import state_of, tenant_of
from memstack.server.schemas import SESSION_ID, Model, Str
from memstack.server.tenants import Tenant

router = APIRouter()
STEM = "session"                  # the file name exports are written under (in a private temporary folder)


class SessionCreate(Model):
    id: Annotated[str, Field(pattern=SESSION_ID)] | None = Field(None, description="default: a random id")


class SessionImport(Model):
    manifest: Annotated[Str, Field(min_length=1, description="the sealed document an export returned (text)")]
    tensors: Annotated[Str, Field(min_length=1, description="base64 of the safetensors file the manifest names")]
    id: Annotated[str, Field(pattern=SESSION_ID)] | None = Field(None, description="default: the exported id")


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


def _within(ms, tenant: str, limit: int, fn, *args):
    """Engine thread: fn(*args) unless the tenant already holds `limit` sessions (checked and done
    in one command, so two concurrent creates cannot both pass)."""
    if ms.count(tenant) >= limit:
        raise APIError(429, f"you hold {limit} memory sessions, the most this server allows a tenant (close one "
                            "with DELETE /v1/sessions/{id})", code="session_quota")
    return fn(*args)


@router.post("/v1/sessions")
async def create_session(body: SessionCreate, request: Request, tenant: Tenant = Depends(tenant_of)):
    st = state_of(request)
    ms = st.loop.engine.memory_sessions
    sid = body.id or "sess_" + secrets.token_urlsafe(18)
    await _call(request, _within, ms, tenant.name, st.config.max_sessions, ms.create, tenant.name, sid)
    return _public(await _call(request, ms.info, tenant.name, sid))


@router.post("/v1/sessions/import")
async def import_session(body: SessionImport, request: Request, tenant: Tenant = Depends(tenant_of)):
    st = state_of(request)
    ms = st.loop.engine.memory_sessions
    reasons, meta, data = await anyio.to_thread.run_sync(_parse_import, body)   # up to 64 MiB: off the event loop
    if reasons:
        raise APIError(400, "; ".join(reasons), reasons[0].split(":")[0], code="invalid_session")
    name, shape = meta.get("tensors"), meta.get("shape")
    blocks = shape[0] if isinstance(shape, list) and shape and isinstance(shape[0], int) and shape[0] >= 0 else 0
    st.quotas.reserve(tenant, blocks, "importing this session")     # (the import checks the shape it claims)
    try:
        with tempfile.TemporaryDirectory(prefix="memstack-import-") as d:
            path = Path(d) / STEM
            await anyio.to_thread.run_sync(_write_import, path, body.manifest, name, data)
            try:
                s = await st.loop.call(_within, ms, tenant.name, st.config.max_sessions, ms.import_, path, tenant.name,
                                       body.id)
            except SessionError as e:
                why = [_scrub(r, d) for r in e.reasons]
                status = 409 if all("already exists" in r for r in why) else 400
                raise APIError(status, "; ".join(why), "manifest",
                               code="session_conflict" if status == 409 else "invalid_session") from None
    finally:
        st.quotas.unreserve(tenant, blocks)        # the session holds them now (counted as its own), or nothing
    return _public(await _call(request, ms.info, tenant.name, s.id))


def _parse_import(body: SessionImport) -> tuple[list[str], dict | None, bytes]:
    reasons, meta, data = [], None, b""
    try:
        data = base64.b64decode(body.tensors, validate=True)
    except (binascii.Error, ValueError):
        reasons.append("tensors: not valid base64")
    try:
        meta = json.loads(body.manifest)
    except ValueError as e:
        reasons.append(f"manifest: not valid JSON ({e})")
    if meta is not None and not isinstance(meta, dict):
        reasons.append(f"manifest: must be a JSON object (a session export's document), got {type(meta).__name__}")
    return reasons, meta, data


def _write_import(path: Path, manifest: str, name, data: bytes) -> None:
    path.with_name(STEM + ".json").write_text(manifest, encoding="utf-8")
    if isinstance(name, str) and versioned_name_re(STEM).fullmatch(name):   # only the name an export gives
        (path.parent / name).write_bytes(data)


def _scrub(reason: str, folder: str) -> str:
    """A library reason without the server's temporary paths."""
    return reason.replace(f"{folder}/{STEM}.json", "manifest").replace(f"{folder}/{STEM}: ", "").replace(
        f"{folder}/", "")


@router.post("/v1/sessions/{sid}/export")
async def export_session(sid: str, request: Request, tenant: Tenant = Depends(tenant_of)):
    ms = state_of(request).loop.engine.memory_sessions
    with tempfile.TemporaryDirectory(prefix="memstack-export-") as d:
        path = Path(d) / STEM
        await _call(request, ms.export, tenant.name, sid, path)        # engine thread: its K/V, state, tokens
        manifest, tensors = await anyio.to_thread.run_sync(_read_export, path)
    info = json.loads(manifest)
    return {"id": sid, "object": "session.export", "tokens": len(info["tokens"]), "blocks": info["shape"][0],
            "bytes": len(tensors), "manifest": manifest, "tensors": base64.b64encode(tensors).decode()}


def _read_export(path: Path) -> tuple[str, bytes]:
    manifest = path.with_name(STEM + ".json").read_text(encoding="utf-8")
    return manifest, (path.parent / json.loads(manifest)["tensors"]).read_bytes()


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
