"""The engine loop: one thread owns the Engine; the HTTP layer talks to it through a command queue.

The asyncio side never takes a lock the engine holds while it steps: it posts commands (submit,
abort, pin, ...) that the engine thread runs between two steps, and awaits their result as a
future. New tokens are handed back to the event loop in batches (`call_soon_threadsafe`): at
most one hand-off per `stream_interval_s` (vLLM's `--stream-interval` idea, by time), except that
a request's first token and its end are handed over at once (time to first token and the end of
a request are never delayed). Why: every hand-off wakes the event-loop thread, which then takes
the GIL from the engine thread; on a busy machine the engine thread, once it has slept on the GIL,
waits for a core (measured: gaps of ~9 ms between steps after ~40 % of the steps with one stream
and a hand-off per step, docs/BENCHMARKS.md). With `stream_interval_s = 0` every step hands over.

Failure isolation: a request the engine refuses raises EngineError into its own future (a 4xx).
If `engine.step()` itself raises, the requests that were running fail with the error and the
others go on; after `MAX_CONSECUTIVE_FAILURES` failed steps in a row (nothing is progressing)
the loop declares itself dead, fails everything and refuses new work, and `/health` says so.
If the thread dies for any other reason, `alive` is False too.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger("memstack.server")
MAX_CONSECUTIVE_FAILURES = 3
IDLE_WAIT_S = 0.25           # an idle engine thread wakes this often for periodic work (pin TTLs)


class EngineDead(RuntimeError):
    """The engine loop stopped; no request can be served."""


@dataclass
class TokenLogprob:
    logprob: float
    top: list[tuple[int, float]]             # (token id, logprob), best first


@dataclass
class Event:
    token: int | None = None
    logprob: TokenLogprob | None = None
    done: bool = False
    finish_reason: str | None = None         # stop | length | aborted | error
    error: str | None = None
    cached_tokens: int = 0
    result: Any = None                       # what an on_finish hook returned (engine thread)


@dataclass(eq=False)
class Stream:
    """One request's events, delivered on the event loop that submitted it."""

    aloop: asyncio.AbstractEventLoop
    top_logprobs: int | None = None          # None: no logprobs; k >= 0: the sampled token's + k best
    on_finish: Callable[[Event], Any] | None = None   # runs in the engine thread when it finishes well
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)   # gets (tag, [Event, ...]) per step
    tag: int = 0                             # streams of one HTTP request may share a queue

    async def events(self):
        """This stream's events (when it has its queue to itself)."""
        while True:
            _, evs = await self.queue.get()
            for ev in evs:
                yield ev
                if ev.done:
                    return


class EngineLoop:
    def __init__(self, engine, name: str = "memstack-engine", stream_interval_s: float = 0.0):
        self.engine = engine
        self.stream_interval_s = float(stream_interval_s)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, Stream] = {}
        self._pending: dict[str, list[Event]] = {}    # events not handed over yet (coalesced), per request
        self._started: set[str] = set()               # requests whose first events were handed over
        self._flushed = 0.0                           # time.monotonic() of the last hand-off of everything
        self._periodic: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self.dead: str | None = None
        self.last_error: str | None = None
        self.failed_steps = 0
        self.steps = 0
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    # -- called from any thread ------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.dead is None and self.thread.is_alive()

    def post(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) in the engine thread between two steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(EngineDead(self.dead or "the engine thread is not running"))
            return fut
        self._cmds.put((fn, args, fut))
        if not self.alive:                       # it died while we queued: never leave a future hanging
            self._fail_queued(self.dead or "the engine thread is not running")
        return fut

    async def call(self, fn: Callable, *args):
        return await asyncio.wrap_future(self.post(fn, *args))

    def add_periodic(self, fn: Callable[[], None]) -> None:
        self.post(self._periodic.append, fn)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        self.thread.join(timeout)

    # -- engine-thread commands (run through post/call) -------------------------------------------
    def submit(self, rid: str, prompt: list[int], params, salt: str | None, stream: Stream) -> None:
        """Queue a request (raises EngineError with every reason if the engine refuses it)."""
        self.submit_all([(rid, prompt, params, salt, stream)])

    def submit_all(self, items: list[tuple]) -> None:
        """Queue several requests, all or none: if the engine refuses one, none stays queued."""
        done: list[str] = []
        try:
            for rid, prompt, params, salt, stream, *more in items:    # (..., namespace, session)
                ns, session = (list(more) + [None, None])[:2]
                self.engine.add_request(prompt, params, salt=salt, request_id=rid, namespace=ns, session=session)
                self._streams[rid] = stream
                done.append(rid)
        except Exception:
            for rid in done:
                self.abort(rid)
            raise
        finally:
            self._update_record_logits()
        for rid in done:
            req = self.engine.requests.get(rid)
            if req is not None and req.finished:              # finished at once (nothing to generate)
                self._finish(rid, req.finish_reason or "length", None, None)

    def abort(self, rid: str) -> None:
        """Stop a request (its client left); no event is delivered any more."""
        if rid in self._streams or rid in self.engine.requests:
            self.engine.abort(rid)
            self.engine.requests.pop(rid, None)
            self._forget(rid)
            self._update_record_logits()

    def stats(self) -> dict[str, Any]:
        e = self.engine
        return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting), "kv": e.kv_stats()}

    # -- the thread --------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                self._run_commands(block=not busy)
                if self._stop.is_set():
                    break
                for fn in self._periodic:
                    fn()
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # noqa: BLE001 -- the thread must not die silently
            self._die(f"engine loop crashed: {type(e).__name__}: {e}")
            log.error("engine loop crashed\n%s", traceback.format_exc())

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._cmds.get(timeout=IDLE_WAIT_S) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, args, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except Exception as e:  # noqa: BLE001 -- the caller gets it (e.g. EngineError: a 4xx)
                    fut.set_exception(e)
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001 -- isolate: fail what was running, keep serving
            self.failed_steps += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("engine step failed (%d in a row)\n%s", self.failed_steps, traceback.format_exc())
            if self.failed_steps >= MAX_CONSECUTIVE_FAILURES:
                self._die(f"{self.failed_steps} engine steps failed in a row; last: {self.last_error}")
                return
            sched = self.engine.scheduler
            victims = list(sched.running) + (list(sched.waiting) if self.failed_steps > 1 else [])
            for req in victims:
                self.engine.abort(req.id)
                self._finish(req.id, "error", f"the engine failed while running this request: {self.last_error}", None)
            return
        self.failed_steps = 0
        self.steps += 1
        batches: dict[str, list[Event]] = {}
        record = self.engine.record_logits
        for o in outs:
            stream = self._streams.get(o.request_id)
            req = self.engine.requests.get(o.request_id)
            rows = req.logits if req is not None and record else []
            if o.finished and o.error:           # the engine failed this request alone (isolation)
                self.last_error = o.error
            if stream is None:                   # not ours, or its client left
                if rows:
                    rows.clear()
                if o.finished:
                    self.engine.requests.pop(o.request_id, None)
                continue
            evs = batches.setdefault(o.request_id, [])
            for t in o.new_tokens:
                lp = _logprob(rows[-1], t, stream.top_logprobs) if stream.top_logprobs is not None and rows else None
                evs.append(Event(token=int(t), logprob=lp))
            if rows:
                rows.clear()                     # keep no logits past this step (memory)
            if o.finished:
                self._finish(o.request_id, o.finish_reason or "stop", o.error, evs)
        pend = self._pending
        for rid, evs in batches.items():
            if evs and rid in self._streams:
                pend.setdefault(rid, []).extend(evs)
        now = time.monotonic()
        if now - self._flushed >= self.stream_interval_s:
            ready, self._flushed = list(pend), now
        else:                                    # between two hand-offs: only first tokens and ends go now
            ready = [rid for rid, evs in pend.items() if evs[-1].done or rid not in self._started]
        if ready:
            self._deliver([(self._streams[rid], pend.pop(rid)) for rid in ready])
            self._started.update(ready)
        ended = [r for r, evs in batches.items() if evs and evs[-1].done]
        for rid in ended:
            if rid not in pend:                  # (an end always goes at once: never still pending)
                self._forget(rid)
        if ended:
            self._update_record_logits()

    def _forget(self, rid: str) -> None:
        self._streams.pop(rid, None)
        self._pending.pop(rid, None)
        self._started.discard(rid)

    def _finish(self, rid: str, reason: str, error: str | None, evs: list[Event] | None) -> None:
        """The final event of a request: appended to `evs` (the caller delivers this step's batch
        and forgets the stream) or, with evs None, delivered now."""
        req = self.engine.requests.pop(rid, None)
        stream = self._streams.get(rid)
        if stream is None:
            return
        ev = Event(done=True, finish_reason=reason, error=error, cached_tokens=req.cached_tokens if req else 0)
        if stream.on_finish is not None and error is None and reason != "aborted":
            try:
                ev.result = stream.on_finish(ev)
            except Exception as e:  # noqa: BLE001 -- the hook's failure is this request's
                ev.error, ev.finish_reason = f"{type(e).__name__}: {e}", "error"
        if evs is None:
            early = self._pending.get(rid, [])   # tokens not handed over yet go first
            self._forget(rid)
            self._deliver([(stream, early + [ev])])
        else:
            evs.append(ev)

    def _deliver(self, items: list[tuple[Stream, list[Event]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, evs in items:
            by_loop.setdefault(stream.aloop, []).append((stream.queue, (stream.tag, evs)))
        for aloop, batch in by_loop.items():
            try:
                aloop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:                 # that event loop is closed: nobody is listening
                pass

    def _update_record_logits(self) -> None:
        self.engine.record_logits = any(s.top_logprobs is not None for s in self._streams.values())

    def _die(self, why: str) -> None:
        self.dead = why
        self.last_error = self.last_error or why
        streams, self._streams = self._streams, {}
        pend, self._pending = self._pending, {}
        self._deliver([(s, pend.get(rid, []) + [Event(done=True, finish_reason="error", error=why)])
                       for rid, s in streams.items()])
        self._fail_queued(why)

    def _fail_queued(self, why: str) -> None:
        while True:                              # commands still queued fail, never hang
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2].set_running_or_notify_cancel():
                item[2].set_exception(EngineDead(why))


def _put_all(batch) -> None:
    for q, item in batch:
        q.put_nowait(item)


def _logprob(row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    lp = torch.log_softmax(row.float(), -1)                                  # (V,)
    top: list[tuple[int, float]] = []
    if k:
        vals, idx = torch.topk(lp, min(k, lp.shape[-1]))
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(float(lp[token]), top)

