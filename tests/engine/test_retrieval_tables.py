"""Retrieval memories read one shared datastore with each request's namespace; sparse tables are
read in the engine's step with their offloaded rows prefetched, as in training."""
from __future__ import annotations

import torch
from served import BACKBONE, V, make

from memstack.backbone.model import build_model
from memstack.config import ModelConfig
from memstack.engine import Engine, EngineConfig
from memstack.generate import SamplingConfig, generate
from memstack.memory.retrieval.config import KNNLMConfig, StoreConfig
from memstack.memory.retrieval.store import Datastore


def lib(model, p, n):
    return [int(t) for t in generate(model, p, SamplingConfig(max_new_tokens=n))]


def test_knn_lm_reads_each_requests_namespace_from_one_store(tmp_path):
    D = BACKBONE.d_model
    store = Datastore(StoreConfig(dim=D), "test-keys", payload={"token": ("int64", ())})
    g = torch.Generator().manual_seed(0)
    for ns, tok in (("tenant-a", 5), ("tenant-b", 7)):      # each tenant's store says "next is <tok>"
        store.add(torch.randn(64, D, generator=g) * 3, {"token": torch.full((64,), tok)}, namespace=ns)
    store.save(tmp_path / "store")

    def model(ns):
        torch.manual_seed(0)
        cfg = KNNLMConfig(store=str(tmp_path / "store"), namespace=ns, k=8, lmbda=0.9, temperature=50.0, cache_len=0)
        return build_model(ModelConfig(BACKBONE, (cfg,))).eval()

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 14, 5, 20)]
    names = ["tenant-a", "tenant-b", "tenant-b", "tenant-a"]
    want = [lib(model(ns), p, 10) for p, ns in zip(prompts, names)]
    eng = Engine(model("default"), EngineConfig(block_size=4, num_blocks=64))   # one model, one store
    ids = [eng.add_request(p, SamplingConfig(max_new_tokens=10), namespace=ns) for p, ns in zip(prompts, names)]
    while eng.has_unfinished():
        eng.step()
    got = [eng.requests[i].output for i in ids]
    assert got == want
    assert got[0].count(5) > got[0].count(7) and got[1].count(7) > got[1].count(5)   # the namespaces matter


def test_engram_with_offloaded_table_is_prefetched_in_the_step(tmp_path):
    from memstack.memory.sparse import offload
    from memstack.memory.sparse.offload import place_tables

    model = make("engram")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 18, 3)]
    want = [lib(model, p, 9) for p in prompts]
    place_tables(model, "disk", tmp_path)
    assert model.memory.memories[0].table.residency == "disk"
    calls = []
    real = offload.maybe_prefetch

    def spy(table, rows):
        fut = real(table, rows)
        calls.append(fut is not None)
        return fut

    offload.maybe_prefetch = spy
    try:
        eng = Engine(model, EngineConfig(block_size=4, num_blocks=64))
        got = eng.generate(prompts, SamplingConfig(max_new_tokens=9))
    finally:
        offload.maybe_prefetch = real
    assert got == want
    assert calls and all(calls)                      # every step's rows were fetched in the background
