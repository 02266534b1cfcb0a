"""Corpora read from the real, fetched assets (run `memstack data fetch` first)."""
from __future__ import annotations

import json

import pytest

from memstack.data import assets, corpora
from memstack.data.corpora import AUSTEN_NOVELS, Document
from memstack.errors import AssetError, ConfigError


def test_sotu_counts_and_ids():
    docs = corpora.sotu("all")
    assert len(docs) == 233
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == 233
    assert ids[0] == "1790_george_washington_n" and ids[-1] == "2021_joseph_r_biden_d"
    first = docs[0]
    assert first.year == 1790 and first.meta["speaker"] == "George Washington"
    assert first.meta["party"] == "none" and first.title == "State of the Union 1790: George Washington"
    assert first.text.startswith("Fellow-Citizens of the Senate and House of Representatives:")
    assert docs[-1].meta["speaker"] == "Joseph R Biden" and docs[-1].meta["party"] == "Democratic"
    assert all("\r" not in d.text and not d.text.startswith("\ufeff") for d in docs)
    assert 10_700_000 < sum(len(d.text) for d in docs) < 10_800_000


def test_sotu_splits_by_year():
    all_ids = {d.id for d in corpora.sotu("all")}
    splits = {s: corpora.sotu(s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 187, "val": 23, "test": 23}
    ids = {s: {d.id for d in docs} for s, docs in splits.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == all_ids
    for split, docs in splits.items():
        for d in docs:
            assert d.year == int(d.id[:4]) and corpora.sotu_split_of(d.year) == split
            assert {8: "val", 9: "test"}.get(d.year % 10, "train") == split == d.meta["split"]
    assert [d.id for d in splits["val"]][:2] == ["1798_john_adams_f", "1808_thomas_jefferson_dr"]
    assert splits["test"][-1].id == "2019_donald_j_trump_r"
    # both speeches of 1953 (Truman, Eisenhower) fall in one split
    assert sum(d.year == 1953 for d in splits["train"]) == 2


def test_sotu_rejects_unknown_split():
    with pytest.raises(ConfigError, match="'dev'"):
        corpora.sotu("dev")


def test_moby_dick():
    doc = corpora.moby_dick()
    assert doc.id == "moby_dick" and doc.title == "Moby Dick" and doc.year == 1851
    assert doc.text.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago")
    assert 1_150_000 < len(doc.text) < 1_250_000


def test_austen_novels():
    docs = corpora.austen()
    assert [d.id for d in docs] == sorted(AUSTEN_NOVELS)
    assert [d.title for d in docs] == ["Emma", "Mansfield Park", "Northanger Abbey", "Persuasion",
                                       "Pride and Prejudice", "Sense and Sensibility"]
    by_id = {d.id: d for d in docs}
    assert len(by_id["emma"].text) > 800_000
    assert all(len(d.text) > 400_000 for d in docs)
    assert by_id["emma"].text.startswith("EMMA\n\nBy Jane Austen\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in by_id["emma"].text[:300]
    assert "It is a truth universally acknowledged, that a single man" in by_id["prideprejudice"].text
    assert by_id["persuasion"].text.startswith("Persuasion\n")
    assert all(d.meta["author"] == "Jane Austen" for d in docs)


def test_long_documents():
    docs = corpora.long_documents()
    assert [d.id for d in docs] == ["moby_dick", *sorted(AUSTEN_NOVELS)]
    assert all(isinstance(d, Document) and d.year for d in docs)


def test_austen_cache_written_and_bad_cache_rebuilt(tmp_data, link_asset):
    link_asset("janeaustenr")
    sha = assets.ASSETS["janeaustenr"].sha256
    cache = assets.cache_dir() / f"austen-{sha[:16]}.json"
    cache.parent.mkdir(parents=True)
    cache.write_text('{"format": 1, "novels": {"emma": "trunc')   # torn / garbage cache
    texts = {d.id: d.text for d in corpora.austen()}
    assert len(texts["emma"]) > 800_000
    blob = json.loads(cache.read_text(encoding="utf-8"))             # rebuilt atomically
    assert blob["source_sha256"] == sha and blob["novels"] == texts
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]


def test_corpora_need_assets(tmp_data):
    with pytest.raises(AssetError, match="memstack data fetch"):
        corpora.sotu("train")
    with pytest.raises(AssetError, match="missing"):
        corpora.austen()
