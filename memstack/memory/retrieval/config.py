"""Configs of the retrieval-memory family (import-light: reading a YAML file imports no faiss,
no sentence-transformers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from memstack.config import BackboneConfig, Checked, MemoryConfig, _layers_reasons

BACKENDS = ("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw")


@dataclass(frozen=True)
class StoreConfig(Checked):
    """How a datastore indexes its keys (store.py).

    backend: exact (torch, CPU or GPU, batched) | faiss_flat | faiss_ivf | faiss_hnsw (CPU).
    Two-stage search: the backend returns `candidates` (>= k) approximate neighbours, which are
    re-scored exactly on the stored full-precision keys (`rescore`) -- skipped where the index's
    distances are already exact over the stored keys (every FAISS backend here keeps full vectors)."""

    dim: int = 64
    metric: Literal["l2", "ip"] = "l2"
    dtype: Literal["float32", "float16"] = "float32"   # stored keys (re-scoring reads these)
    backend: Literal["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"] = "exact"
    nlist: int = 256                # IVF: inverted lists
    nprobe: int = 16                # IVF: lists visited per query
    train_min: int = 0              # IVF: vectors buffered before training; 0 = 39 * nlist (FAISS's advice)
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    rescore: bool = True            # exact re-scoring of approximate candidates (where distances are approximate)
    candidates: int = 0             # stage-1 candidates per query; 0 = k where distances are exact, else 4 * k
    compact_at: float = 0.25        # compact when this fraction of entries are tombstones (0: never)

    def check(self) -> list[str]:
        r = []
        if self.dim < 1:
            r.append(f"dim must be >= 1, got {self.dim}")
        if self.metric not in ("l2", "ip"):
            r.append(f"metric must be 'l2' or 'ip', got {self.metric!r}")
        if self.dtype not in ("float32", "float16"):
            r.append(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if self.backend not in BACKENDS:
            r.append(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_min", "candidates"):
            if getattr(self, name) < 0:
                r.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.compact_at < 1:
            r.append(f"compact_at must be in [0, 1), got {self.compact_at}")
        return r

    @property
    def ivf_train_min(self) -> int:
        return self.train_min or 39 * self.nlist


@dataclass(frozen=True)
class KNNLMConfig(MemoryConfig):
    """kNN-LM (Khandelwal et al., arXiv 1911.00172): p = lambda * p_kNN + (1 - lambda) * p_LM.

    Neighbours come from a corpus datastore (`store`, built by `memstack datastore build`) and,
    with `cache_len` > 0, from the document's own past (the continuous-cache variant the paper
    combines it with)."""

    kind: ClassVar[str] = "knn_lm"
    store: str | None = None        # a datastore directory; None = the document cache only
    namespace: str = "default"      # the store namespace queries read
    k: int = 32                     # neighbours per query (paper: 1024 on 103M entries)
    lmbda: float = 0.25             # interpolation weight of p_kNN
    temperature: float = 1.0        # p_kNN = softmax(-d / temperature)
    cache_len: int = 256            # per-document cache of (hidden, next token) pairs; 0 = off

    def check(self) -> list[str]:
        r = []
        if self.k < 1:
            r.append(f"k must be >= 1, got {self.k}")
        if not 0 <= self.lmbda <= 1:
            r.append(f"lmbda must be in [0, 1], got {self.lmbda}")
        if self.temperature <= 0:
            r.append(f"temperature must be > 0, got {self.temperature}")
        if self.cache_len < 0:
            r.append(f"cache_len must be >= 0, got {self.cache_len}")
        if self.store is None and self.cache_len == 0:
            r.append("knn_lm needs a datastore (store) or a document cache (cache_len > 0); it has neither")
        return r


@dataclass(frozen=True)
class MemorizingConfig(MemoryConfig):
    """Memorizing Transformer kNN-augmented attention (Wu et al., arXiv 2203.08913)."""

    kind: ClassVar[str] = "memorizing"
    layers: tuple[int, ...] | None = None   # kNN layers; None = the last-but-one layer (paper: 9 of 12)
    mem_len: int = 1024                     # (key, value) pairs kept per document and KV head
    k: int = 32                             # retrieved entries per query (paper: 32)
    evict: Literal["fifo", "lru"] = "fifo"  # what goes when the memory is full
    gate_init: float = 0.0                  # initial gate bias b_g: g = sigmoid(b_g) (0.5)
    store: Literal["memory", "mmap"] = "memory"   # mmap: keys/values in memory-mapped files (64k+ entries)
    mmap_dir: str = ""                      # mmap: directory of the (unlinked) files; "" = the system temp dir

    @property
    def holds_context(self) -> bool:
        return False   # it keeps past keys, but reads them by top-k next to local attention, not as context

    def check(self) -> list[str]:
        r = []
        if self.store not in ("memory", "mmap"):
            r.append(f"store must be 'memory' or 'mmap', got {self.store!r}")
        elif self.store == "mmap" and self.evict != "fifo":
            r.append("store='mmap' keeps evict='fifo' (LRU ties depend on slot order, so its read would not equal "
                     "the in-memory store's)")
        if not isinstance(self.mmap_dir, str):
            r.append(f"mmap_dir must be a string, got {type(self.mmap_dir).__name__}")
        if self.mem_len < 1:
            r.append(f"mem_len must be >= 1, got {self.mem_len}")
        if self.k < 1:
            r.append(f"k must be >= 1, got {self.k}")
        if self.evict not in ("fifo", "lru"):
            r.append(f"evict must be 'fifo' or 'lru', got {self.evict!r}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)

    def memory_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else (max(0, n_layers - 2),)


@dataclass(frozen=True)
class RetroConfig(MemoryConfig):
    """RETRO chunked cross-attention (Borgeaud et al., arXiv 2112.04426)."""

    kind: ClassVar[str] = "retro"
    store: str | None = None        # chunk datastore (`memstack datastore build --kind retro`); None = the document's own past
    namespace: str = "default"
    chunk: int = 64                 # tokens per chunk (paper: 64)
    k: int = 2                      # neighbours per chunk (paper: 2 in training)
    layers: tuple[int, ...] | None = None   # CCA layers; None = every layer from the middle one on
    enc_layers: int = 1             # neighbour encoder depth
    enc_query: bool = True          # the encoder cross-attends to the query chunk's activations (paper)
    cca_rope: bool = False          # CCA scores see relative positions (token vs neighbour token; the paper uses relative
                                    # encodings; off by default: the measured RETRO-fit ran without them)
    share_embedding: bool = False   # the encoder embeds neighbours with the backbone's token embedding
    key: Literal["bag", "minilm"] = "bag"   # chunk key: frozen MiniLM over the chunk text (the paper's frozen
                                    # pretrained embedder) or a bag of frozen random token vectors (no model)
    tokenizer: str = "bpe512"       # key=minilm: the model's tokenizer (decodes a chunk to text)
    key_dim: int = 64               # key=bag: chunk-key dimension (minilm: 384)
    key_seed: int = 1234            # key=bag: seed of the frozen token vectors
    db_len: int = 64                # document mode: past chunks kept per document
    exclude_own_doc: bool = True    # never retrieve chunks of the document being read (paper: training)
    retrieval: bool = True          # False: same model, neighbours withheld (the RETRO[OFF] baseline)
    random_neighbours: bool = False  # ablation: k store entries picked by a hash of the chunk, not by its key

    def check(self) -> list[str]:
        r = []
        for name in ("chunk", "k", "enc_layers", "key_dim", "db_len"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.key not in ("bag", "minilm"):
            r.append(f"key must be 'bag' or 'minilm', got {self.key!r}")
        if self.random_neighbours and self.store is None:
            r.append("random_neighbours needs a corpus store (store: DIR)")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        r = _layers_reasons(self.layers, backbone)
        if self.chunk >= 1 and backbone.seg_len % self.chunk:
            r.append(f"seg_len ({backbone.seg_len}) must be a multiple of chunk ({self.chunk}) so chunks align with segments")
        return r

    def cca_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else tuple(range(n_layers // 2, n_layers))


@dataclass(frozen=True)
class RAGConfig(MemoryConfig):
    """RAG through the context (In-Context RALM style): at each segment start, the document's
    recent tokens are the query; the retrieved passages are put in front of the segment."""

    kind: ClassVar[str] = "rag"
    store: str | None = None        # passage store (`memstack datastore build --kind rag`); None = retrieves nothing
    tokenizer: str = "bpe512"       # the model's tokenizer: decodes the query, encodes the passages
    method: Literal["dense", "bm25", "hybrid"] = "dense"
    k: int = 1                      # passages per segment
    passage_tokens: int = 48        # tokens of each passage in the context (cut / padded with <eot>)
    query_tokens: int = 64          # the document's last tokens that form the query
    namespace: str = "default"

    def check(self) -> list[str]:
        r = []
        for name in ("k", "passage_tokens", "query_tokens"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method not in ("dense", "bm25", "hybrid"):
            r.append(f"method must be dense, bm25 or hybrid, got {self.method!r}")
        return r
