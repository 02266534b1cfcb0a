"""The HTTP server with a real client over TCP: generation equals the engine's, streaming as
server-sent events, concurrent requests batched together, pins, bad requests get 400 with every
reason; and `memstack serve` as a real process."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.checkpoint import save_checkpoint
from memstack.config import BackboneConfig
from memstack.data.tokenizers import get_tokenizer
from memstack.engine import Engine, EngineConfig
from memstack.engine.server import serve
from memstack.generate import SamplingConfig, generate
from memstack.memory.kv.config import DenseKVConfig

TOK = get_tokenizer("byte")


def tiny():
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, seg_len=64, init_std=0.3)
    return build_model(b, [DenseKVConfig()]).eval()


@pytest.fixture(scope="module")
def server():
    model = tiny()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_model_len=200), tokenizer="byte")
    srv, loop = serve(eng, TOK, port=0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield model, srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    loop.stop()


def post(port, path, body, stream=False):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if stream:
        events = [json.loads(line[6:]) for line in r.read().decode().split("\n") if line.startswith("data: ")]
        return r.status, r.getheader("Content-Type"), events
    return r.status, json.loads(r.read())


def lib(model, ids, n):
    return [int(t) for t in generate(model, ids, SamplingConfig(max_new_tokens=n, stop_ids=(TOK.eot_id,)))]


def test_generate_equals_the_library(server):
    model, port = server
    status, out = post(port, "/v1/generate", {"prompt": "Hello there", "max_new_tokens": 12})
    assert status == 200
    assert out["ids"] == lib(model, TOK.encode("Hello there"), 12) and out["done"]
    assert out["finish_reason"] in ("length", "stop")


def test_streaming_sends_one_event_per_token(server):
    model, port = server
    status, ctype, events = post(port, "/v1/generate", {"prompt_ids": [5, 6, 7, 8, 9], "max_new_tokens": 9,
                                                        "stream": True}, stream=True)
    assert status == 200 and ctype == "text/event-stream"
    assert [e["token"] for e in events[:-1]] == lib(model, [5, 6, 7, 8, 9], 9)
    assert events[-1]["done"] and events[-1]["finish_reason"] in ("length", "stop")


def test_concurrent_requests_share_the_batch(server):
    model, port = server
    prompts = [[1 + i, 2, 3 + i, 40, 50 + i] for i in range(6)]
    results = {}

    def worker(i):
        results[i] = post(port, "/v1/generate", {"prompt_ids": prompts[i], "max_new_tokens": 15})[1]["ids"]

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [results[i] for i in range(6)] == [lib(model, p, 15) for p in prompts]


def test_bad_requests_get_400_with_every_reason(server):
    _, port = server
    status, out = post(port, "/v1/generate", {"prompt_ids": [1, 2], "max_new_tokens": 500, "top_p": 0})
    assert status == 400
    assert any("top_p" in r for r in out["reasons"])
    status, out = post(port, "/v1/generate", {"prompt_ids": [1, 999], "max_new_tokens": 300})
    assert status == 400 and len(out["reasons"]) == 2
    assert "exceeds max_model_len 200" in " ".join(out["reasons"]) and "token ids must be in" in out["reasons"][0]
    status, out = post(port, "/v1/generate", {"max_new_tokens": 3})
    assert status == 400 and out["reasons"] == ["give 'prompt' (text) or 'prompt_ids'"]
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/v1/generate", "not json")
    r = c.getresponse()
    assert r.status == 400 and "bad JSON body" in json.loads(r.read())["error"]


def test_pin_and_unpin_over_http(server):
    _, port = server
    status, out = post(port, "/v1/prefix/pin", {"prompt": "A long shared system prompt", "ttl": 30})
    assert status == 200 and out["tokens"] == 24
    status, gen = post(port, "/v1/generate", {"prompt": "A long shared system prompt, and a question", "max_new_tokens": 2})
    assert status == 200 and gen["cached_tokens"] == 24
    assert post(port, "/v1/prefix/unpin", {"handle": out["handle"]})[0] == 200
    assert post(port, "/v1/prefix/unpin", {"handle": out["handle"]})[0] == 404
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/health")
    health = json.loads(c.getresponse().read())
    assert health["status"] == "ok" and health["kv"]["blocks_total"] == 128


def test_memstack_serve_runs_as_a_process(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "ck", {"tokenizer": "byte", "tokenizer_fingerprint": TOK.fingerprint()})
    p = subprocess.Popen([sys.executable, "-m", "memstack.cli", "serve", "--checkpoint", str(tmp_path / "ck"),
                          "--port", "0", "--block-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "memstack serve:" in line, p.stderr.read() if p.poll() is not None else line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        deadline = time.time() + 30
        while True:
            try:
                status, out = post(port, "/v1/generate", {"prompt": "Hi", "max_new_tokens": 5})
                break
            except ConnectionRefusedError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert status == 200 and out["ids"] == lib(model, TOK.encode("Hi"), 5)
    finally:
        p.terminate()
        p.wait(timeout=10)
