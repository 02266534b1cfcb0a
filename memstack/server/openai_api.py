"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Responses follow OpenAI's shapes (`text_completion`, `chat.completion`, `chat.completion.chunk`
server-sent events ending with `data: [DONE]`, `usage.prompt_tokens_details.cached_tokens`,
logprobs in the legacy completions form and the chat form). A request whose client disconnects is
cancelled in the engine whether it streams or not. Extension: `return_token_ids` adds the
generated ids to each choice (`token_ids`), as vLLM does.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from memstack.server.errors import APIError, error_body
from memstack.server.generation import Choice, Delta, Generation
from memstack.server.schemas import ChatCompletionRequest, CompletionRequest
from memstack.server.tenants import Tenant

router = APIRouter()
BIG_TEXT = 4096              # prompts longer than this (characters) are tokenized off the event loop


def state_of(request: Request):
    return request.app.state.memstack


def tenant_of(request: Request) -> Tenant:
    return request.scope["state"]["tenant"]           # set by the auth middleware


# -- models ----------------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request):
    st = state_of(request)
    return {"object": "list", "data": [_model_card(st)]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    st = state_of(request)
    if model_id != st.config.model_name:
        raise APIError(404, f"the model {model_id!r} does not exist", "model", code="model_not_found")
    return _model_card(st)


def _model_card(st) -> dict:
    return {"id": st.config.model_name, "object": "model", "created": int(st.started), "owned_by": "memstack",
            "max_model_len": st.loop.engine.cfg.max_model_len}


# -- completions -------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, tenant: Tenant = Depends(tenant_of)):
    st = state_of(request)
    _check_common(st, body)
    prompts, texts = await _completion_prompts(st, body.prompt)
    max_tokens = [body.max_tokens or 16] * len(prompts)            # OpenAI's default for completions
    stops = (st.tokenizer.eot_id,) if st.tokenizer is not None and not body.ignore_eos else ()
    gen = Generation(st, tenant, prompts, body, max_tokens, stops, body.logprobs, request_namespace(st, tenant, body))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": st.config.model_name}
    echo = [texts[c.prompt_index] if body.echo else "" for c in gen.choices]
    if body.stream:
        at = {c.index: len(echo[c.index]) for c in gen.choices}      # text offsets of streamed logprobs

        def chunk(d: Delta, first: bool) -> dict | None:
            text = (echo[d.choice.index] if first else "") + d.text
            lps = _completion_logprobs(d.logprobs, at[d.choice.index]) if body.logprobs is not None else None
            at[d.choice.index] += sum(len(e[0]) for e in d.logprobs)
            return {**head, "choices": [{"index": d.choice.index, "text": text, "logprobs": lps,
                                         "finish_reason": d.finish_reason}]}
        return await _stream(request, gen, chunk, head, body)
    if (choices := await _collect(request, gen)) is None:
        return Response(status_code=499)
    return {**head, "usage": gen.usage(), "choices": [
        {"index": c.index, "text": echo[c.index] + "".join(c.text), "finish_reason": c.finish_reason,
         "logprobs": _completion_logprobs(c.logprobs, len(echo[c.index])) if body.logprobs is not None else None,
         **_ids(body, c)} for c in choices]}


async def _completion_prompts(st, prompt) -> tuple[list[list[int]], list[str]]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [await _encode(st, t, "prompt") for t in texts]
        return ids, texts
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    tok = st.tokenizer
    return [list(p) for p in lists], [_safe_decode(tok, p) for p in lists]


def _safe_decode(tok, ids: list[int]) -> str:
    if tok is None:
        return ""
    try:
        return tok.decode(ids)
    except ValueError:
        return ""                                   # out-of-vocabulary ids: the engine refuses them next


async def _encode(st, text: str, param: str) -> list[int]:
    tok = st.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer: send token ids", param)
    ids = await anyio.to_thread.run_sync(tok.encode, text) if len(text) > BIG_TEXT else tok.encode(text)
    return ids or [tok.eot_id]                      # an empty prompt starts a document


# -- chat --------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: Tenant = Depends(tenant_of)):
    st = state_of(request)
    _check_common(st, body)
    if st.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: chat needs one (use /v1/completions with token ids)",
                       "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text,
                 **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        text = st.template.render(messages, add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    ids = await _encode(st, text, "messages")
    limit = body.max_completion_tokens or body.max_tokens
    if limit is None:                               # as many as fit, up to the server's default
        room = st.loop.engine.cfg.max_model_len
        cap = st.config.default_max_tokens
        limit = cap if room is None else min(cap, room - len(ids))
        if limit < 1:
            raise APIError(400, f"the prompt ({len(ids)} tokens) leaves no room in max_model_len {room}", "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    gen = Generation(st, tenant, [ids], body, [limit], () if body.ignore_eos else st.chat_stop_ids, top,
                     request_namespace(st, tenant, body))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.config.model_name}
    if body.stream:
        def chunk(d: Delta, first: bool) -> dict | None:
            delta: dict[str, Any] = {"role": "assistant", "content": d.text} if first else (
                {"content": d.text} if d.text else {})
            return {**head, "choices": [{"index": d.choice.index, "delta": delta,
                                         "logprobs": _chat_logprobs(d.logprobs) if top is not None else None,
                                         "finish_reason": d.finish_reason}]}
        return await _stream(request, gen, chunk, head, body)
    if (choices := await _collect(request, gen)) is None:
        return Response(status_code=499)
    return {**head, "object": "chat.completion", "usage": gen.usage(), "choices": [
        {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
         "logprobs": _chat_logprobs(c.logprobs) if top is not None else None,
         "finish_reason": c.finish_reason, **_ids(body, c)} for c in choices]}


# -- shared --------------------------------------------------------------------------------------------
def user_namespace(st, tenant: Tenant, user: str | None) -> str | None:
    """The memory namespace a request's `user` selects: one of its tenant's declared users, on a
    server with user memory (otherwise `user` is only an opaque tag, as in OpenAI's API). Another
    tenant's user and an unknown one get the same 404."""
    if user is None or getattr(st, "memory", None) is None:
        return None
    ns = tenant.user_namespace(user)
    if ns is None:
        raise APIError(404, f"no user {user!r} in this tenant", "user", code="user_not_found")
    return ns


def task_namespace(st, tenant: Tenant, task: str | None) -> str | None:
    """The memory namespace a request's `task` selects: one of its tenant's declared tasks (404
    otherwise, another tenant's task exactly like an unknown one; 404 on a server without memory)."""
    if task is None:
        return None
    ns = tenant.task_namespace(task) if getattr(st, "memory", None) is not None else None
    if ns is None:
        raise APIError(404, f"no task {task!r} in this tenant", "task", code="task_not_found")
    return ns


def request_namespace(st, tenant: Tenant, body) -> str | tuple[str, ...] | None:
    """Every memory namespace a request reads: its user's, then its task's (a tuple when both:
    each memory reads their union; the user's is the request's own)."""
    names = [n for n in (user_namespace(st, tenant, body.user), task_namespace(st, tenant, body.task)) if n]
    return None if not names else names[0] if len(names) == 1 else tuple(names)


def _check_common(st, body) -> None:
    if body.model is not None and body.model != st.config.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist (this server serves {st.config.model_name!r})",
                       "model", code="model_not_found")
    n_prompts = len(body.prompt) if isinstance(getattr(body, "prompt", None), list) and \
        isinstance(body.prompt[0], (str, list)) else 1
    reasons = []
    if body.n * n_prompts > st.config.max_n:
        reasons.append(f"n: {body.n} choices x {n_prompts} prompts exceeds this server's limit of {st.config.max_n}")
    if len(body.stops) > st.config.max_stop:
        reasons.append(f"stop: at most {st.config.max_stop} stop strings, got {len(body.stops)}")
    if reasons:
        raise APIError(400, "; ".join(reasons), reasons[0].split(":")[0])


def _ids(body, c: Choice) -> dict:
    return {"token_ids": c.token_ids} if body.return_token_ids else {}


async def _collect(request: Request, gen: Generation) -> list[Choice] | None:
    """Run to the end, or cancel everything if the client disconnects first."""
    try:
        await gen.start()
        work = asyncio.ensure_future(gen.run())
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if work not in done:
            work.cancel()
            return None                             # nobody to answer; close() aborts the engine requests
        choices = work.result()
    finally:
        gen.close()
    if (err := gen.failure()) is not None:
        raise APIError(500, f"the engine failed on this request: {err}", code="engine_error")
    return choices


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(request: Request, gen: Generation, chunk, head: dict, body) -> StreamingResponse:
    await gen.start()                               # refusals are still plain 4xx responses
    usage = body.stream_options is not None and body.stream_options.include_usage

    async def events():
        first = set()
        try:
            async for d in gen.deltas():
                if d.choice.error:
                    yield _sse(error_body(500, f"the engine failed on this request: {d.choice.error}",
                                          code="engine_error"))
                    break
                is_first = d.choice.index not in first
                first.add(d.choice.index)
                yield _sse(chunk(d, is_first))
            if usage:
                yield _sse({**head, "choices": [], "usage": gen.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            gen.close()                             # client gone (cancelled) or done: abort the rest

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(gen.close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _completion_logprobs(items, offset0: int) -> dict:
    tokens, lps, tops, offsets, at = [], [], [], [], offset0
    for text, lp, top in items:
        tokens.append(text)
        lps.append(lp)
        tops.append(dict(top) if top else None)
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(items) -> dict:
    return {"content": [{"token": text, "logprob": lp, "bytes": _bytes(text),
                         "top_logprobs": [{"token": s, "logprob": v, "bytes": _bytes(s)} for s, v in top]}
                        for text, lp, top in items]}


def _bytes(text: str) -> list[int] | None:
    return None if "\ufffd" in text else list(text.encode("utf-8"))
