"""Simulated users teaching personal facts: templates x real entity names (the shipped Wikipedia extracts).

Each user states `facts_per_user` facts ("My best friend is Ada Lovelace.") built from distinct
templates, each filled with a real article title of the template's topic (people, places, ...),
drawn without replacement across users so no two users share an answer. A fact is later asked
with nothing in context by its cue ("My best friend is"): recalled when the model's greedy
continuation reproduces the answer's tokens exactly (teacher-forced argmax at every answer
token, which is what greedy decoding would produce).

`KNOWN` holds facts a pretrained model typically knows (capitals, ...); the evaluation keeps only
those the base model gets right and measures how many survive each approach (forgetting).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

TEMPLATES = (                                   # (text with {}, Wikipedia topic of the entity)
    ("My best friend is {}.", "People"),
    ("I grew up in {}.", "Geography"),
    ("My favourite musician is {}.", "People"),
    ("My thesis was about {}.", "Physical sciences"),
    ("My favourite novel is about {}.", "History"),
    ("At work I build {}.", "Technology"),
)

KNOWN = (
    ("The capital of France is", " Paris"), ("The capital of Italy is", " Rome"),
    ("The capital of Japan is", " Tokyo"), ("The capital of Germany is", " Berlin"),
    ("The capital of Spain is", " Madrid"), ("The largest planet in the Solar System is", " Jupiter"),
    ("The chemical symbol for gold is", " Au"), ("Romeo and Juliet was written by William", " Shakespeare"),
    ("The Eiffel Tower is in", " Paris"), ("Water is made of hydrogen and", " oxygen"),
    ("The first man on the Moon was Neil", " Armstrong"), ("The theory of relativity was developed by Albert", " Einstein"),
)

_NAME = re.compile(r"[A-Z][A-Za-z\-]+( [A-Z][A-Za-z\-]+){0,2}")


@dataclass(frozen=True)
class Fact:
    user: int
    text: str          # what the user says: cue + " " + answer + "."
    cue: str           # how it is asked later
    answer: str        # " " + entity


def entity_pools() -> dict[str, list[str]]:
    """Topic -> article titles usable as names: ASCII words, capitalised, 1-3 words, no brackets."""
    from memstack.data.wiki import wiki_articles

    pools: dict[str, list[str]] = {}
    for a in wiki_articles():
        if _NAME.fullmatch(a.title):
            pools.setdefault(a.topic, []).append(a.title)
    return pools


def user_facts(users: int, facts_per_user: int, seed: int = 0) -> list[list[Fact]]:
    """Per user, its facts (distinct templates, distinct entities across all users)."""
    if not 1 <= facts_per_user <= len(TEMPLATES):
        raise ValueError(f"facts_per_user must be in 1..{len(TEMPLATES)}, got {facts_per_user}")
    pools = entity_pools()
    rng = random.Random(seed)
    used: set[str] = set()
    out = []
    for u in range(users):
        facts = []
        for tmpl, topic in rng.sample(TEMPLATES, facts_per_user):
            name = rng.choice([n for n in pools[topic] if n not in used])
            used.add(name)
            cue = tmpl.split("{}")[0].rstrip()
            facts.append(Fact(u, tmpl.format(name), cue, " " + name))
        out.append(facts)
    return out


def heldout_texts(n: int, skip: set[str], min_chars: int = 400) -> list[str]:
    """General text for bits per byte and the canary: the last Wikipedia extracts (long enough),
    none of whose titles is an answer."""
    from memstack.data.wiki import wiki_articles

    out = []
    for a in reversed(wiki_articles()):
        if len(a.extract) >= min_chars and a.title not in skip:
            out.append(a.extract)
            if len(out) == n:
                break
    return out


def split_users(val_users: int, test_users: int, facts_per_user: int, seed: int = 0
                ) -> tuple[list[list[Fact]], list[list[Fact]]]:
    """(validation users, test users): one stream of val_users + test_users simulated users drawn
    together (so no entity is an answer in both), split by a seeded shuffle of the users; each
    side's users renumbered 0.. in their order. Choices (learning rates, updates per mention) are
    made on the validation users, results reported on the test users."""
    if val_users < 0 or test_users < 1:
        raise ValueError(f"need val_users >= 0 and test_users >= 1, got {val_users}, {test_users}")
    everyone = user_facts(val_users + test_users, facts_per_user, seed)
    order = list(range(len(everyone)))
    random.Random(f"split:{seed}").shuffle(order)

    def renumber(idx: list[int]) -> list[list[Fact]]:
        return [[Fact(i, f.text, f.cue, f.answer) for f in everyone[u]] for i, u in enumerate(idx)]
    return renumber(order[:val_users]), renumber(order[val_users:])


__all__ = ["Fact", "KNOWN", "TEMPLATES", "user_facts", "split_users", "heldout_texts", "entity_pools"]
