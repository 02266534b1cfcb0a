"""Name -> (config class, implementation class), for memories and for tasks.

Entries hold dotted paths ("module:Class") and import lazily, so heavy optional dependencies
(faiss, triton, sentence-transformers, torchrec) load only when a memory that needs them is
used. Unknown names list the valid ones. `register_memory` / `register_task` are public: a third
party adds a memory with a decorator, and the contract tests and the leaderboard pick it up.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from memstack.config import BackboneConfig, MemoryConfig
from memstack.errors import UnknownNameError


def _load(ref: str | type) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Entry:
    name: str
    config: str | type    # config dataclass, or "module:Class"
    target: str | type    # implementation class, or "module:Class"
    summary: str = ""


class Registry:
    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, config: str | type, target: str | type, summary: str = "", replace: bool = False) -> None:
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered; pass replace=True to override it")
        self._entries[name] = Entry(name, config, target, summary)

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise UnknownNameError(self.what, name, list(self._entries))
        return self._entries[name]

    def config_class(self, name: str) -> type:
        cls = _load(self.entry(name).config)
        if getattr(cls, "kind", None) != name:
            raise TypeError(f"{self.what} {name!r}: config class {cls.__name__} has kind {getattr(cls, 'kind', None)!r}")
        return cls

    def target_class(self, name: str) -> type:
        return _load(self.entry(name).target)

    def default_config(self, name: str) -> Any:
        return self.config_class(name)()


MEMORIES = Registry("memory")
TASKS = Registry("task")

# Built-in memories. Keep this table sorted by family; each line is the whole registration.
for _name, _cfg, _impl, _summary in [
    ("none", "memstack.memory.baseline:NoMemoryConfig", "memstack.memory.baseline:NoMemory",
     "the plain backbone: each segment sees only itself"),
    ("memory_tokens", "memstack.memory.learned.config:MemoryTokensConfig",
     "memstack.memory.learned.memory_tokens:MemoryTokens",
     "learned tokens prepended to every segment (Memory Transformer, non-recurrent)"),
    ("xl", "memstack.memory.learned.config:XLConfig", "memstack.memory.learned.xl:TransformerXL",
     "Transformer-XL: stop-gradient hidden states of the last mem_len tokens per layer"),
    # learned memory state: recurrent memory tokens and associative memories (issue 3, part A)
    ("rmt", "memstack.memory.learned.config:RMTConfig", "memstack.memory.learned.rmt:RMT",
     "Recurrent Memory Transformer: read/write memory tokens carried across segments"),
    ("armt", "memstack.memory.learned.config:ARMTConfig", "memstack.memory.learned.armt:ARMT",
     "Associative RMT: per-layer associative matrix written by delta rule from write tokens"),
    ("infini", "memstack.memory.learned.config:InfiniConfig", "memstack.memory.learned.infini:Infini",
     "Infini-attention: per-head compressive linear-attention memory gated with local attention"),
    ("hmt", "memstack.memory.learned.config:HMTConfig", "memstack.memory.learned.hmt:HMT",
     "Hierarchical Memory Transformer: sensory tokens, recall over a cache of memory embeddings"),
    # learned memory state, part B: compression, gated memory bank, latents, prefixes
    ("compressive", "memstack.memory.learned.config:CompressiveConfig",
     "memstack.memory.learned.compressive:Compressive",
     "Compressive Transformer: XL memory plus a compressed memory of evicted states (pool/conv/most-used)"),
    ("lm2", "memstack.memory.learned.config:LM2Config", "memstack.memory.learned.lm2:LM2",
     "LM2: per-layer memory bank read by gated cross-attention, written with input/forget gates"),
    ("latents", "memstack.memory.learned.config:LatentConfig", "memstack.memory.learned.latents:Latents",
     "Perceiver-style latents: cross-attend to each segment, carried on, read as extra keys/values"),
    ("prefix", "memstack.memory.learned.config:PrefixConfig", "memstack.memory.learned.prefix:Prefix",
     "prefix-tuning: a learned key/value prefix per layer (MLP-reparameterised), trainable on a frozen backbone"),
    ("kv_dense", "memstack.memory.kv.config:DenseKVConfig", "memstack.memory.kv.dense:DenseKV",
     "dense KV cache: segment-scoped for decoding, or document-scoped (optionally windowed)"),
    # runtime memory (issue 5): paged KV with whole-block freeing and compression
    ("kv_paged", "memstack.memory.kv.config:PagedKVConfig", "memstack.memory.kv.paged:PagedKV",
     "paged KV cache (block table, whole-block freeing); optional StreamingLLM/H2O/SnapKV/KIVI compression"),
    # sparse memory tables (memory/sparse/)
    ("engram", "memstack.memory.sparse.config:EngramConfig", "memstack.memory.sparse.engram:Engram",
     "Engram: hashed token N-gram table rows, gated into the residual stream at chosen layers"),
    ("pkm", "memstack.memory.sparse.config:PKMConfig", "memstack.memory.sparse.pkm:ProductKeyMemory",
     "product-key memory / Memory+: learned query, top-k of n_keys^2 value rows, SiLU-gated output"),
    # runtime memory: learned bounded KV memory
    ("trellis", "memstack.memory.kv.config:TrellisConfig", "memstack.memory.kv.trellis:Trellis",
     "Trellis: fixed key/value slots written by test-time gradient steps with a forget gate, plus an exact window"),
    # retrieval memory (memstack/memory/retrieval)
    ("knn_lm", "memstack.memory.retrieval.config:KNNLMConfig", "memstack.memory.retrieval.knn_lm:KNNLM",
     "kNN-LM: interpolate p_LM with neighbours' next tokens from a datastore and the document cache"),
    ("memorizing", "memstack.memory.retrieval.config:MemorizingConfig",
     "memstack.memory.retrieval.memorizing:MemorizingTransformer",
     "Memorizing Transformer: top-k attention over a growing per-document KV memory, gated with local attention"),
    ("retro", "memstack.memory.retrieval.config:RetroConfig", "memstack.memory.retrieval.retro:Retro",
     "RETRO: chunked cross-attention over encoded neighbours retrieved per chunk (corpus store or the document's past)"),
    ("rag", "memstack.memory.retrieval.config:RAGConfig", "memstack.memory.retrieval.rag_context:RAGContext",
     "RAG in context: passages retrieved with the document's recent text, prepended to each segment"),
]:
    MEMORIES.add(_name, _cfg, _impl, _summary)

for _name, _cfg, _impl, _summary in [
    ("lm", "memstack.evals.lm:LMTaskConfig", "memstack.evals.lm:LMTask",
     "language modelling on a real corpus (SOTU by default); bits per byte"),
    ("mqar", "memstack.evals.mqar:MQARTaskConfig", "memstack.evals.mqar:MQARTask",
     "Zoology multi-query associative recall; accuracy on queried values"),
    ("passkey", "memstack.evals.passkey:PasskeyTaskConfig", "memstack.evals.passkey:PasskeyTask",
     "passkey retrieval in real-text filler; exact-match accuracy over a depth x length grid"),
    ("segment_ar", "memstack.evals.segment_ar:SegmentARTaskConfig", "memstack.evals.segment_ar:SegmentARTask",
     "one key-value pair per segment, query in the last segment (ARMT-style); accuracy"),
    ("facts", "memstack.evals.facts:FactsTaskConfig", "memstack.evals.facts:FactsTask",
     "synthetic key -> value facts: closed-book recall of trained facts, and the in-context variant"),
    ("slot_recall", "memstack.evals.slot_recall:SlotRecallTaskConfig", "memstack.evals.slot_recall:SlotRecallTask",
     "typed facts in the context segment(s), asked in the last segment: chance without memory; accuracy"),
    ("longctx", "memstack.evals.longctx:LongContextTaskConfig", "memstack.evals.longctx:LongContextTask",
     "BABILong-style / RULER-style facts in long real text, trained <= 1k tokens, streamed to 1M+; exact match"),
]:
    TASKS.add(_name, _cfg, _impl, _summary)


def register_memory(name: str, *, config: str | type, summary: str = "", replace: bool = False) -> Callable[[type], type]:
    """Class decorator: `@register_memory("mine", config=MineConfig)` on a `Memory` subclass."""

    def deco(cls: type) -> type:
        MEMORIES.add(name, config, cls, summary or (cls.__doc__ or "").strip().split("\n")[0], replace=replace)
        return cls

    return deco


def register_task(name: str, *, config: str | type, summary: str = "", replace: bool = False) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        TASKS.add(name, config, cls, summary or (cls.__doc__ or "").strip().split("\n")[0], replace=replace)
        return cls

    return deco


def config_class_for(base: type, kind: Any) -> type:
    """The concrete config class for a polymorphic base (MemoryConfig, TaskConfig) and a kind."""
    reg = MEMORIES if issubclass(base, MemoryConfig) else TASKS
    if kind is None:
        raise ValueError(f"missing 'kind'; valid {reg.what} kinds: {', '.join(sorted(reg.names()))}")
    if not isinstance(kind, str):
        raise UnknownNameError(reg.what, str(kind), reg.names())
    return reg.config_class(kind)


def memory_config(kind: str, **fields: Any) -> MemoryConfig:
    """`memory_config("xl", mem_len=128)`: a memory config by registry name."""
    return MEMORIES.config_class(kind)(**fields)


def validate_memories(backbone: BackboneConfig, memories: tuple[MemoryConfig, ...] | list[MemoryConfig]) -> list[str]:
    """Every reason this combination of memories cannot run on this backbone (empty: valid)."""
    reasons: list[str] = []
    kinds = []
    for i, m in enumerate(memories):
        if not isinstance(m, MemoryConfig) or not m.kind:
            reasons.append(f"memories.{i}: {m!r} is not a memory config")
            continue
        if m.kind not in MEMORIES.names():
            reasons.append(f"memories.{i}: unknown memory {m.kind!r}; valid: {', '.join(sorted(MEMORIES.names()))}")
            continue
        kinds.append(m.kind)
        reasons += [f"memories.{i} ({m.kind}): {r}" for r in m.check_with(backbone)]
    for k in sorted(set(kinds)):
        if kinds.count(k) > 1:
            reasons.append(f"memory {k!r} appears {kinds.count(k)} times; a stack holds each memory once")
    caches = [m.kind for m in memories if isinstance(m, MemoryConfig) and getattr(m, "holds_context", False)]
    if len(caches) > 1:
        reasons.append(f"{' and '.join(caches)} both keep the keys of past tokens for attention; "
                       "they would feed the same context twice -- keep one")
    return reasons


def validate(backbone: BackboneConfig, memories: list[MemoryConfig]) -> list[str]:
    """Public alias of `validate_memories`: reasons a (backbone, memories) combination is invalid."""
    return validate_memories(backbone, memories)
