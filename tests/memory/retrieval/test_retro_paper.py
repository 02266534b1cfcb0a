"""RETRO as the paper has it (issue 15): chunk keys from the frozen pretrained MiniLM, a neighbour
encoder that cross-attends to the retrieving chunk's activations (checked against a plain
reference), the encoder on the backbone's own embedding, and the random-neighbour ablation.
Tiny random backbones only; the shipped MiniLM and the bpe512 tokenizer, never SmolLM2."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.tokenizers import get_tokenizer
from memstack.generate import decoding_model
from memstack.memory.base import Step
from memstack.memory.retrieval.config import RetroConfig
from memstack.memory.retrieval.retro import NeighbourEncoder, build_retro_store
from memstack.memory.retrieval.retro_keys import MINILM_DIM, MiniLMKeys
from memstack.memory.retrieval.store import Datastore, DatastoreError
from tolerances import assert_close

M = 8
BB = BackboneConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, seg_len=16)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("bpe512")


@pytest.fixture(scope="module")
def docs(tok):
    texts = ["The cat sat on the mat and looked out of the window at the birds in the garden all day long.",
             "Congress shall make no law respecting an establishment of religion, or prohibiting the free exercise.",
             "The economy grew strongly last year as unemployment fell and wages rose across the nation.",
             "Photosynthesis converts light energy into chemical energy stored in glucose inside plant cells."]
    return [np.asarray(tok.encode(t)) for t in texts]


def test_minilm_keys_are_the_embedder_over_the_chunk_text(tok):
    from memstack.memory.retrieval.embedder import Embedder

    keys = MiniLMKeys("bpe512", M)
    chunks = torch.tensor([tok.encode("The cat sat on the mat and looked at")[:M],
                           tok.encode("Congress shall make no law respecting")[:M]])
    got = keys(chunks[None])                                                             # (1, 2, 384)
    assert got.shape == (1, 2, MINILM_DIM)
    want = Embedder().encode([tok.decode(c) for c in chunks.tolist()])
    assert_close(got[0], want, torch.float32)
    assert_close(got.norm(dim=-1), torch.ones(1, 2), torch.float32)
    assert keys.fingerprint.startswith("retro-minilm:") and ":tok=bpe512:m8" in keys.fingerprint


def test_minilm_store_finds_the_chunk_with_the_same_meaning(tok, docs, tmp_path):
    m = 16
    cfg = RetroConfig(chunk=m, k=1, key="minilm", tokenizer="bpe512")
    store = build_retro_store(docs, 512, cfg, eot_id=tok.eot_id, out=tmp_path / "s", progress=False, batch_chunks=3)
    keys = MiniLMKeys("bpe512", m)
    assert store.cfg.dim == MINILM_DIM and store.fingerprint == keys.fingerprint
    per_doc = [(len(d) + 1) // m - 1 for d in docs]
    assert len(store) == sum(per_doc) == 6
    doc_of = torch.tensor([i for i, n in enumerate(per_doc) for _ in range(n)])
    vals = store.payload("tokens")
    # every stored chunk, keyed again, retrieves itself (its value's first half)
    res = store.search(keys(vals[:, :m]), 1)
    assert torch.equal(vals[res.rows[:, 0], :m], vals[:, :m])
    # paraphrases sharing almost no tokens with the text land on the document with that meaning
    for q, want in (("a kitten resting on a rug", 0), ("freedom of worship", 1), ("jobs and pay went up", 2),
                    ("plants make sugar from sunlight", 3)):
        hit = store.search(keys(torch.tensor(tok.encode(q))[None]), 1).rows[0, 0]
        assert doc_of[hit] == want, q
    # a model with bag-of-token keys refuses this store
    with pytest.raises(DatastoreError):
        build_model(ModelConfig(BB, (RetroConfig(chunk=m, store=str(tmp_path / "s")),)))


def _ref_encoder(enc: NeighbourEncoder, nb, hq, embed=None):
    """The encoder written out plainly: per neighbour, per head, softmax(q k^T / sqrt(d)) v."""
    def rms(norm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def attend(q, k, v, H):
        out = []
        for h in range(H):
            sl = slice(h * q.shape[-1] // H, (h + 1) * q.shape[-1] // H)
            w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(q.shape[-1] // H), -1)
            out.append(w @ v[:, sl])
        return torch.cat(out, -1)

    outs = []
    for n in range(nb.shape[0]):
        x = (enc.emb(nb[n]) if enc.emb is not None else embed(nb[n])) + enc.pos[:nb.shape[1]]
        for L in enc.layers:
            q, k, v = L["qkv"](rms(L["n1"], x)).chunk(3, -1)
            x = x + L["o"](attend(q, k, v, enc.n_heads))
            if enc.query:
                kv = L["xkv"](rms(L["nh"], hq[n]))
                x = x + L["xo"](attend(L["xq"](rms(L["nx"], x)), kv[:, :x.shape[-1]], kv[:, x.shape[-1]:], enc.n_heads))
            x = x + L["mlp"](rms(L["n2"], x))
        outs.append(rms(enc.norm, x))
    return torch.stack(outs)


@pytest.mark.parametrize("enc_query", [True, False])
def test_encoder_matches_the_plain_reference_and_reads_the_query_chunk(enc_query):
    torch.manual_seed(0)
    cfg = RetroConfig(chunk=M, enc_layers=2, enc_query=enc_query)
    enc = NeighbourEncoder(cfg, BB)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.3 * torch.randn_like(p))   # away from the init (zero positions, small weights)
    nb = torch.randint(0, 512, (5, 2 * M))
    hq = torch.randn(5, M, 32)
    got = enc(nb, hq)
    assert_close(got, _ref_encoder(enc, nb, hq), torch.float32)
    other = enc(nb, hq + torch.randn_like(hq))
    if enc_query:   # the neighbours' encoding depends on the chunk that retrieved them
        assert (other - got).abs().max() > 1e-3
    else:
        assert torch.equal(other, got)


def test_shared_embedding_encodes_with_the_backbones_table():
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB, (RetroConfig(chunk=M, share_embedding=True, key_dim=8),)))
    enc = model.memory.memories[0].encoder
    assert enc.emb is None and not any("encoder.emb" in n for n, _ in model.named_parameters())
    nb, hq = torch.randint(0, 512, (3, 2 * M)), torch.randn(3, M, 32)
    assert_close(enc(nb, hq, model.tok_emb), _ref_encoder(enc, nb, hq, model.tok_emb), torch.float32)


def test_one_token_at_a_time_equals_the_whole_segment_with_minilm_keys(tok, docs, tmp_path):
    """The open chunk's tokens and activations are carried in the state, so decoding token by
    token (chunks completing inside later calls) encodes the same neighbours as one call."""
    cfg = RetroConfig(chunk=M, k=2, key="minilm", tokenizer="bpe512", store=str(tmp_path / "s"), exclude_own_doc=False)
    build_retro_store(docs, 512, cfg, eot_id=tok.eot_id, out=tmp_path / "s", progress=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB, (cfg,))).eval()
    with torch.no_grad():
        for x in model.memory.memories[0].xattn.values():
            x["o"].weight.normal_(0, 0.5)
        x = torch.tensor(np.stack([docs[1][:16], docs[2][:16]]))
        whole, _ = model(x)
        dec = decoding_model(model)                       # adds the segment's KV cache
        st, steps = dec.init_state(2), []
        for t in range(16):
            o, st = dec(x[:, t:t + 1], st, Step(seg_start=t == 0, seg_end=t == 15))
            steps.append(o.logits)
        off = build_model(ModelConfig(BB, (RetroConfig(**{**cfg.__dict__, "retrieval": False}),))).eval()
        off.load_state_dict(model.state_dict())
        plain, _ = off(x)
    assert_close(torch.cat(steps, 1), whole.logits, torch.float32)
    # retrieval changed the tokens after the first chunk, and nothing before its last token
    assert torch.equal(whole.logits[:, :M - 1], plain.logits[:, :M - 1])
    assert (whole.logits[:, M - 1:] - plain.logits[:, M - 1:]).abs().max() > 1e-3


def test_random_neighbours_are_repeatable_and_not_the_nearest(tok, docs, tmp_path):
    build_retro_store(docs, 512, RetroConfig(chunk=M, key_dim=8), eot_id=tok.eot_id, out=tmp_path / "s", progress=False)
    st = Datastore.open(tmp_path / "s")
    got = {}
    for rnd in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(BB, (RetroConfig(chunk=M, k=2, key_dim=8, store=str(tmp_path / "s"),
                                                          exclude_own_doc=False, random_neighbours=rnd),)))
        mem = model.memory.memories[0]
        chunks = st.payload("tokens")[:6, :M]
        nb, ok = mem._retrieve(chunks, mem.keys(chunks), torch.full((6,), -1), {})
        assert ok.all()
        nb2, _ = mem._retrieve(chunks, mem.keys(chunks), torch.full((6,), -1), {})
        assert torch.equal(nb, nb2)
        got[rnd] = nb
    # nearest: each stored chunk finds itself first; random: rows hashed from the chunk
    assert torch.equal(got[False][:, 0], st.payload("tokens")[:6])
    assert not torch.equal(got[True][:, 0], got[False][:, 0])


def test_bad_configs_list_every_reason():
    from memstack.config import from_dict
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        from_dict(RetroConfig, {"random_neighbours": True, "chunk": 0, "k": 0})
    msg = str(e.value)
    assert "random_neighbours needs a corpus store" in msg and "chunk must be >= 1" in msg and "k must be >= 1" in msg
    with pytest.raises(ConfigError, match="key"):
        from_dict(RetroConfig, {"key": "bert"})


def test_retrofit_on_a_frozen_backbone_learns_to_read_its_neighbours(tmp_path):
    """RETRO-fitting in miniature: a frozen random backbone, only CCA + encoder trained, on random
    documents whose every chunk's continuation sits in the store (the leakage setting: nothing
    but retrieval can predict a random token). The trained model must beat the same weights
    with retrieval off and with random neighbours by a wide margin."""
    V, m, T = 48, 4, 32
    # init_std 0.25: a frozen head at 0.02 cannot make any distribution peaked (max logit ~1.3)
    bb = BackboneConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, seg_len=T, init_std=0.25)
    g = np.random.default_rng(0)
    docs = [g.integers(1, V, size=T - 1) for _ in range(48)]
    cfg = RetroConfig(chunk=m, k=1, key_dim=32, layers=(1,), exclude_own_doc=False, store=str(tmp_path / "s"),
                      share_embedding=True)
    build_retro_store(docs, V, cfg, eot_id=0, out=tmp_path / "s", progress=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(bb, (cfg,)))
    model.requires_grad_(False)
    mem = model.memory.memories[0]
    mem.requires_grad_(True)
    data = torch.tensor(np.stack([np.concatenate([[0], d]) for d in docs]))          # (48, T) as the store read them
    opt = torch.optim.Adam(mem.parameters(), lr=1e-2)
    for step in range(200):
        rows = data[torch.randint(0, len(docs), (8,))]
        out, _ = model(rows)
        loss = torch.nn.functional.cross_entropy(out.logits[:, m - 1:-1].reshape(-1, V), rows[:, m:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def eval_loss(c):
        m2 = build_model(ModelConfig(bb, (c,))).eval()
        m2.load_state_dict(model.state_dict())
        with torch.no_grad():
            o, _ = m2(data)
        # positions that read a neighbour: from the last token of the first chunk on
        return float(torch.nn.functional.cross_entropy(o.logits[:, m - 1:-1].reshape(-1, V), data[:, m:].reshape(-1)))

    on, off = eval_loss(cfg), eval_loss(RetroConfig(**{**cfg.__dict__, "retrieval": False}))
    rnd = eval_loss(RetroConfig(**{**cfg.__dict__, "random_neighbours": True}))
    assert off > math.log(V)                # the frozen random backbone cannot predict random tokens
    assert on < 1.5 < off - 2.0, (on, off)  # the retrofit reads the continuation from its neighbours
    assert rnd > on + 2.0, (on, rnd)        # ... from the right neighbours, not from any
