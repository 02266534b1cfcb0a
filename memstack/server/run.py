"""Start the server: uvicorn (h11, with the head deadline of limits.py) around the app.

    server = Server(engine, tokenizer, ServerConfig(port=0), tenants)
    server.start()              # in a thread (tests, notebooks); server.port is the bound port
    ...
    server.stop()
    # or, in the foreground (the CLI):  server.run()

A server on a host other than loopback without API keys refuses to start unless
`allow_unauthenticated` is set: an open port must not be an open engine by accident.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from memstack.errors import ConfigError
from memstack.server.app import create_app
from memstack.server.config import ServerConfig, is_loopback
from memstack.server.limits import guarded_h11
from memstack.server.loop import EngineLoop
from memstack.server.tenants import Tenants


def check_exposure(config: ServerConfig, tenants: Tenants) -> list[str]:
    if not is_loopback(config.host) and not tenants.required and not config.allow_unauthenticated:
        return [f"host {config.host!r} is reachable from other machines and no API keys are configured: give keys "
                "(--api-keys FILE or the MEMSTACK_API_KEYS environment variable), serve on 127.0.0.1, or pass "
                "--allow-unauthenticated to serve anyone who can reach the port"]
    return []


class Server:
    def __init__(self, engine, tokenizer=None, config: ServerConfig = ServerConfig(), tenants: Tenants | None = None,
                 memory=None):
        """`memory`: a UserMemory (engine/user_memory.py) over the engine's model: per-user rows,
        learned while serving (/v1/memory/...); what it committed before is installed at start."""
        tenants = tenants if tenants is not None else Tenants()
        if reasons := check_exposure(config, tenants):
            raise ConfigError(reasons, what="server")
        self.config, self.tenants = config, tenants
        self.loop = EngineLoop(engine, stream_interval_s=config.stream_interval_s)
        if memory is not None:
            memory.restore(lambda ns, table: self.loop.post(memory.rows.install, ns, table).result(timeout=60))
        self.app = create_app(self.loop, tokenizer, config, tenants, memory)
        self.sock = socket.create_server((config.host, config.port), family=_family(config.host),
                                         backlog=config.backlog, reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, http=guarded_h11(config.head_timeout_s), lifespan="on", log_level=config.log_level,
            access_log=config.access_log, timeout_keep_alive=int(max(1, round(config.keep_alive_s))),
            limit_concurrency=config.max_connections, backlog=config.backlog, server_header=False,
            timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C / SIGTERM)."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.loop.stop()

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.sock])),
                                        name="memstack-http", daemon=True)
        self._thread.start()
        for _ in range(int(timeout / 0.02)):
            if self.uvicorn.started:
                return self
            if not self._thread.is_alive():
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("the HTTP server did not start")

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.loop.stop()
        self.sock.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
