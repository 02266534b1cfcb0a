"""RETRO: no position ever sees retrieval results computed from its own future (document mode
and corpus store), the shifted chunk mapping, same-document exclusion, and RETRO[OFF] = the
same backbone without retrieval."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.retrieval.config import RetroConfig
from memstack.memory.retrieval.retro import build_retro_store, chunk_keys, doc_signature, key_table
from memstack.memory.retrieval.store import Datastore, DatastoreError
from tolerances import assert_close

M = 4
BB = BackboneConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, seg_len=8)


def _model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(BB, (RetroConfig(chunk=M, k=2, key_dim=16, db_len=8, **kw),))).eval()


def _run(model, tokens):
    st, outs = None, []
    for s in range(tokens.shape[1] // 8):
        o, st = model(tokens[:, 8 * s:8 * s + 8], st)
        outs.append(o.logits)
    return torch.cat(outs, 1)


def _docs(n=6, length=40, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(1, 40, size=length) for _ in range(n)]


@pytest.mark.parametrize("mode", ["document", "store", "store-rope"])
def test_no_position_sees_retrieval_from_its_future(mode, tmp_path):
    kw = {"cca_rope": True} if mode == "store-rope" else {}
    if mode.startswith("store"):
        build_retro_store(_docs(), 40, RetroConfig(chunk=M, k=2, key_dim=16), eot_id=0, out=tmp_path / "s", progress=False)
        kw["store"] = str(tmp_path / "s")
    model = _model(**kw)
    tokens = torch.randint(1, 40, (1, 32))
    variants = tokens.repeat(33, 1)                               # row j+1: token j changed; row 0: original
    for j in range(32):
        variants[j + 1, j] = (tokens[0, j] % 39) + 1
    with torch.no_grad():
        out = _run(model, variants)
    base = out[:1]
    changed_after = 0
    for j in range(32):
        other = out[j + 1:j + 2]
        assert torch.equal(other[:, :j], base[:, :j]), f"{mode}: changing token {j} changed an earlier position"
        changed_after += int(not torch.equal(other[:, j + 1:], base[:, j + 1:]))
    assert changed_after >= 28


def test_tokens_read_the_neighbours_of_the_last_completed_chunk():
    """Positions 0..m-2 have no completed chunk: exactly RETRO[OFF]. Position m-1 (the last
    token of chunk 0) is the first to read neighbours."""
    on, off = _model(), _model(retrieval=False)
    tokens = torch.randint(1, 40, (1, 24))
    with torch.no_grad():
        a, b = _run(on, tokens), _run(off, tokens)
    assert torch.equal(a[:, :M - 1], b[:, :M - 1])
    # document mode: the first entry ([chunk 0, chunk 1]) exists once chunk 1 is complete
    assert torch.equal(a[:, :2 * M - 1], b[:, :2 * M - 1])
    assert not torch.equal(a[:, 2 * M - 1], b[:, 2 * M - 1])


def test_retrieval_off_is_the_backbone_with_the_same_parameters():
    off = _model(retrieval=False)
    plain = build_model(ModelConfig(BB)).eval()
    plain.load_state_dict(off.state_dict(), strict=False)
    tokens = torch.randint(1, 40, (2, 16))
    with torch.no_grad():
        assert_close(_run(off, tokens), torch.cat([plain(tokens[:, :8])[0].logits, plain(tokens[:, 8:])[0].logits], 1))


def test_store_entries_and_same_document_exclusion(tmp_path):
    docs = _docs(4, 23)
    store = build_retro_store(docs, 40, RetroConfig(chunk=M, k=2, key_dim=16), eot_id=0, out=tmp_path / "s", progress=False)
    assert len(store) == 4 * (24 // M - 1)                       # chunks with a full continuation
    seq = torch.as_tensor(np.concatenate([[0], docs[1]]))
    first = store.doc == int(doc_signature(seq[None, :M]))
    assert int(first.sum()) == 24 // M - 1
    assert torch.equal(store.payload("tokens")[first][2], seq[2 * M:4 * M])   # chunk 2 + its continuation
    # reading document 1 itself: its own chunks would be the nearest neighbours; they are excluded
    table = key_table(40, 16, 1234)
    q = chunk_keys(seq[None, M:2 * M], table)
    sig = doc_signature(seq[None, :M])
    assert int(store.search(q, 1).rows[0, 0]) in first.nonzero().flatten().tolist()
    res = store.search(q, 5, exclude_doc=sig)
    assert not bool(first[res.rows[res.rows >= 0]].any())


def test_store_from_other_key_settings_is_refused(tmp_path):
    build_retro_store(_docs(2), 40, RetroConfig(chunk=M, key_dim=16), eot_id=0, out=tmp_path / "s", progress=False)
    with pytest.raises(DatastoreError, match="another model or embedder"):
        _model(store=str(tmp_path / "s"), key_seed=7)
    Datastore.open(tmp_path / "s")


def test_bad_retro_configs_list_every_reason():
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        RetroConfig(chunk=0, k=0, enc_layers=0)
    assert len(e.value.reasons) == 3
    with pytest.raises(ConfigError, match="multiple of chunk"):
        build_model(ModelConfig(BB, (RetroConfig(chunk=3),)))
