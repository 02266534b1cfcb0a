"""Tokenizers: GPT-2 from the pinned asset, our own deterministic BPE, the name registry."""
from __future__ import annotations

import json

import numpy as np
import pytest

from memstack.data import corpora, tokenizers
from memstack.data.assets import cache_dir
from memstack.data.tokenizer_base import ByteTokenizer, Tokenizer
from memstack.data.tokenizers import BPETokenizer, get_tokenizer, reference_encode, train_bpe
from memstack.errors import AssetError, UnknownNameError

UNICODE_TEXT = ("Naïve café — 東京, Ελληνικά, emoji 🎉🚀!\ttabs  and  double  spaces\n\n"
                "It's 1790's <|endoftext|> text, we'll see.   \n  ")


def sample_text(n_chars: int = 20_000) -> str:
    """Real prose the BPE was *not* trained on: the start of a few SOTU validation speeches."""
    return "\n\n".join(d.text[: n_chars // 4] for d in corpora.sotu("val")[:4])


@pytest.fixture(scope="module")
def bpe512() -> BPETokenizer:
    return get_tokenizer("bpe512")


def test_registry_names():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    for bad in ["foo", "bpe", "bpe257", "bpe65537", "bpe-512", "gpt-2", "BPE512"]:
        with pytest.raises(UnknownNameError, match=r"valid tokenizer names: a local Hugging Face tokenizer directory \(path\), bpe<N>, byte, gpt2, smollm2"):
            get_tokenizer(bad)
    assert get_tokenizer("bpe512") is get_tokenizer("bpe512")          # built once


def test_gpt2_known_ids_and_round_trip():
    tok = get_tokenizer("gpt2")
    assert isinstance(tok, Tokenizer)
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") != [50256]                     # ordinary text only
    for text in (UNICODE_TEXT, sample_text()):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("a") + [tok.eot_id] + tok.encode("b")) == "ab"
    tb = tok.token_bytes()
    assert tb.shape == (50257,) and tb.dtype == np.int64 and tb[50256] == 0 and tb[15496] == 5
    ids = tok.encode(UNICODE_TEXT)
    assert tb[ids].sum() == len(UNICODE_TEXT.encode("utf-8"))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([50257])


def test_train_bpe_hand_computed_toy_example():
    # pre-tokens: "hug" x1, " hug" x2, " pug", " pun", " bun"
    merges = train_bpe(["hug hug hug pug pun bun"], 6)
    assert merges == [
        (b"u", b"g"),        # (u,g) = 4 is the most frequent pair
        (b"h", b"ug"),       # (h,ug) = 3
        (b" ", b"p"),        # three pairs tie at 2; (32,112) is the smallest id pair ...
        (b" ", b"hug"),      # ... then (32,257) before (117,110)
        (b"u", b"n"),
        (b" ", b"b"),        # all remaining pairs are at 1: smallest (32,98)
    ]
    tok = BPETokenizer("toy", merges)
    assert tok.vocab_size == 257 + 6 and tok.eot_id == 262
    assert tok.encode("hug pun") == [257, 258, 260] == reference_encode("hug pun", merges)
    assert train_bpe(["ab"], 10) == [(b"a", b"b")]                    # stops when pairs run out


def test_train_bpe_is_deterministic():
    texts = [d.text[:5000] for d in corpora.sotu("train")[:20]]
    first = train_bpe(texts, 300)
    assert len(first) == 300 and train_bpe(texts, 300) == first
    assert train_bpe(list(texts), 100) == first[:100]                 # prefix-stable


def test_bpe512_shape_and_pinned_training(bpe512):
    assert (bpe512.name, bpe512.vocab_size, bpe512.eot_id) == ("bpe512", 512, 511)
    assert bpe512.merges[:5] == [(b" ", b"t"), (b" t", b"h"), (b" ", b"a"), (b" th", b"e"), (b" ", b"o")]
    fp = tokenizers.corpus_fingerprint(tokenizers.training_corpus())
    blob = json.loads((cache_dir() / f"bpe512-{fp}.json").read_text())
    assert blob["format"] == 1 and blob["vocab_size"] == 512 and blob["corpus_fingerprint"] == fp
    assert [tuple(bytes.fromhex(h) for h in m) for m in blob["merges"]] == bpe512.merges
    tb = bpe512.token_bytes()
    assert tb[:256].tolist() == [1] * 256 and tb[511] == 0 and tb.sum() > 512
    assert bpe512.fingerprint() == BPETokenizer("bpe512", bpe512.merges).fingerprint()
    fps = {get_tokenizer(n).fingerprint() for n in ("byte", "gpt2", "bpe512")}
    assert len(fps) == 3


def test_tiktoken_matches_reference_encoder(bpe512):
    text = sample_text()
    assert bpe512.encode(text) == reference_encode(text, bpe512.merges)
    assert bpe512.encode(UNICODE_TEXT) == reference_encode(UNICODE_TEXT, bpe512.merges)
    # a larger vocabulary with multi-byte (non-ASCII) merges, trained on text with unicode in it
    train = [d.text[:20_000] for d in corpora.sotu("train")[:30]] + [UNICODE_TEXT * 50]
    merges = train_bpe(train, 1500)
    tok = BPETokenizer("bpe1757", merges)
    assert any(len(l + r) > 1 and max(l + r) > 127 for l, r in merges)
    for t in (text, UNICODE_TEXT):
        assert tok.encode(t) == reference_encode(t, merges)


def test_bpe_round_trip_and_token_bytes(bpe512):
    for text in (UNICODE_TEXT, sample_text(), "", " ", "\n\n\n", "a" * 1000):
        ids = bpe512.encode(text)
        assert bpe512.decode(ids) == text
        assert bpe512.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    assert bpe512.encode_many(["Hello world", UNICODE_TEXT]) == [
        bpe512.encode("Hello world"), bpe512.encode(UNICODE_TEXT)]
    assert tokenizers.encode_many(ByteTokenizer(), ["hé"]) == [[104, 195, 169]]
    ids = bpe512.encode(sample_text())
    assert 2.0 < len(sample_text().encode()) / len(ids) < 2.6     # ~2.27 bytes/token on SOTU


def test_bpe_cache_trained_when_missing_and_identical(tmp_data, link_asset, bpe512):
    link_asset("sotu")
    fresh = get_tokenizer("bpe512")                                  # trains, writes cache
    assert fresh is not bpe512 and fresh.merges == bpe512.merges
    assert fresh.fingerprint() == bpe512.fingerprint()
    [path] = cache_dir().glob("bpe512-*.json")
    assert json.loads(path.read_text())["vocab_size"] == 512


def test_bad_bpe_cache_is_an_error_not_overwritten(tmp_data, link_asset):
    link_asset("sotu")
    fp = tokenizers.corpus_fingerprint(tokenizers.training_corpus())
    path = cache_dir() / f"bpe300-{fp}.json"
    path.parent.mkdir(parents=True)
    cases = {
        "not json {": "cannot parse",
        json.dumps({"format": 1, "vocab_size": 300, "corpus_fingerprint": "0" * 16,
                    "merges": []}): "records format/vocab/corpus",
        json.dumps({"format": 1, "vocab_size": 300, "corpus_fingerprint": fp,
                    "merges": [["61", "62"]] * 43}): "invalid merge #1",
    }
    for content, reason in cases.items():
        path.write_text(content)
        tokenizers._build.cache_clear()
        with pytest.raises(AssetError, match=f"BPE cache .*bpe300.*unusable.*{reason}.*delete it"):
            get_tokenizer("bpe300")
        assert path.read_text() == content
