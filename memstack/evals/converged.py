"""`memstack bench --suite converged`: per-user memory on a frozen pretrained model, compared honestly.

A stream of simulated users (evals/personal_facts.py) each states personal facts `mentions` times;
later each fact is asked by its cue with nothing of the conversation in context. Approaches, on
the same stream and the same frozen backbone:

    base         the plain served backbone (what it "recalls" is chance)
    in_context   the user's facts pinned in front of every request (a KV prefix)
    rag          the user's facts in a datastore namespace of their own (MiniLM + exact search);
                 the top-1 fact for the question is put in front of the request
    tables       sparse user tables: Engram's hashed N-gram rows in the user's namespace, learned
                 online by the serving code path (engine/user_memory.py: policy, commit, drift guard)
    tables_rag   both
    lora         a peft LoRA adapter per user on the same backbone (evals/converged_lora.py), trained on
                 the same texts with the same number of updates per mention
    full_ft      the whole backbone fine-tuned per user (evals/converged_ft.py): each user's own copy,
                 the changed tensors stored; run user by user, on the first `ft_users` test users

Choices on validation, results on test: the simulated users are split into validation users and
test users (personal_facts.split_users: disjoint, deterministic). The tables' learning rate and
updates per mention (`lr_grid`, `steps_grid`), LoRA's and full fine-tuning's learning rates
(`lora_lr_grid`, `ft_lr_grid`) are chosen on the validation users (evals/converged_select.py: the
best recall after the last mention among candidates whose held-out bpb rises at most
`bpb_budget`); every figure of the results is measured on the test users only. Recall comes with
its binomial standard error, the standard error over users and a Wilson 95 % interval.

Measured (never asserted): recall after 1 and after `mentions` mentions; leakage (user B asked A's
facts, and the differential test: B's logits with every other user's rows installed minus with
none, max |diff|); forgetting (bits per byte on held-out Wikipedia text, accuracy on facts the
base model knew, both read as each user); bytes per user; update latency; served request latency
vs the plain backbone (the engine, same weights, interleaved runs, medians). One JSON record and
a markdown table. Forgetting a user is checked at the end (rows, store, datastore entries).
Users are independent in every approach (a user's rows, datastore namespace, adapter or weights
are theirs alone), so interleaving users in the stream changes no result; full fine-tuning runs
user by user to hold one copy of the model at a time.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memstack.config import Checked
from memstack.evals.personal_facts import KNOWN, Fact, heldout_texts, split_users
from memstack.evals.stats import proportion
from memstack.memory.base import Step

APPROACHES = ("base", "in_context", "rag", "tables", "tables_rag", "lora", "full_ft")


@dataclass(frozen=True)
class ConvergedConfig(Checked):
    name: str = "converged"
    backbone: str = "smollm2"            # a pretrained backbone, or "tiny" (random, byte tokenizer: tests)
    seg_len: int = 256
    users: int = 4                       # test users (every reported figure)
    val_users: int = 0                   # validation users (disjoint): the grids below are chosen on them
    facts_per_user: int = 2
    mentions: int = 3
    seed: int = 0
    layers: tuple[int, ...] = (27,)      # the memory after these blocks (user rows read there)
    # how user memory is addressed: "hashed" (Engram: N-gram hashes into the user's rows),
    # "product_key" (PKM: a learned-query top-k over product keys, the user's own value rows) or
    # "identity" (Prefix: the user's own few key/value rows, read by every query of its requests)
    addressing: str = "hashed"
    n_keys: int = 32                     # product_key: n_keys**2 value rows
    identity_rows: int = 32              # identity: key/value rows per layer and user
    knn: int = 8
    orders: tuple[int, ...] = (2, 3)
    heads: int = 4
    head_dim: int = 16
    rows_per_head: int = 1021
    user_rows_per_head: int = 257
    value_init_std: float = 0.1
    table_init_std: float = 1e-4         # the knowledge rows, when not retrofitted: near zero
    # an adapter holding a retrofitted knowledge table (benchmarks/converged/knowledge_retrofit.py, or
    # `memstack train` with `train.trainable: memory`): loaded into the hashed model, whose memory config
    # must equal the adapter's (every difference is listed); "": the knowledge rows stay near zero
    knowledge: str = ""
    lr: float = 1.0
    steps: int = 5
    max_row_update_norm: float = 100.0
    drift_threshold: float = 0.01
    heldout: int = 4
    heldout_tokens: int = 128
    latency_requests: int = 3
    latency_new_tokens: int = 8
    approaches: tuple[str, ...] = APPROACHES[:5]
    lora_r: int = 8
    lora_lr: float = 1e-3
    ft_lr: float = 1e-5
    ft_users: int = 0                    # full_ft on the first ft_users test users (0: all of them)
    # candidates chosen on the validation users (empty: the single value above, recorded as not chosen)
    lr_grid: tuple[float, ...] = ()
    steps_grid: tuple[int, ...] = ()
    lora_lr_grid: tuple[float, ...] = ()
    ft_lr_grid: tuple[float, ...] = ()
    bpb_budget: float = 0.01             # selection: a candidate's validation bpb may rise at most this much
    validation_from: str = ""            # a validation.json of an earlier run of this config: its choices, no sweep

    def check(self) -> list[str]:
        r = []
        for f in ("users", "facts_per_user", "mentions", "steps", "heldout", "heldout_tokens", "latency_requests",
                  "latency_new_tokens", "seg_len", "user_rows_per_head", "identity_rows"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                r.append(f"{f} must be a positive integer, got {v!r}")
        for f in ("val_users", "ft_users"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                r.append(f"{f} must be an integer >= 0, got {v!r}")
        if isinstance(self.ft_users, int) and isinstance(self.users, int) and self.ft_users > self.users:
            r.append(f"ft_users ({self.ft_users}) must be at most users ({self.users})")
        for f in ("lr", "lora_lr", "ft_lr", "bpb_budget"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                r.append(f"{f} must be a finite number > 0, got {v!r}")
        for f in ("lr_grid", "lora_lr_grid", "ft_lr_grid", "steps_grid"):
            for v in getattr(self, f):
                ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 1) if f == "steps_grid" else (
                    not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0)
                if not ok:
                    r.append(f"{f} entries must be {'positive integers' if f == 'steps_grid' else 'finite numbers > 0'}"
                             f", got {v!r}")
        if (self.lr_grid or self.steps_grid or self.lora_lr_grid or self.ft_lr_grid) and self.val_users == 0:
            r.append("a grid (lr_grid, steps_grid, lora_lr_grid, ft_lr_grid) needs val_users >= 1: choices are "
                     "made on validation users")
        if isinstance(self.users, int) and self.users < 2:
            r.append("users must be >= 2 (leakage is measured between users)")
        if self.addressing not in ("hashed", "product_key", "identity"):
            r.append(f"addressing must be 'hashed', 'product_key' or 'identity', got {self.addressing!r}")
        if bad := [a for a in self.approaches if a not in APPROACHES]:
            r.append(f"approaches {bad} are not among {list(APPROACHES)}")
        if self.knowledge:
            from memstack.adapters import is_adapter

            if self.addressing != "hashed":
                r.append(f"knowledge (a retrofitted Engram table) needs addressing 'hashed', got {self.addressing!r}")
            if not is_adapter(self.knowledge):
                r.append(f"knowledge must be an adapter directory (adapter.json inside), got {self.knowledge!r}")
        return r


# -- the model ------------------------------------------------------------------------------------
def build(cfg: ConvergedConfig):
    """(tables model, plain backbone sharing its weights, tokenizer)."""
    from memstack.data.tokenizers import get_tokenizer
    from memstack.memory.sparse.config import EngramConfig, PKMConfig

    eng = dict(layers=cfg.layers, orders=cfg.orders, heads=cfg.heads, head_dim=cfg.head_dim,
               rows_per_head=cfg.rows_per_head, user_rows_per_head=cfg.user_rows_per_head,
               value_init_std=cfg.value_init_std, table_init_std=cfg.table_init_std)
    pkm = dict(layers=cfg.layers, n_keys=cfg.n_keys, k_dim=32, heads=cfg.heads, knn=cfg.knn, memory_plus=False,
               user_values=True, out_init_std=cfg.value_init_std, value_init_std=cfg.table_init_std)

    def memory(tokenizer=None):
        if cfg.addressing == "identity":
            from memstack.memory.learned.config import PrefixConfig

            return PrefixConfig(n_prefix=0, user_prefix=cfg.identity_rows, layers=cfg.layers)
        return EngramConfig(**eng, tokenizer=tokenizer) if cfg.addressing == "hashed" else PKMConfig(**pkm)
    torch.manual_seed(cfg.seed)
    if cfg.backbone == "tiny":
        from memstack.backbone.model import build_model
        from memstack.config import BackboneConfig, ModelConfig

        tok = get_tokenizer("byte")
        b = BackboneConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                           seg_len=cfg.seg_len, init_std=0.3)
        model = build_model(ModelConfig(b, (memory(),)))
    else:
        from memstack.hf.pretrained import PRETRAINED, load_pretrained

        tok = get_tokenizer(PRETRAINED[cfg.backbone].tokenizer)
        model = load_pretrained(cfg.backbone, [memory(PRETRAINED[cfg.backbone].tokenizer)], seg_len=cfg.seg_len)
    if cfg.knowledge:       # refused, with every difference, unless this model is the one it was trained for
        from memstack.adapters import load_adapter

        load_adapter(model, cfg.knowledge)
    model = model.eval()
    return model, model.without_memories([0]).eval(), tok


class Shared:
    """What every pass (validation candidates, the test run) shares: the models (built once, so the
    user tables' random W_V is the same everywhere), the tokenizer, the validation / test users,
    held-out text and the canary (no answer of any user among them)."""

    def __init__(self, cfg: ConvergedConfig):
        self.cfg = cfg
        self.model, self.plain, self.tok = build(cfg)
        self.eot = self.tok.eot_id
        self.val_users, self.test_users = split_users(cfg.val_users, cfg.users, cfg.facts_per_user, cfg.seed)
        answers = {f.answer.strip() for fs in self.val_users + self.test_users for f in fs}
        texts = heldout_texts(cfg.heldout + 2, answers)
        trunc = lambda t: self.tok.encode(t)[: cfg.heldout_tokens]     # noqa: E731
        self.heldout = [trunc(t) for t in texts[:cfg.heldout]]
        self.canary = [[self.eot] + trunc(t) for t in texts[cfg.heldout:]]


class Harness:
    """One stream of `users` over `approaches`, with the given hyperparameters (None: the config's)."""

    def __init__(self, shared: Shared, root: Path, users: list[list[Fact]], tag: str = "u",
                 approaches: tuple[str, ...] | None = None, lr: float | None = None, steps: int | None = None,
                 lora_lr: float | None = None):
        from memstack.engine.user_memory import LearnConfig, UserMemory

        cfg = self.cfg = shared.cfg
        self.approaches = tuple(cfg.approaches if approaches is None else approaches)
        self.model, self.plain, self.tok, self.eot = shared.model, shared.plain, shared.tok, shared.eot
        self.users, self.heldout, self.tag = users, shared.heldout, tag
        self.steps = cfg.steps if steps is None else steps
        self.memory = UserMemory(self.model, root / "users", LearnConfig(
            lr=cfg.lr if lr is None else lr, steps=self.steps, max_row_update_norm=cfg.max_row_update_norm,
            drift_threshold=cfg.drift_threshold, rate_per_min=10_000, max_tokens=512), shared.canary)
        self.rag = None
        if "rag" in self.approaches or "tables_rag" in self.approaches:
            self.rag = UserFactsRAG()
        self.lora = None
        if "lora" in self.approaches:
            from memstack.evals.converged_lora import LoRAUsers

            self.lora = LoRAUsers(self.plain, cfg.lora_r, cfg.lora_lr if lora_lr is None else lora_lr, self.steps)
        self.ft = None                   # full_ft: set by converged_ft.full_ft_pass while it runs

    def ns(self, u: int) -> str:
        return f"tenant:bench/user:{self.tag}{u}"

    def close(self) -> None:
        """Drop every user's rows and entries this harness made (validation candidates)."""
        for u in range(len(self.users)):
            if self.memory.store(self.ns(u)).exists:
                self.memory.forget(self.ns(u), lambda n: {"tables_dropped": sum(m.forget(n) for m in
                                                                                self.model.memory.memories)})

    # -- what a request of user u sees -------------------------------------------------------------
    def prefix(self, approach: str, u: int, query: str) -> list[int]:
        if approach == "in_context":
            return self.tok.encode(" ".join(f.text for f in self.users[u]) + "\n")
        if approach in ("rag", "tables_rag"):
            return self.tok.encode(self.rag.top1(self.ns(u), query) + "\n")
        return []

    def reader(self, approach: str, u: int):
        """(model, namespace) a request of user u runs with."""
        if approach in ("tables", "tables_rag"):
            return self.model, self.ns(u)
        return self.plain, None

    def forward_fn(self, approach: str, u: int):
        """ids -> (T, V) logits of a request of user u under `approach`."""
        if approach == "lora":
            return lambda ids: self.lora.logits(f"u{u}", ids)
        if approach == "full_ft":
            return lambda ids: self.ft.logits(f"u{u}", ids)
        model, ns = self.reader(approach, u)
        return lambda ids: self.logits(model, ids, ns)

    @torch.no_grad()
    def logits(self, model, ids: list[int], ns: str | None) -> torch.Tensor:
        out, _ = model(torch.tensor([ids]), None, Step(), namespaces=None if ns is None else (ns,))
        return out.logits[0].float()                                          # (T, V)

    def answer_ids(self, cue: str, answer: str) -> tuple[list[int], list[int]]:
        c = self.tok.encode(cue)
        full = self.tok.encode(cue + answer)
        return (c, full[len(c):]) if full[:len(c)] == c else (c, self.tok.encode(answer))

    def recalled(self, approach: str, u: int, cue: str, answer: str) -> bool:
        """Greedy decoding after the cue reproduces the answer (teacher-forced argmax = greedy)."""
        fwd = self.forward_fn(approach, u)
        c, a = self.answer_ids(cue, answer)
        ids = [self.eot] + self.prefix(approach, u, cue) + c
        lg = fwd(ids + a[:-1])
        pred = lg[len(ids) - 1:].argmax(-1).tolist()
        return pred == a

    def hits(self, approach: str, asker=lambda u: u) -> list[bool]:
        """Per fact of every user, whether user asker(fact's user) recalls it."""
        return [self.recalled(approach, asker(f.user), f.cue, f.answer) for fs in self.users for f in fs]

    def recall(self, approach: str, asker=lambda u: u) -> float:
        hits = self.hits(approach, asker)
        return sum(hits) / len(hits)

    def bpb(self, approach: str, u: int) -> float:
        fwd = self.forward_fn(approach, u)
        nll, nbytes = 0.0, 0
        for ids in self.heldout:
            pre = [self.eot] + self.prefix(approach, u, self.tok.decode(ids[:48]))
            lg = fwd(pre + ids[:-1])[len(pre) - 1:]
            nll += float(F.cross_entropy(lg, torch.tensor(ids), reduction="sum"))
            nbytes += len(self.tok.decode(ids).encode())
        return nll / nbytes / math.log(2)

    # -- learning ----------------------------------------------------------------------------------
    def teach(self, u: int) -> dict:
        """One mention of every fact of user u, to every approach that learns."""
        out = {}
        if "tables" in self.approaches or "tables_rag" in self.approaches:
            texts = [[self.eot] + self.tok.encode(f.text) for f in self.users[u]]
            out["tables"] = self.memory.learn(self.ns(u), texts, self.memory.rows.install)
        if self.rag is not None:
            t0 = time.perf_counter()
            self.rag.add(self.ns(u), [f.text for f in self.users[u]])
            out["rag_s"] = time.perf_counter() - t0
        if self.lora is not None:
            t0 = time.perf_counter()
            self.lora.learn(f"u{u}", [[self.eot] + self.tok.encode(f.text) for f in self.users[u]])
            out["lora_s"] = time.perf_counter() - t0
        return out

    # -- leakage: the differential test --------------------------------------------------------------
    @torch.no_grad()
    def differential(self) -> float:
        """max over users u of |logits of u's row with every user's rows installed - with only u's|,
        all users' cues in one packed forward (rows padded to one length)."""
        seqs = [[self.eot] + self.tok.encode(fs[0].cue) for fs in self.users]
        T = max(len(s) for s in seqs)
        x = torch.tensor([s + [self.eot] * (T - len(s)) for s in seqs])
        names = tuple(self.ns(u) for u in range(len(seqs)))
        rows = self.memory.rows
        full = self.model(x, None, Step(), namespaces=names)[0].logits
        worst = 0.0
        saved = {n: rows.table(n) for n in names}
        for u, n in enumerate(names):
            for other in names:
                if other != n and saved[other] is not None:
                    rows.drop(other)
            alone = self.model(x, None, Step(), namespaces=names)[0].logits
            worst = max(worst, float((full[u] - alone[u]).abs().max()))
            for other, t in saved.items():
                if t is not None:
                    rows.install(other, t)
        return worst


class UserFactsRAG:
    """The user's facts in one datastore, one namespace per user (MiniLM embeddings, exact search)."""

    def __init__(self):
        from memstack.memory.retrieval.config import StoreConfig
        from memstack.memory.retrieval.embedder import Embedder
        from memstack.memory.retrieval.store import Datastore

        self.emb = Embedder()
        self.store = Datastore(StoreConfig(dim=self.emb.dim, metric="ip"), self.emb.fingerprint,
                               payload={"fact": ("int64", ())}, text=True)
        self.ids: dict[str, list[int]] = {}

    def add(self, ns: str, texts: list[str]) -> None:
        new = [t for t in texts if t not in self.texts(ns)]     # a repeated mention adds nothing new
        if new:
            ids = self.store.add(self.emb.encode(new), {"fact": torch.zeros(len(new), dtype=torch.long)},
                                 namespace=ns, texts=new)
            self.ids.setdefault(ns, []).extend(ids.tolist())

    def texts(self, ns: str) -> list[str]:
        rows = self.store.ids
        return [self.store.text(int((rows == i).nonzero()[0])) for i in self.ids.get(ns, [])]

    def top1(self, ns: str, query: str) -> str:
        res = self.store.search(self.emb.encode([query]), 1, ns)
        row = int(res.rows[0, 0])
        return self.store.text(row) if row >= 0 else ""

    def forget(self, ns: str) -> int:
        ids = self.ids.pop(ns, [])
        if ids:
            self.store.delete(ids, namespace=ns)
        return len(ids)

    def nbytes(self, ns: str) -> int:
        return sum(self.emb.dim * 4 + len(t.encode()) for t in self.texts(ns))


def _kv_bytes_per_token(model) -> int:
    b = model.cfg.backbone
    return 2 * b.n_layers * b.n_kv_heads * b.head_dim * 4


def served_latency(h: Harness, approaches: list[str]) -> dict[str, float]:
    """Median wall seconds of one served request (prompt = user 0's cue with the approach's
    prefix, greedy latency_new_tokens tokens) in the engine, approaches interleaved."""
    from memstack.engine import Engine, EngineConfig
    from memstack.generate import SamplingConfig

    cfg = h.cfg
    engines = {"plain": Engine(h.plain, EngineConfig(block_size=16, num_blocks=64)),
               "tables": Engine(h.model, EngineConfig(block_size=16, num_blocks=64))}
    params = SamplingConfig(max_new_tokens=cfg.latency_new_tokens)
    times: dict[str, list[float]] = {a: [] for a in approaches}
    f = h.users[0][0]
    for r in range(cfg.latency_requests + 1):                       # the first round warms up
        for a in approaches:
            model, ns = h.reader(a, 0)
            eng = engines["tables" if model is h.model else "plain"]
            prompt = [h.eot] + h.prefix(a, 0, f.cue) + h.tok.encode(f.cue)
            t0 = time.perf_counter()
            rid = eng.add_request(prompt, params, namespace=ns)
            while not eng.requests[rid].finished:
                eng.step()
            eng.requests.pop(rid)
            if r:
                times[a].append(time.perf_counter() - t0)
    return {a: statistics.median(v) for a, v in times.items()}


def run_converged(cfg: ConvergedConfig, out: Path, progress: bool = True) -> dict:
    """The whole evaluation; writes out/record.json and out/results.md (and out/validation.json as
    soon as the choices are made), returns the record."""
    from memstack.evals.converged_ft import full_ft_pass
    from memstack.evals.converged_select import load_choices, save_choices, validate

    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    t_start = time.time()
    reused = load_choices(cfg.validation_from, cfg) if cfg.validation_from else None
    with tempfile.TemporaryDirectory() as tmp:
        shared = Shared(cfg)
        say(f"converged: {cfg.val_users} validation + {cfg.users} test users x {cfg.facts_per_user} facts, "
            f"{cfg.mentions} mentions, backbone {cfg.backbone}")
        probe = Harness(shared, Path(tmp) / "probe", shared.test_users, approaches=())
        known = [(c, a) for c, a in KNOWN if probe.recalled("base", 0, c, a)] if cfg.backbone != "tiny" else []
        base_bpb = probe.bpb("base", 0)
        choices = reused if reused is not None else validate(shared, Path(tmp) / "val", base_bpb, say)
        save_choices(out / "validation.json", cfg, choices)
        pick = lambda a, k, d: choices[a]["chosen"][k] if a in choices else d     # noqa: E731
        ap = [a for a in cfg.approaches if a != "full_ft"]
        h = Harness(shared, Path(tmp) / "test", shared.test_users, approaches=tuple(ap),
                    lr=pick("tables", "lr", cfg.lr), steps=pick("tables", "steps", cfg.steps),
                    lora_lr=pick("lora", "lr", cfg.lora_lr))
        users = range(cfg.users)
        groups = [f.user for fs in h.users for f in fs]
        res: dict = {a: {} for a in cfg.approaches}
        learn_s, rag_s, lora_s, rolled, rows_written = [], [], [], 0, []
        for m in range(1, cfg.mentions + 1):
            for u in users:
                t = h.teach(u)
                if "tables" in t:
                    learn_s.append(t["tables"]["latency_s"])
                    rolled += t["tables"]["rolled_back"]
                    rows_written.append(t["tables"]["rows_written"])
                if "rag_s" in t:
                    rag_s.append(t["rag_s"])
                if "lora_s" in t:
                    lora_s.append(t["lora_s"])
            if m in (1, cfg.mentions):
                for a in ap:
                    st = proportion(h.hits(a), groups)
                    res[a][f"recall@{m}"], res[a][f"recall@{m}_stats"] = st["mean"], st
                say(f"  after mention {m}: " + ", ".join(f"{a} {res[a][f'recall@{m}']:.2f}" for a in ap))
        other = lambda u: (u + 1) % cfg.users                        # noqa: E731 -- B asks A's facts
        for a in ap:
            st = proportion(h.hits(a, other), groups)
            res[a]["leak_recall"], res[a]["leak_stats"] = st["mean"], st
            bpbs = [h.bpb(a, u) for u in users] if a != "base" else [base_bpb]
            res[a]["bpb"] = statistics.mean(bpbs)
            res[a]["bpb_change"] = res[a]["bpb"] / base_bpb - 1
            res[a]["known_acc"] = (statistics.mean(h.recalled(a, u, c, k) for u in users for c, k in known)
                                   if known else None)
            res[a]["users"] = cfg.users
        say("  leakage / forgetting measured")
        if "tables" in ap:
            res["tables"]["differential_max_abs"] = h.differential()
        kvb = _kv_bytes_per_token(h.model)
        for a in ap:
            per = []
            for u in users:
                b = 0
                if a == "in_context":
                    b = len(h.prefix(a, u, "")) * kvb
                if a in ("rag", "tables_rag"):
                    b += h.rag.nbytes(h.ns(u)) + len(h.prefix("rag", u, h.users[u][0].cue)) * kvb
                if a in ("tables", "tables_rag"):
                    b += int(h.memory.export(h.ns(u))["rows"]) * h.memory.rows.dim * 4
                if a == "lora":
                    b = h.lora.nbytes(f"u{u}")
                per.append(b)
            res[a]["bytes_per_user"] = statistics.mean(per)
        res.get("tables", {})["update_s"] = statistics.mean(learn_s) if learn_s else None
        res.get("tables_rag", {})["update_s"] = statistics.mean(learn_s) if learn_s else None
        res.get("rag", {})["update_s"] = statistics.mean(rag_s) if rag_s else None
        res.get("in_context", {})["update_s"] = 0.0
        res.get("lora", {})["update_s"] = statistics.mean(lora_s) if lora_s else None
        served = [a for a in ap if a != "lora"]                      # adapters do not run in the engine
        lat = served_latency(h, served) if served else {}
        for a in ap:
            res[a]["request_s"] = lat.get(a)
            res[a]["request_overhead"] = lat[a] / lat["base"] - 1 if "base" in lat and a in lat else None
        say("  latency measured")
        forget = verify_forget(h, 0)
        if "full_ft" in cfg.approaches:
            n = cfg.ft_users or cfg.users
            r = full_ft_pass(h, list(range(n)), cfg.mentions, known, pick("full_ft", "lr", cfg.ft_lr), h.steps,
                             Path(tmp) / "ft", say)
            g = [f.user for u in range(n) for f in h.users[u]]
            for m in sorted({1, cfg.mentions}):
                st = proportion(r[f"hits@{m}"], g)
                res["full_ft"][f"recall@{m}"], res["full_ft"][f"recall@{m}_stats"] = st["mean"], st
            gl = [f.user for u in range(n) for f in h.users[(u - 1) % n]] if n > 1 else []
            st = proportion(r["leak_hits"], gl) if r["leak_hits"] else {"mean": None}
            res["full_ft"] |= {"leak_recall": st["mean"], "leak_stats": st, "bpb": r["bpb"],
                               "bpb_change": r["bpb"] / base_bpb - 1, "known_acc": r["known_acc"] if known else None,
                               "bytes_per_user": r["bytes_per_user"], "update_s": r["update_s"], "request_s": None,
                               "request_overhead": None, "swap_s": r["swap_s"],
                               "differential_max_abs": r["differential_max_abs"], "users": n}
    rec = {"kind": "converged", "config": asdict(cfg), "results": res, "validation": choices,
           "validation_reused_from": cfg.validation_from or None,
           "rolled_back_updates": rolled,
           "rows_written_per_update": statistics.mean(rows_written) if rows_written else 0,
           "known_facts": len(known), "forget_user0": forget, "base_bpb": base_bpb,
           "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "wall_s": time.time() - t_start, "date": time.strftime("%Y-%m-%d")}
    (out / "record.json").write_text(json.dumps(rec, indent=1))
    (out / "results.md").write_text(table(rec))
    return rec


def verify_forget(h: Harness, u: int) -> dict:
    """Forget user u everywhere and check it: its logits equal a user's who never learned, its
    store directory and datastore entries are gone."""
    ns = h.ns(u)
    f = h.users[u][0]
    ids = [h.eot] + h.tok.encode(f.cue)
    fresh = h.logits(h.model, ids, "tenant:bench/user:never")
    before = h.logits(h.model, ids, ns)
    out = h.memory.forget(ns, lambda n: {"tables_dropped": sum(m.forget(n) for m in h.model.memory.memories)})
    entries = h.rag.forget(ns) if h.rag is not None else 0
    after = h.logits(h.model, ids, ns)
    return {"changed_before": not torch.equal(before, fresh), "equal_to_fresh_after": torch.equal(after, fresh),
            "store_exists": out["store_exists"], "tables_dropped": out["tables_dropped"],
            "datastore_entries_removed": entries,
            "datastore_entries_left": h.rag.store.count(ns) if h.rag is not None else 0}


def table(rec: dict) -> str:
    cfg, res = rec["config"], rec["results"]
    m = cfg["mentions"]
    head = (f"| approach | users | recall@1 | recall@{m} [95% CI] (se users) | leak (B asks A) | bpb change | "
            "known-fact acc | bytes/user | update s | request s | overhead |")
    lines = [head, "|" + "---|" * 11]

    def f(x, pct=False, digits=2):
        if x is None:
            return "n/a"
        return f"{100 * x:+.2f}%" if pct else f"{x:.{digits}f}"

    def rc(r):
        st = r.get(f"recall@{m}_stats")
        if not st:
            return f(r.get(f"recall@{m}"))
        lo, hi = st["ci95"]
        return f"{st['mean']:.2f} ({st['k']}/{st['n']}) [{lo:.2f}, {hi:.2f}] ({st.get('se_groups', math.nan):.2f})"
    for a, r in res.items():
        lines.append(f"| {a} | {r.get('users', 'n/a')} | {f(r.get('recall@1'))} | {rc(r)} | {f(r.get('leak_recall'))} | "
                     f"{f(r.get('bpb_change'), True)} | {f(r.get('known_acc'))} | {int(r.get('bytes_per_user') or 0)} | "
                     f"{f(r.get('update_s'), digits=3)} | {f(r.get('request_s'), digits=3)} | "
                     f"{f(r.get('request_overhead'), True)} |")
    extra = []
    for a, v in rec.get("validation", {}).items():
        c = v["chosen"]
        how = (f"chosen on {cfg['val_users']} validation users"
               + (f" (reused from {rec['validation_reused_from']})" if rec.get("validation_reused_from") else "")
               + " from "
               + ", ".join(f"{_hp(x)} (recall {x['recall']:.2f}, bpb {100 * x['bpb_change']:+.2f}%)" for x in v["candidates"])
               if v["selected_on_validation"] else "not chosen (a single candidate)")
        extra.append(f"{a}: {_hp(c)}, {how}")
    for a in ("tables", "full_ft"):
        if a in res:
            extra.append(f"differential test, {a} (max |logit diff| of a user from every other user's updates): "
                         f"{res[a].get('differential_max_abs')}")
    extra.append(f"forget user 0: {rec['forget_user0']}")
    extra.append(f"updates rolled back by the drift guard: {rec['rolled_back_updates']}; known facts kept: "
                 f"{rec['known_facts']} of {len(KNOWN)}; base bpb {rec['base_bpb']:.4f}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {e}" for e in extra) + "\n"


def _hp(c: dict) -> str:
    return f"lr {c['lr']:g}" + (f" x {c['steps']} updates" if "steps" in c else "")


__all__ = ["ConvergedConfig", "run_converged", "table", "Fact"]
