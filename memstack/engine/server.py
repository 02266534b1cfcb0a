"""HTTP server for the engine (`memstack serve`): the standard library's threading HTTP server,
one engine loop thread, streaming as server-sent events.

    POST /v1/generate   {"prompt": "text" | "prompt_ids": [..], "max_new_tokens": 64, "temperature": 0,
                         "top_p": 1, "top_k": 0, "seed": 0, "stop_ids": [..], "salt": "tenant", "stream": false}
        stream=false -> {"id", "ids", "text", "finish_reason", "cached_tokens"}
        stream=true  -> text/event-stream: `data: {"id", "token", "text"}` per token, then
                        `data: {"id", "done": true, "finish_reason", ...}`
    POST /v1/prefix/pin {"prompt" | "prompt_ids", "ttl": seconds, "salt"} -> {"handle", "tokens"}
    POST /v1/prefix/unpin {"handle"}
    GET  /health        -> {"status": "ok", "running", "waiting", "kv": {...}}

Requests from many connections join the same continuous batch: handler threads only enqueue
and wait on their own queue; the loop thread owns the engine (every engine call happens under
one lock). Bad requests get HTTP 400 with every reason.
"""
from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from memstack.engine.engine import Engine, EngineError
from memstack.generate import SamplingConfig

_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


class EngineLoop:
    """Runs engine.step() whenever there is work and routes each request's outputs to its queue."""

    def __init__(self, engine: Engine, tokenizer=None):
        self.engine, self.tok = engine, tokenizer
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.queues: dict[str, queue.Queue] = {}
        self.stopped = False
        self.error: str | None = None          # set if the engine failed; new requests are then refused
        self.thread = threading.Thread(target=self._run, name="memstack-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingConfig, salt: str | None) -> tuple[str, queue.Queue]:
        q: queue.Queue = queue.Queue()
        with self.lock:
            if self.error:
                raise EngineError(f"the engine stopped after an error: {self.error}")
            rid = self.engine.add_request(prompt, params, salt)                  # raises EngineError with reasons
            self.queues[rid] = q
        self.wake.set()
        return rid, q

    def call(self, fn, *args):
        with self.lock:
            return fn(*args)

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(0.05)
            self.wake.clear()
            while not self.stopped:
                with self.lock:
                    if not self.engine.has_unfinished():
                        break
                    try:
                        outs = self.engine.step()
                    except Exception as e:  # an engine failure ends every request, with the error
                        self.error = repr(e)
                        for rid, q in self.queues.items():
                            q.put({"id": rid, "done": True, "finish_reason": "error", "error": repr(e)})
                        self.queues.clear()
                        self.stopped = True
                        return
                    for o in outs:
                        q = self.queues.get(o.request_id)
                        if q is None:
                            continue
                        for t in o.new_tokens:
                            q.put({"id": o.request_id, "token": t})
                        if o.finished:
                            req = self.engine.requests.pop(o.request_id, None)
                            q.put({"id": o.request_id, "done": True, "finish_reason": o.finish_reason, "error": o.error,
                                   "cached_tokens": req.cached_tokens if req else 0})
                            self.queues.pop(o.request_id, None)

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=5)


def _params(body: dict[str, Any], eot: int | None) -> tuple[SamplingConfig, list[str]]:
    from memstack.errors import ConfigError

    kw = {k: body[k] for k in _SAMPLING if k in body}
    stop = body.get("stop_ids", [eot] if eot is not None else [])
    try:
        return SamplingConfig(**kw, stop_ids=tuple(int(t) for t in stop)), []
    except ConfigError as e:
        return SamplingConfig(), e.reasons
    except (TypeError, ValueError) as e:
        return SamplingConfig(), [str(e)]


def make_handler(loop: EngineLoop):
    tok = loop.tok

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:  # quiet: a server's access log is not our stdout
            pass

        def _json(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict | None:
            try:
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                return body
            except ValueError as e:
                self._json(400, {"error": f"bad JSON body: {e}", "reasons": [str(e)]})
                return None

        def _prompt(self, body: dict) -> tuple[list[int], list[str]]:
            if "prompt_ids" in body:
                ids = body["prompt_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    return [], ["prompt_ids must be a list of integers"]
                return ids, []
            if "prompt" in body:
                if tok is None:
                    return [], ["this model has no tokenizer: send prompt_ids"]
                return tok.encode(str(body["prompt"])) or [tok.eot_id], []
            return [], ["give 'prompt' (text) or 'prompt_ids'"]

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._json(404, {"error": f"no route GET {self.path}"})
            e = loop.engine
            stats = loop.call(e.kv_stats)
            self._json(200, {"status": "ok", "running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
                             "kv": stats})

        def do_POST(self) -> None:
            routes = {"/v1/generate": self._generate, "/v1/prefix/pin": self._pin, "/v1/prefix/unpin": self._unpin}
            if self.path not in routes:
                return self._json(404, {"error": f"no route POST {self.path}"})
            body = self._body()
            if body is not None:
                routes[self.path](body)

        def _generate(self, body: dict) -> None:
            ids, reasons = self._prompt(body)
            params, more = _params(body, tok.eot_id if tok is not None else None)
            reasons += more
            if not reasons:
                try:
                    rid, q = loop.submit(ids, params, body.get("salt"))
                except EngineError as e:
                    reasons += e.reasons
            if reasons:
                return self._json(400, {"error": "request refused", "reasons": reasons})
            if body.get("stream"):
                return self._stream(rid, q)
            out = []
            while True:
                ev = q.get()
                if ev.get("done"):
                    break
                out.append(ev["token"])
            text = tok.decode([t for t in out if t not in params.stop_ids]) if tok is not None else None
            self._json(200 if not ev.get("error") else 500, {"id": rid, "ids": out, "text": text, **ev})

        def _stream(self, rid: str, q: queue.Queue) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            out: list[int] = []
            printed = ""

            def send(obj: dict) -> None:
                data = f"data: {json.dumps(obj)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                while True:
                    ev = q.get()
                    if ev.get("done"):
                        send(ev)
                        break
                    if tok is not None:
                        out.append(ev["token"])
                        text = tok.decode(out)
                        if not text.endswith("\ufffd"):
                            ev["text"], printed = text[len(printed):], text
                    send(ev)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):  # the client left: stop its request
                loop.call(loop.engine.abort, rid)

        def _pin(self, body: dict) -> None:
            ids, reasons = self._prompt(body)
            if reasons:
                return self._json(400, {"error": "request refused", "reasons": reasons})
            try:  # compute the prefix as an ordinary 1-token request in the batch, then pin its blocks
                _, q = loop.submit(ids, SamplingConfig(max_new_tokens=1), body.get("salt"))
                while not q.get().get("done"):
                    pass
                h = loop.call(loop.engine.sessions.pin, ids, body.get("ttl"), body.get("salt"))
            except (ValueError, EngineError) as e:
                return self._json(400, {"error": str(e), "reasons": [str(e)]})
            self._json(200, {"handle": h.id, "tokens": h.n_tokens})

        def _unpin(self, body: dict) -> None:
            h = loop.engine.sessions.pins.get(body.get("handle"))
            if h is None:
                return self._json(404, {"error": f"no pinned prefix {body.get('handle')!r}"})
            loop.call(loop.engine.sessions.unpin, h)
            self._json(200, {"unpinned": h.id})

    return Handler


def serve(engine: Engine, tokenizer=None, host: str = "127.0.0.1", port: int = 8000) -> tuple[ThreadingHTTPServer, EngineLoop]:
    """Start the server (not yet serving: call `server.serve_forever()`, e.g. in a thread)."""
    loop = EngineLoop(engine, tokenizer)
    server = ThreadingHTTPServer((host, port), make_handler(loop))
    server.daemon_threads = True
    return server, loop
