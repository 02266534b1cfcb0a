"""kNN-LM: the interpolation against hand-computed values, the datastore built by a pass of the
model, memorisation through the store, the document cache, and refusal of a foreign store."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.base import Step, StepContext
from memstack.memory.retrieval.config import KNNLMConfig, StoreConfig
from memstack.memory.retrieval.knn_lm import KNNLM, attach_knnlm, build_knnlm_store
from memstack.memory.retrieval.store import Datastore, DatastoreError, model_fingerprint
from tolerances import assert_close

BB = BackboneConfig(vocab_size=50, d_model=8, n_layers=2, n_heads=2, seg_len=16)


def test_interpolation_matches_hand_computation(tmp_path):
    store = Datastore(StoreConfig(dim=8), "x", payload={"token": ("int64", ())})
    keys = torch.zeros(3, 8)
    keys[0, 0], keys[1, 0], keys[2, 1] = 1.0, 2.0, 3.0
    store.add(keys, {"token": torch.tensor([7, 7, 9])})
    store.save(tmp_path / "s")
    lam, temp = 0.3, 2.0
    mem = KNNLM(KNNLMConfig(store=str(tmp_path / "s"), k=2, lmbda=lam, temperature=temp, cache_len=0), BB)
    h = torch.zeros(1, 1, 8)
    h[0, 0, 0] = 1.5                                   # squared distances: 0.25, 0.25, 11.25
    logits = torch.randn(1, 1, 50)
    ctx = StepContext(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool),
                      True, True, False)
    out, _ = mem.logits(logits, h, mem.init_state(1, torch.device("cpu"), torch.float32), ctx)
    p_lm = torch.softmax(logits[0, 0].double(), -1)
    expect = (1 - lam) * p_lm
    expect[7] += lam * 1.0                             # both kept neighbours say 7 (k = 2)
    assert_close(torch.softmax(out[0, 0].double(), -1), expect, dtype=torch.float32)
    mem3 = KNNLM(KNNLMConfig(store=str(tmp_path / "s"), k=3, lmbda=lam, temperature=temp, cache_len=0), BB)
    out3, _ = mem3.logits(logits, h, mem3.init_state(1, torch.device("cpu"), torch.float32), ctx)
    w = torch.softmax(torch.tensor([-0.25, -0.25, -11.25], dtype=torch.float64) / temp, 0)
    expect = (1 - lam) * p_lm
    expect[7] += lam * (w[0] + w[1])
    expect[9] += lam * w[2]
    assert_close(torch.softmax(out3[0, 0].double(), -1), expect, dtype=torch.float32)


def _docs(n=3, length=70, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(1, 50, size=length) for _ in range(n)]


def test_build_stores_every_predicted_position_with_its_hidden_state():
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB)).eval()
    docs = _docs()
    store = build_knnlm_store(model, docs, None, rows=2, eot_id=0, progress=False)
    assert len(store) == sum(len(d) for d in docs)     # <eot> + doc: every doc token is a target once
    # the first document's entries: hidden states of a plain pass, next tokens = the document
    first = store.doc == 0
    assert torch.equal(store.payload("token")[first], torch.as_tensor(docs[0]))
    seq = torch.as_tensor(np.concatenate([[0], docs[0]]))[None]
    with torch.no_grad():
        hid = model(seq[:, :16])[0].hidden                # the plain backbone: a segment sees only itself
    assert_close(store.keys[first][:16], hid[0])
    assert store.fingerprint == model_fingerprint(model, "final_hidden")


def test_store_memorises_its_corpus(tmp_path):
    """With lambda = 1 and k = 1 the kNN-LM predicts the stored next token of the nearest stored
    context; on the corpus itself each position finds itself (distance 0), so the loss is ~0."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB)).eval()
    docs = _docs(2, 40, seed=1)
    build_knnlm_store(model, docs, tmp_path / "s", rows=2, eot_id=0, progress=False)
    knn = attach_knnlm(model, KNNLMConfig(store=str(tmp_path / "s"), k=1, lmbda=1.0, cache_len=0))
    seq = torch.as_tensor(np.concatenate([[0], docs[0]]))[None]
    with torch.no_grad():
        plain = cross_entropy(model(seq[:, :16])[0].logits, seq[:, 1:17])
        mem = cross_entropy(knn(seq[:, :16])[0].logits, seq[:, 1:17])
    assert plain > 3.0 and mem < 1e-3


def test_store_of_another_model_is_refused(tmp_path):
    torch.manual_seed(0)
    a = build_model(ModelConfig(BB)).eval()
    b = build_model(ModelConfig(BB)).eval()              # another init: other weights
    build_knnlm_store(a, _docs(1, 20), tmp_path / "s", rows=1, progress=False)
    attach_knnlm(a, KNNLMConfig(store=str(tmp_path / "s"), cache_len=0))
    with pytest.raises(DatastoreError, match="another model"):
        attach_knnlm(b, KNNLMConfig(store=str(tmp_path / "s"), cache_len=0))
    wide = BackboneConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seg_len=16)
    with pytest.raises(DatastoreError, match="16-d"):
        build_model(ModelConfig(wide, (KNNLMConfig(store=str(tmp_path / "s"), cache_len=0),)))


def test_document_cache_copies_a_repeated_passage():
    """Cache only: a random passage read twice; on the second reading every context was seen
    with its next token, so kNN-LM (lambda 0.9, sharp temperature) nearly copies it."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB)).eval()
    passage = torch.randint(1, 50, (1, 16))
    seq = torch.cat([passage, passage, passage[:, :1]], 1)
    knn = model.with_memories([KNNLMConfig(cache_len=64, k=1, lmbda=0.9, temperature=0.01)])
    with torch.no_grad():
        _, st = knn(seq[:, :16])
        out, _ = knn(seq[:, 16:32], st)
        plain = model(seq[:, 16:32])[0]
    # positions whose context vector matches the first reading get the stored next token
    second = cross_entropy(out.logits, seq[:, 17:33])
    assert second < 0.5 * cross_entropy(plain.logits, seq[:, 17:33])
    assert second < -math.log(0.9) + 0.2


def test_bad_knnlm_configs_list_every_reason():
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        KNNLMConfig(k=0, lmbda=2.0, temperature=0.0, cache_len=0)
    assert len(e.value.reasons) == 4
