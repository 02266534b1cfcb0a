"""Fixtures for the data tests: an isolated, empty MEMSTACK_DATA, and links to the real assets."""
from __future__ import annotations

from pathlib import Path

import pytest

from memstack.data import assets, corpora, tokenizers


def _clear_memos() -> None:
    for fn in (corpora._sotu_all, corpora._moby_dick, corpora._austen_texts, tokenizers._build):
        fn.cache_clear()


@pytest.fixture
def real_raw() -> Path:
    """The raw dir of the user's data dir (where `memstack data fetch` put the assets)."""
    return assets.raw_dir()


@pytest.fixture
def tmp_data(tmp_path, monkeypatch, real_raw) -> Path:
    """A fresh, empty MEMSTACK_DATA for one test; memoised corpora/tokenizers are dropped."""
    root = tmp_path / "memstack-data"
    monkeypatch.setenv("MEMSTACK_DATA", str(root))
    _clear_memos()
    yield root
    _clear_memos()


@pytest.fixture
def link_asset(tmp_data, real_raw):
    """``link_asset(name)`` symlinks a real, fetched asset into the temporary raw dir."""

    def link(name: str) -> Path:
        src = real_raw / assets.ASSETS[name].filename
        dest = assets.raw_dir() / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src)
        return dest

    return link
