"""The ASGI app: FastAPI routes behind authentication and request bounds.

    GET    /health                       engine loop alive? (no key needed; 503 when it is not)
    GET    /v1/models                    OpenAI: the served model
    POST   /v1/completions               OpenAI: text completions (streaming: SSE)
    POST   /v1/chat/completions          OpenAI: chat completions (the model's chat template)
    POST   /v1/prefixes                  memstack: pin a prompt prefix {prompt, ttl} -> {id, tokens, ...}
    GET    /v1/prefixes                  memstack: this tenant's pinned prefixes
    GET    /v1/prefixes/{id}             memstack: one of them
    DELETE /v1/prefixes/{id}             memstack: unpin it
    POST/GET/DELETE /v1/sessions[/{id}]  memstack: memory sessions (server/sessions_api.py); "session" on requests
    POST   /v1/memory/{learn,rollback,export,import,forget}, GET /v1/memory/log   user memory (memory_api.py)

Order of the outer layers: `Auth` (a /v1 request without a valid key is refused before its body
is read; the connection is then closed) -> `BodyLimits` (limits.py) -> FastAPI (pydantic
validation, OpenAI-shaped errors). Every engine call goes through the engine loop's thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from memstack.server import errors
from memstack.server.chat import ChatTemplate, chat_template, stop_ids
from memstack.server.config import ServerConfig
from memstack.server.errors import error_bytes
from memstack.server.limits import BodyLimits
from memstack.server.loop import EngineLoop
from memstack.server.memory_api import router as memory_router
from memstack.server.sessions_api import router as sessions_router
from memstack.server.openai_api import _encode, router, state_of, tenant_of
from memstack.server.pins import Pins, Quotas
from memstack.server.schemas import PrefixCreate
from memstack.server.tenants import Tenant, Tenants

log = logging.getLogger("memstack.server")
PUBLIC = ("/health", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect")


@dataclass
class State:
    config: ServerConfig
    loop: EngineLoop
    tokenizer: object
    tenants: Tenants
    template: ChatTemplate
    chat_stop_ids: tuple[int, ...]
    quotas: Quotas
    pins: Pins
    started: float
    memory: object = None          # engine/user_memory.py's UserMemory: per-user rows learned while serving


class Auth:
    """ASGI middleware: maps `Authorization: Bearer <key>` to a tenant (scope["state"]["tenant"])."""

    def __init__(self, app, tenants: Tenants):
        self.app, self.tenants = app, tenants

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith(PUBLIC):
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            tenant = self.tenants.authenticate(auth.decode("latin-1") if auth is not None else None)
            if tenant is None:
                data = error_bytes(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                   code="invalid_api_key")
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                    (b"www-authenticate", b"Bearer"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": data})
                return
            scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def create_app(loop: EngineLoop, tokenizer, config: ServerConfig = ServerConfig(), tenants: Tenants | None = None,
               memory=None) -> FastAPI:
    tenants = tenants if tenants is not None else Tenants()
    engine = loop.engine
    pinned_cap = int(engine.num_blocks * config.pinned_share)
    template = chat_template(tokenizer)
    state = State(config, loop, tokenizer, tenants, template,
                  stop_ids(tokenizer, template) if tokenizer is not None else (), Quotas(engine, pinned_cap),
                  Pins(loop, pinned_cap, max(0, pinned_cap // 2), config.pin_ttl_default_s, config.pin_ttl_max_s),
                  time.time(), memory)
    state.quotas.pins, state.pins.quotas = state.pins, state.quotas    # one KV quota over requests, sessions, pins

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.create_task(_expire_pins(state))
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="memstack", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat on memstack's engine, with pinned prefixes.")
    app.state.memstack = state
    errors.install(app)
    app.include_router(router)
    app.include_router(memory_router)
    app.include_router(sessions_router)

    @app.get("/health")
    async def health():
        alive = loop.alive
        body = {"status": "ok" if alive else "dead", "engine": "running" if alive else (loop.dead or "stopped"),
                "steps": loop.steps, "last_error": loop.last_error}
        if alive:
            try:
                body.update(await asyncio.wait_for(loop.call(loop.stats), 10))
            except asyncio.TimeoutError:
                body.update(status="stalled", engine="the engine thread did not answer within 10 s")
        return JSONResponse(body, 200 if body["status"] == "ok" else 503)

    @app.post("/v1/prefixes")
    async def create_prefix(body: PrefixCreate, request: Request, tenant: Tenant = Depends(tenant_of)):
        st = state_of(request)
        tokens = await _encode(st, body.prompt, "prompt") if isinstance(body.prompt, str) else list(body.prompt)
        pin = await st.pins.create(tenant, tokens, body.ttl)
        return pin.public()

    @app.get("/v1/prefixes")
    async def list_prefixes(request: Request, tenant: Tenant = Depends(tenant_of)):
        return {"object": "list", "data": [p.public() for p in state_of(request).pins.of(tenant)]}

    @app.get("/v1/prefixes/{pin_id}")
    async def get_prefix(pin_id: str, request: Request, tenant: Tenant = Depends(tenant_of)):
        return state_of(request).pins.get(tenant, pin_id).public()

    @app.delete("/v1/prefixes/{pin_id}")
    async def delete_prefix(pin_id: str, request: Request, tenant: Tenant = Depends(tenant_of)):
        pin = await state_of(request).pins.delete(tenant, pin_id)
        return {"id": pin.id, "object": "prefix", "deleted": True}

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception):            # a server bug: this request fails, loudly
        log.error("unhandled error: %s: %s", type(e).__name__, e, exc_info=e)
        return JSONResponse(errors.error_body(500, f"internal error ({type(e).__name__})"), 500)

    outer = BodyLimits(app, config.max_body_bytes, config.body_timeout_s, config.max_json_depth,
                       {"POST /v1/sessions/import": config.max_import_bytes})
    return Auth(outer, tenants)          # type: ignore[return-value] -- an ASGI app; `.app` chain reaches FastAPI


async def _expire_pins(state: State) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            await state.pins.expire()
        except Exception as e:  # noqa: BLE001 -- e.g. the engine died: /health reports that
            log.warning("pin expiry failed: %s", e)


def fastapi_of(app) -> FastAPI:
    while not isinstance(app, FastAPI):
        app = app.app
    return app
