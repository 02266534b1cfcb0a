"""A real server on 127.0.0.1 (ephemeral port, uvicorn in a thread) around a tiny model, and raw
HTTP helpers for the attacks the `openai` client cannot send."""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.data.tokenizers import get_tokenizer
from memstack.engine import Engine, EngineConfig
from memstack.memory.kv.config import DenseKVConfig
from memstack.server import Server, ServerConfig, Tenants

TOK = get_tokenizer("byte")
KEYS = {"acme": "sk-acme-0123456789abcdef", "beta": "sk-beta-0123456789abcdef"}


def tiny():
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, seg_len=64, init_std=0.3)
    return build_model(b, [DenseKVConfig()]).eval()


def start(model=None, tenants: Tenants | None = None, engine_cfg: EngineConfig | None = None, **cfg) -> Server:
    model = model if model is not None else tiny()
    eng = Engine(model, engine_cfg or EngineConfig(block_size=4, num_blocks=128, max_model_len=200), tokenizer="byte")
    cfg = {"port": 0, "log_level": "warning", "access_log": False, "model_name": "tiny", **cfg}
    return Server(eng, TOK, ServerConfig(**cfg), tenants).start()


@pytest.fixture(scope="module")
def server():
    srv = start()
    yield srv
    srv.stop()


def raw(port: int, data: bytes, timeout: float = 10.0, read_until_close: bool = True) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if not read_until_close:
                    break
        except socket.timeout:
            pass
        return out


def request(method: str, path: str, body=None, headers: dict | None = None, raw_body: bytes | None = None) -> bytes:
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else b"")
    h = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    return f"{method} {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode() \
        + b"\r\n" + data


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of HTTP/1.1 responses with Content-Length bodies: [(status, body)]."""
    out = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def wait_idle(srv: Server, timeout: float = 10.0) -> dict:
    """Wait until the engine has no request running or waiting; its stats."""
    deadline = time.time() + timeout
    while True:
        stats = srv.loop.post(srv.loop.stats).result(5)
        if stats["running"] == 0 and stats["waiting"] == 0 or time.time() > deadline:
            return stats
        time.sleep(0.05)
