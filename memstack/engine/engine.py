"""The generation engine: continuous batching over a paged KV pool, with prefix reuse.

    engine = Engine(model, EngineConfig(num_blocks=512))
    rid = engine.add_request(prompt_ids, SamplingConfig(max_new_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():          # streaming: new tokens of every request, each step
            ...
    engine.generate([p1, p2], params)      # or all at once
    for tok in engine.stream(p, params): ...

Requests join and leave between steps; each step runs the model's own forward (runner.py) over
the decode tokens of running requests and chunks of new prompts (scheduler.py), with the K/V in
one paged pool and every memory's state in per-request slots. Any registered memory is served:
the KV-cache memory (if any) is replaced by the pool with the same context semantics
(policy.py), every other memory runs in the forward with each request's own state row. Sampling
per request (greedy / temperature / top-k / top-p, seeded), stop on stop ids, max_new_tokens or
max_model_len. Bad requests are refused at `add_request` with every reason: too long for
max_model_len, or more KV blocks than the whole pool (it could never run); a request that fits
the pool but not now waits. Nothing about a refused request touches other requests' blocks.

Failure isolation: a request whose forward (a memory raising for its row) or sampling fails is
finished with finish_reason "error" and the error; every other request of the step goes on
(the rows of a failed call are re-run one by one from their saved states).

Prefix reuse needs the K/V of a prefix to be the whole story: it is on for models whose
memories keep no state and add no tokens; a model with memory state recomputes every request
from its first token (its state after a prefix is not in the pool; sessions carry it).
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Iterable, Iterator

import torch

from memstack.engine.config import EngineConfig
from memstack.engine.policy import context_policy, kv_cache_memories
from memstack.engine.request import Request, RequestOutput, Status
from memstack.engine.runner import ModelRunner, Work
from memstack.engine.scheduler import Scheduler
from memstack.errors import MemstackError
from memstack.generate import SamplingConfig, sample
from memstack.memory.base import row_reads
from memstack.memory.kv.block_pool import BlockPool
from memstack.memory.kv.compress import budget
from memstack.memory.kv.config import CompressionConfig
from memstack.memory.kv.hashing import CacheNamespace, model_fingerprint
from memstack.memory.kv.manager import KVCacheManager
from memstack.memory.kv.store import KVSpec, PagedKVCache


class EngineError(MemstackError, ValueError):
    """A model the engine cannot serve, or a request it refuses; lists every reason."""

    def __init__(self, reasons: list[str] | str, what: str = "request"):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        super().__init__(f"{what} refused ({len(self.reasons)} reason(s)):\n" + "\n".join(f"  - {r}" for r in self.reasons))


class Engine:
    def __init__(self, model: torch.nn.Module, cfg: EngineConfig = EngineConfig(), tokenizer: str = ""):
        from memstack.train.distributed import resolve_device

        policy, reasons = context_policy(model)
        if reasons:
            raise EngineError(reasons, what="model")
        self.cfg, self.policy = cfg, policy
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device).eval()
        # the model the engine runs: its KV-cache memory is replaced by the paged pool
        self.serving = self.model.without_memories(kv_cache_memories(self.model))
        self.stateful = not self.serving.memory.stateless
        dtype = next(model.parameters()).dtype
        self.spec = KVSpec.of(model.cfg.backbone, cfg.block_size, dtype)
        self.num_blocks = cfg.num_blocks or max(1, int(cfg.kv_memory_mb * 2**20) // self.spec.block_bytes)
        self.namespace = CacheNamespace(model_fingerprint(model), tokenizer, str(dtype).removeprefix("torch."),
                                        "none", cfg.block_size)
        self.prefix_caching = cfg.enable_prefix_caching and not self.stateful
        self.pool = BlockPool(self.num_blocks, self.prefix_caching)
        self.manager = KVCacheManager(self.pool, cfg.block_size)
        self.cache = PagedKVCache(self.spec, self.num_blocks, self.device)
        self.runner = ModelRunner(self.serving, self.cache)
        stack = self.serving.memory
        phases = [(a, b) for a in (True, False) for b in (True, False)]
        self.seg_extra = (max(stack.embed_tokens(*ph)[0] for ph in phases)
                          + max(stack.embed_tokens(*ph)[1] for ph in phases))   # memory tokens per segment, at most
        self.scheduler = Scheduler(self.manager, policy, cfg.max_num_seqs, cfg.max_num_batched_tokens, self._new_seq,
                                   self.runner.extra_slots)
        self.requests: dict[str, Request] = {}
        self.tiers = None
        if (cfg.host_cache_blocks or cfg.disk_cache_dir) and self.prefix_caching:
            from memstack.memory.kv.tiers import TieredStore

            self.tiers = TieredStore(self.spec, self.namespace, cfg.host_cache_blocks, cfg.disk_cache_dir)
        from memstack.engine.sessions import Sessions

        self.sessions = Sessions(self)      # pin / TTL / unpin / export / import of prefixes
        from memstack.engine.memory_sessions import MemorySessions

        self.memory_sessions = MemorySessions(self)   # conversations: memory state + K/V between requests
        self._ids = itertools.count()
        self.record_logits = False          # keep each request's sampling logits (tests, benchmarks)
        self.vocab = model.cfg.backbone.vocab_size

    # -- requests ------------------------------------------------------------------------------
    def max_blocks(self, n_tokens: int) -> int:
        """Most blocks a request of n_tokens (prompt + new) ever holds at once (its slots: the
        tokens and the memory tokens of each segment)."""
        seg = self.policy.seg_len
        need = self.spec.blocks_for(n_tokens + -(-n_tokens // seg) * self.seg_extra)
        vis = self.policy.max_visible()
        return need if vis is None else min(need, self.spec.blocks_for(vis + self.seg_extra) + 1)

    def check_request(self, prompt: list[int], params: SamplingConfig, compression=None) -> list[str]:
        r = []
        pol = compression.policy if compression is not None else "none"
        if pol not in ("none", "streaming", "learned"):
            r.append(f"the engine's pool runs the presses 'streaming' (whole blocks) and 'learned' (a trained scorer, "
                     f"slots compacted); {pol!r} runs through the kv_paged memory (memory interface)")
        if pol in ("streaming", "learned") and not self.policy.unbounded:
            r.append(f"{pol} compression needs a document-scope model without a window")
        if pol in ("streaming", "learned") and self.stateful:
            r.append(f"{pol} compression drops K/V slots counted in tokens; this model's memories carry state or "
                     "add tokens, so it is offered for stateless models only")
        if pol == "learned":
            r += self._scorer_reasons(compression)
        if not prompt:
            r.append("the prompt is empty (give at least one token)")
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            r.append(f"token ids must be in [0, {self.vocab}); got {bad[:5]}")
        total = len(prompt) + params.max_new_tokens
        if self.cfg.max_model_len is not None and total > self.cfg.max_model_len:
            r.append(f"prompt ({len(prompt)}) + max_new_tokens ({params.max_new_tokens}) = {total} tokens exceeds "
                     f"max_model_len {self.cfg.max_model_len}")
        need = self.max_blocks(total)
        if pol == "streaming":
            chunk = self.spec.blocks_for(min(len(prompt), self.cfg.max_num_batched_tokens))
            need = min(need, self._stream_budget(compression, total) + chunk + 1)
        elif pol == "learned":                      # compacted at every segment end: one segment on top
            need = min(need, self.spec.blocks_for(budget(total, compression.keep_ratio) + self.policy.seg_len) + 1)
        if need > self.num_blocks:
            r.append(f"needs up to {need} KV blocks of {self.cfg.block_size} tokens, the pool has {self.num_blocks} "
                     f"(raise num_blocks / kv_memory_mb or shorten the request)")
        return r

    def add_request(self, prompt: Iterable[int], params: SamplingConfig = SamplingConfig(), salt: str | None = None,
                    request_id: str | None = None, compression: CompressionConfig | None = None,
                    namespace: str | tuple[str, ...] | None = None, session: tuple[str, str] | None = None) -> str:
        """Queue a request. `compression` (StreamingLLM, policy="streaming") bounds its KV: after
        every step, whole blocks between the sink blocks and the most recent ones are freed so the
        request holds at most max(ceil(keep_ratio * tokens), sinks + 2 blocks) blocks. With
        policy="learned" (a trained scorer, `compression.scorer`), at each segment end every
        (layer, KV head) keeps its ceil(keep_ratio * tokens) best-scored slots, compacted; the
        freed blocks go back to the pool (engine/press.py).
        `namespace`: the memory namespace its rows read -- one name, or a tuple read together (a
        user's and a task's: every memory reads the union; the first is its own); None: the
        memories' configured one. Its K/V is cached under it (salted and tagged, engine/forget.py).
        `session`: (tenant, session id) of a memory session (memory_sessions.py): the prompt is
        appended to the session's document and decoding continues from its memory state and K/V."""
        prompt = [int(t) for t in prompt]
        reasons, sess = [], None
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if session is not None:
            sess, reasons = self.memory_sessions.check_request(session, rid)
            if sess is not None:
                prompt = sess.tokens + prompt             # the request continues the session's document
                if compression is not None:
                    reasons.append("a session request cannot also use per-request compression")
        if not isinstance(params, SamplingConfig):
            reasons.append(f"params must be a SamplingConfig, got {type(params).__name__}")
        else:
            reasons += params.check()                 # a config built around its checks is refused here too
            reasons += self.check_request(prompt, params, compression)
        names_ok = isinstance(namespace, str) and namespace or (isinstance(namespace, tuple) and namespace and all(
            isinstance(n, str) and n for n in namespace))
        if namespace is not None and not names_ok:
            reasons.append(f"namespace must be a non-empty string, a non-empty tuple of them, or None, got {namespace!r}")
        if rid in self.requests and not self.requests[rid].finished:
            reasons.append(f"request id {rid!r} is in use")
        if reasons:
            raise EngineError(reasons)
        gen = torch.Generator(device=self.device).manual_seed(params.seed) if params.temperature > 0 else None
        if namespace is not None:    # K/V computed under one namespace's memory is never reused under another's
            reads = row_reads(namespace)
            namespace = reads[0] if len(reads) == 1 else reads
            salt = f"{salt or ''}\x00namespace:" + "\x00".join(reads)
            # ... nor under another version of its rows: a memory read before the last cached
            # layer (a user prefix, PKM values mid-stack) changes the K/V of later layers
            versions = [m.namespace_rows().version(n) for m in self.serving.memory.memories
                        if m.namespace_rows() is not None for n in reads]
            if any(versions):
                salt += "\x00rows:" + ",".join(map(str, versions))
        req = Request(rid, prompt, params, salt, generator=gen,
                      compression=compression if compression is not None and compression.policy != "none" else None,
                      namespace=namespace, session=sess)
        if sess is not None:
            sess.busy = rid
        self.requests[rid] = req
        if params.max_new_tokens == 0:
            req.status, req.finish_reason = Status.FINISHED, "length"
        else:
            self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self._end(req, ok=False)
            req.finish_reason, req.state = "aborted", None

    def _end(self, req: Request, ok: bool) -> None:
        """Finish a request: a session adopts its K/V and state (ok) or stays as it was."""
        if req.session is not None:
            self.memory_sessions.finish(req, ok)
        self.scheduler.finish(req)

    def _scorer_reasons(self, c: CompressionConfig) -> list[str]:
        from memstack.memory.kv.compress.learned import load_scorer

        try:
            scorer = load_scorer(c.scorer)
        except MemstackError as e:
            return [str(e)]
        b = self.model.cfg.backbone
        return scorer.check_fits(b.n_layers, b.kv_heads, b.head_dim)

    def _stream_budget(self, c: CompressionConfig, n_tokens: int) -> int:
        bs = self.cfg.block_size
        sinks = -(-c.sink_tokens // bs)
        return max(-(-math.ceil(c.keep_ratio * n_tokens) // bs), sinks + 2)

    def _compress(self, req: Request) -> None:
        """StreamingLLM on blocks: keep the sink blocks and the most recent ones, free the rest.
        A token press (learned): at each segment end, keep budget(tokens seen) slots of every
        (layer, KV head), compacted into the first blocks; the rest are freed (engine/press.py)."""
        seq, c = req.seq, req.compression
        if c.policy == "learned":
            k = budget(seq.n_tokens, c.keep_ratio)
            if seq.n_tokens % self.policy.seg_len or seq.n_slots - seq.start <= k:
                return
            from memstack.engine.press import compact, held
            from memstack.memory.kv.compress.learned import load_scorer

            recent = min(c.recent, k)
            scores = load_scorer(c.scorer).scores(held(self.cache, seq.block_ids, seq.start, seq.n_slots))
            compact(self.cache, seq.block_ids, seq.start, seq.n_slots, scores, k, recent, min(c.sink_tokens, k - recent))
            self.manager.truncate(seq, k)
            return
        sinks = -(-c.sink_tokens // self.cfg.block_size)
        keep = self._stream_budget(c, seq.n_tokens)
        n = len(seq.blocks)
        if n > keep:
            self.manager.drop_blocks(seq, list(range(sinks, n - (keep - sinks))))

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def _new_seq(self, req: Request) -> bool:
        """A fresh sequence for req, starting from the longest cached prefix (pool, then tiers),
        or from its memory session. False: it cannot start now (its session's K/V does not fit)."""
        if req.session is not None:
            need = self.memory_sessions.need_blocks(req.session)
            if need > self.pool.num_free:
                self.memory_sessions.reclaim(need - self.pool.num_free)
            if need > self.pool.num_free:
                return False
            self.memory_sessions.start(req)
            return True
        seq = self.manager.new_seq(self.namespace.root(req.salt), row_reads(req.namespace) or None)
        if not self.prefix_caching or (req.compression is not None and req.compression.policy == "learned"):
            # (a token press rewrites its blocks in place: they must be its own, never cached ones)
            seq.cacheable = False                    # its blocks are never keyed (memory state, or caching off)
            req.seq, req.seg_slot0 = seq, 0
            return True
        toks = req.tokens
        hit = self.manager.match_prefix(seq, toks, len(toks) - 1)
        if self.tiers is not None:
            hit = self.tiers.extend_prefix(self, seq, toks, len(toks) - 1)
        req.seq, req.cached_tokens = seq, max(req.cached_tokens, hit)
        req.seg_slot0 = hit - hit % self.policy.seg_len  # slots are tokens here
        return True

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        self.sessions.expire()
        if self.scheduler.waiting and self.memory_sessions.sessions:
            head = self.scheduler.waiting[0]               # idle sessions give way to waiting requests
            need = self.spec.blocks_for(min(len(head.tokens), self.cfg.max_num_batched_tokens) + self.seg_extra) + 1
            if head.session is not None:
                need += self.memory_sessions.need_blocks(head.session)
            if need > self.pool.num_free:
                self.memory_sessions.reclaim(need - self.pool.num_free)
        work, copies = self.scheduler.schedule()
        for req, why in self.scheduler.failed:
            if req.session is not None:
                self.memory_sessions.finish(req, ok=False)
            req.status, req.finish_reason, req.error = Status.FINISHED, "error", why
            outs.append(RequestOutput(req.id, [], True, "error", why))
        self.scheduler.failed.clear()
        if not work:
            return outs
        self.cache.copy_blocks(copies)
        items = []
        for req, n in work:
            s = req.seq
            items.append(Work(req.tokens[s.n_tokens:s.n_tokens + n], s.n_tokens, s.n_slots, s.start, s.block_ids,
                              req.state, req.namespace))
        logits, errors = self._forward(items)
        ok_rows = [r for r in range(len(work)) if r not in errors]
        greedy = {}
        if ok_rows:
            stacked = torch.stack([logits[r] for r in ok_rows])                  # (n, V)
            top, arg = stacked.max(-1)                                           # NaN / +inf propagate into `top`
            finite = torch.isfinite(top).tolist()
            greedy = dict(zip(ok_rows, arg.tolist()))
            for r, fin in zip(ok_rows, finite):
                if not fin and not work[r][0].remaining - work[r][1] > 0:       # only rows that sample now
                    errors[r] = "the model produced non-finite logits for this request"
        for row, (req, n) in enumerate(work):
            item = items[row]
            if row not in errors and item.written != self.scheduler.slots(req, n):
                errors[row] = (f"the model wrote {item.written} K/V slots for a chunk that reserved "
                               f"{self.scheduler.slots(req, n)} (a memory adds tokens it does not declare)")
            if row in errors:
                outs.append(self._fail(req, errors[row]))
                continue
            stored = self.manager.commit(req.seq, req.tokens, n, item.written)
            req.state = item.state
            if self.tiers is not None and stored:
                self.tiers.offload(self.cache, req.seq, stored)
            if req.compression is not None:
                self._compress(req)
            if req.remaining:
                continue                                        # a prompt chunk: nothing to sample yet
            p = req.params
            try:
                if self.record_logits:
                    req.logits.append(logits[row].clone())
                tok = greedy[row] if p.temperature == 0 else int(sample(logits[row][None], p, req.generator)[0])
            except Exception as e:  # noqa: BLE001 -- one request's sampling failure is that request's
                outs.append(self._fail(req, f"sampling failed: {type(e).__name__}: {e}"))
                continue
            req.output.append(tok)
            if req.first_token_time is None:
                req.first_token_time = time.perf_counter()
            reason = None
            if tok in p.stop_ids:
                reason = "stop"
            elif len(req.output) >= p.max_new_tokens or (
                    self.cfg.max_model_len is not None and len(req.tokens) >= self.cfg.max_model_len):
                reason = "length"
            if reason:
                self._end(req, ok=True)
                req.finish_reason = reason
                req.state = None
            outs.append(RequestOutput(req.id, [tok], reason is not None, reason))
        return outs

    def _forward(self, items: list[Work]) -> tuple[list, dict[int, str]]:
        """The step's forward calls; if one fails, its rows are re-run one by one from their
        saved states so only the failing requests get the error (K/V writes are idempotent)."""
        saved = [it.state for it in items]
        try:
            return list(self.runner.run(items)), {}
        except Exception:  # noqa: BLE001 -- isolate the request(s) that fail
            pass
        logits, errors = [], {}
        for i, it in enumerate(items):
            it.state, it.written = saved[i], 0
            try:
                logits.append(self.runner.run([it])[0])
            except Exception as e:  # noqa: BLE001
                logits.append(None)
                errors[i] = f"{type(e).__name__}: {e}"
        return logits, errors

    def _fail(self, req: Request, why: str) -> RequestOutput:
        """Finish one request with an error; nothing of any other request is touched."""
        self._end(req, ok=False)
        req.finish_reason, req.error, req.state = "error", why, None
        return RequestOutput(req.id, [], True, "error", why)

    # -- conveniences --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
                 salt: str | None = None) -> list[list[int]]:
        """Run prompts to completion (together, continuously batched); their generated tokens."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp, salt) for p, sp in zip(prompts, plist)]
        while not all(self.requests[i].finished for i in ids):
            for o in self.step():
                if o.error:
                    raise EngineError(o.error)
        return [self.requests.pop(i).output for i in ids]

    def stream(self, prompt: list[int], params: SamplingConfig = SamplingConfig(), salt: str | None = None) -> Iterator[int]:
        """Yield one request's tokens as they are generated (other requests keep running)."""
        rid = self.add_request(prompt, params, salt)
        try:
            while not self.requests[rid].finished:
                for o in self.step():
                    if o.request_id == rid:
                        if o.error:
                            raise EngineError(o.error)
                        yield from o.new_tokens
        finally:
            self.abort(rid)
            self.requests.pop(rid, None)

    def forget(self, namespace: str) -> dict:
        """Remove everything this engine holds for a memory namespace (engine/forget.py); call it
        between two steps (a server: in the engine thread)."""
        from memstack.engine.forget import forget_namespace

        return forget_namespace(self, namespace)

    def kv_stats(self) -> dict[str, float]:
        """Blocks in use, and the share of reserved slots holding no visible token (waste)."""
        bs = self.cfg.block_size
        seqs = [r.seq for r in self.scheduler.running if r.seq is not None]
        reserved = sum(len(s.blocks) for s in seqs) * bs
        used = sum(s.n_slots - s.start for s in seqs)
        return {"blocks_used": self.pool.num_blocks - self.pool.num_free, "blocks_total": self.pool.num_blocks,
                "reserved_slots": reserved, "used_slots": used, "waste": 1 - used / reserved if reserved else 0.0}
