"""One HTTP request's choices in the engine: submit, follow, stop, cancel, account.

A completion with P prompts and n choices runs P x n engine requests that share one event queue.
Each choice turns its tokens into text (incremental detokenizer), applies the request's stop
strings (the stop string is not returned, the engine request is aborted at once), collects
logprobs if asked, and counts usage. `Generation.close()` aborts whatever still runs and gives back
the tenant's reservation: it runs on every exit path -- finished, failed, client gone.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

from memstack.engine import EngineError
from memstack.generate import SamplingConfig
from memstack.memory.base import row_reads
from memstack.server.errors import APIError
from memstack.server.loop import EngineDead, Event, Stream, TokenLogprob
from memstack.server.tenants import Tenant
from memstack.server.text import Detokenizer, StopMatcher

GREEDY_BELOW = 1e-5          # temperatures below this sample greedily (x / 1e-300 overflows to inf)
LogprobEntry = tuple[str, float, list[tuple[str, float]]]     # token text, its logprob, [(alternative, logprob)]


@dataclass
class Choice:
    index: int
    prompt_index: int
    rid: str
    detok: Detokenizer | None
    stops: StopMatcher
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0
    started: bool = False                    # a first delta went out (sent even if its text is held back)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Delta:
    """What one event adds to a choice (streamed as one chunk)."""

    choice: Choice
    text: str = ""
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None


def sampling(req, max_tokens: int, stop_ids: tuple[int, ...], index: int, seed: int) -> SamplingConfig:
    t = 1.0 if req.temperature is None else req.temperature
    return SamplingConfig(max_new_tokens=max_tokens, temperature=0.0 if t < GREEDY_BELOW else t,
                          top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                          stop_ids=stop_ids, seed=(seed + index) % 2**63)


class Generation:
    def __init__(self, state, tenant: Tenant, prompts: list[list[int]], req, max_tokens: list[int],
                 stop_ids: tuple[int, ...], top_logprobs: int | None, namespace: str | tuple | None = None):
        self.state, self.tenant, self.prompts, self.req = state, tenant, prompts, req
        self.namespace = namespace               # the request's memory: its user's, task's, or (user, task); or None
        self.max_tokens, self.stop_ids, self.top_logprobs = max_tokens, stop_ids, top_logprobs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.reserved: int | None = None
        self.closed = False
        tok = state.tokenizer
        for p in range(len(prompts)):
            for i in range(req.n):
                self.choices.append(Choice(len(self.choices), p, "r-" + secrets.token_hex(12),
                                           Detokenizer(tok) if tok is not None else None, StopMatcher(req.stops)))

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        st, req = self.state, self.req
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        params = [sampling(req, self.max_tokens[c.prompt_index], self.stop_ids, c.index, seed) for c in self.choices]
        reasons: list[str] = []
        for p, ids in enumerate(self.prompts):              # every reason at once, before any reservation
            first = next(i for i, c in enumerate(self.choices) if c.prompt_index == p)
            more = st.loop.engine.check_request(ids, params[first])
            reasons += [f"prompt {p}: {r}" if len(self.prompts) > 1 else r for r in more]
        if reasons:
            raise APIError(400, "; ".join(reasons), "prompt" if any("prompt" in r or "token" in r for r in reasons)
                           else "max_tokens")
        needs = [st.quotas.need(len(self.prompts[c.prompt_index]), self.max_tokens[c.prompt_index]) for c in self.choices]
        self.reserved = st.quotas.acquire(self.tenant, needs)
        aloop = asyncio.get_running_loop()
        items = []
        for c, sp in zip(self.choices, params):
            stream = Stream(aloop, self.top_logprobs, queue=self.queue, tag=c.index)
            salt = self.tenant.salt if self.namespace is None else "|".join(row_reads(self.namespace))  # a user's K/V is its own
            session = (self.tenant.name, self.req.session) if getattr(self.req, "session", None) else None
            items.append((c.rid, self.prompts[c.prompt_index], sp, salt, stream, self.namespace, session))
        try:
            await st.loop.call(st.loop.submit_all, items)
        except EngineError as e:
            self.close()
            raise APIError(400, "; ".join(e.reasons), "prompt") from None
        except EngineDead as e:
            self.close()
            raise APIError(503, f"the engine is not running: {e}", code="engine_dead") from None
        except BaseException:                              # cancelled (client gone): abort whatever was queued
            self.close()
            raise

    def close(self) -> None:
        """Abort what still runs; give back the reservation. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for c in self.choices:
            if not c.done:
                self.state.loop.post(self.state.loop.abort, c.rid)
        if self.reserved is not None:
            self.state.quotas.release(self.tenant, self.reserved)

    # -- following ---------------------------------------------------------------------------------
    async def deltas(self):
        """Yield a Delta per event that adds something, until every choice is done."""
        pending = sum(not c.done for c in self.choices)
        while pending:
            tag, evs = await self.queue.get()
            c = self.choices[tag]
            for ev in evs:
                if c.done:
                    break                            # events after a stop string: dropped
                d = self._apply(c, ev)
                if d is not None:
                    yield d
                if c.done:
                    pending -= 1

    async def run(self) -> list[Choice]:
        async for _ in self.deltas():
            pass
        return self.choices

    def _apply(self, c: Choice, ev: Event) -> Delta | None:
        d = Delta(c)
        if ev.token is not None:
            c.token_ids.append(ev.token)
            if ev.token in self.stop_ids:
                return None                          # the end-of-text token is not text; "done" follows
            piece = c.detok.push(ev.token) if c.detok is not None else ""
            d.text = c.stops.feed(piece)
            if ev.logprob is not None:
                d.logprobs.append(self._entry(ev.token, ev.logprob))
            if c.stops.stopped:
                c.finish_reason = d.finish_reason = "stop"
                self.state.loop.post(self.state.loop.abort, c.rid)
        if ev.done:
            c.cached_tokens = ev.cached_tokens
            if ev.error:
                c.error = ev.error
            if c.detok is not None and not c.stops.stopped:
                d.text += c.stops.feed(c.detok.flush())
            d.text += c.stops.flush()
            c.finish_reason = d.finish_reason = ("stop" if c.stops.stopped else
                                                 "error" if ev.error else
                                                 "length" if ev.finish_reason == "length" else
                                                 "abort" if ev.finish_reason == "aborted" else "stop")
        c.text.append(d.text)
        c.logprobs.extend(d.logprobs)
        first, c.started = not c.started, True                 # the first token is announced at once (TTFT)
        return d if (first or d.text or d.logprobs or d.finish_reason) else None

    def _entry(self, token: int, lp: TokenLogprob) -> LogprobEntry:
        tok = self.state.tokenizer
        text = (lambda t: tok.decode([t])) if tok is not None else str
        return text(token), lp.logprob, [(text(t), v) for t, v in lp.top]

    # -- accounting ----------------------------------------------------------------------------------
    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(next(c.cached_tokens for c in self.choices if c.prompt_index == p) for p in range(len(self.prompts)))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def failure(self) -> str | None:
        return next((c.error for c in self.choices if c.error), None)
