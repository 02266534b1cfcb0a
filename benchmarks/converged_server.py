"""Learn -> visible latency through the real server (uvicorn, HTTP), and served request latency
with and without user rows, on a small model (the CPU target: <= 1 s from the interaction to the
user's next request reading it). Prints one JSON record.

    python benchmarks/converged_server.py [--steps 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.data.tokenizers import get_tokenizer
    from memstack.engine import Engine, EngineConfig
    from memstack.engine.user_memory import LearnConfig, UserMemory
    from memstack.memory.sparse.config import EngramConfig
    from memstack.server import Server, ServerConfig, Tenants
    from memstack.server.tenants import Tenant

    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=tok.vocab_size, d_model=a.d_model, n_layers=a.layers, n_heads=4, seg_len=256)
    model = build_model(ModelConfig(b, (EngramConfig(layers=(a.layers - 1,), heads=4, head_dim=16,
                                                     user_rows_per_head=257, value_init_std=0.1),))).eval()
    eng = Engine(model, EngineConfig(block_size=16, num_blocks=256, max_model_len=256), tokenizer="byte")
    key = "sk-bench-0123456789abcdef"
    tenants = Tenants([(hashlib.sha256(key.encode()).digest(), Tenant("bench", users=tuple(f"u{i}" for i in range(64))))])
    canary = [[tok.eot_id] + tok.encode("the quick brown fox jumps over the lazy dog")]
    tmp = tempfile.TemporaryDirectory()
    mem = UserMemory(eng.serving, Path(tmp.name) / "users", LearnConfig(steps=a.steps, rate_per_min=1000), canary)
    srv = Server(eng, tok, ServerConfig(port=0, log_level="warning", access_log=False), tenants, mem).start()

    def post(path, body):
        req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def complete(user):
        t0 = time.perf_counter()
        body = {"prompt": "my dog is called", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        post("/v1/completions", {**body, **({"user": user} if user else {})})
        return time.perf_counter() - t0
    try:
        complete(None)
        visible, learn_s, plain, user = [], [], [], []
        for i in range(a.repeats):
            t0 = time.perf_counter()
            out = post("/v1/memory/learn", {"user": f"u{i}", "facts": [f"my dog is called Rex{i}."]})
            complete(f"u{i}")                                   # the next request, reading the new rows
            visible.append(time.perf_counter() - t0)
            learn_s.append(out["latency_s"])
            plain.append(complete(None))
            user.append(complete(f"u{i}"))
        rec = {"what": "converged server", "model": f"d{a.d_model} L{a.layers} byte", "steps": a.steps,
               "learn_to_next_response_s": statistics.median(visible), "learn_s": statistics.median(learn_s),
               "request_plain_s": statistics.median(plain), "request_user_rows_s": statistics.median(user),
               "overhead": statistics.median(user) / statistics.median(plain) - 1, "threads": torch.get_num_threads()}
        print(json.dumps(rec))
    finally:
        srv.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
