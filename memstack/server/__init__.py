"""The HTTP server: OpenAI-compatible, multi-tenant, hardened (FastAPI on uvicorn).

    from memstack.server import Server, ServerConfig, Tenants
    server = Server(engine, tokenizer, ServerConfig(port=8000), Tenants.load("keys.yaml")).start()

Files: config.py (ServerConfig), tenants.py (API keys -> tenants -> namespaces), schemas.py
(pydantic request models), loop.py (the engine thread), generation.py (one request's choices),
text.py (detokenization, stop strings), chat.py (chat templates), pins.py (owned pinned prefixes,
quotas), limits.py (body/JSON/time bounds, slowloris guard), errors.py (OpenAI error shape),
openai_api.py (the OpenAI routes), app.py (the ASGI app), run.py (uvicorn).
"""
from memstack.server.config import ServerConfig
from memstack.server.run import Server
from memstack.server.tenants import Tenant, Tenants

__all__ = ["Server", "ServerConfig", "Tenant", "Tenants"]
