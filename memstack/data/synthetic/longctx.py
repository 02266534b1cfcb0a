"""Long-context tasks in real text: BABILong-style and RULER-style needles, streamed.

These are *-style* tasks built here, not the published benchmarks (bAbI, PG-19 and RULER's
essays are not available offline): the same constructions, our own generators.

* ``babilong_qa1`` -- bAbI qa1 ("single supporting fact", Weston et al. 2015) in BABILong's
  construction (Kuratov et al., arXiv 2406.10149): actors move between locations, ``n_facts``
  sentences "<actor> <verb> to the <location>." are scattered, in order, at uniform random
  positions of a long real-text haystack; the question at the end asks where one actor is, the
  answer being the location of its latest move.
* ``niah_multikey`` -- RULER's multi-key needle (Hsieh et al., arXiv 2404.06654): ``n_facts``
  needles "The special magic number for <key> is <value>." with distinct keys; the question
  asks one key.
* ``niah_multivalue`` -- one key, ``n_facts`` needles with different values; the answer lists
  every value in order of appearance.
* ``vt`` -- variable tracking: "VAR <a> = <value>." then a chain "VAR <b> = VAR <a>." ... of
  ``n_facts`` - 1 hops; the question asks the last variable's value.

An example of ``length`` tokens is filler from a tokenized book, read cyclically from a random
offset, with the facts' token pieces inserted and the question + answer at the end. It is
described by a handful of spans and produced **segment by segment** (`LongBatch.segment`), so a
million-token example costs memory for one segment, not for the example.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memstack.data.tokenizer_base import Tokenizer
from memstack.errors import ConfigError

from ._common import IGNORE_INDEX, Seed, make_rng

VARIANTS = ("babilong_qa1", "niah_multikey", "niah_multivalue", "vt")
ACTORS = ("Mary", "John", "Daniel", "Sandra")
LOCATIONS = ("kitchen", "garden", "office", "bathroom", "bedroom", "hallway")
VERBS = ("went", "moved", "journeyed", "travelled", "went back")
KEYS = ("apple", "river", "candle", "mirror", "violin", "anchor", "forest", "lantern", "pepper", "saddle",
        "thimble", "harbor", "marble", "falcon", "cobalt", "meadow")
VAR_NAMES = tuple(f"{a}{b}" for a in "QWXZ" for b in "JKVY")


def question_answer(variant: str, rng: np.random.Generator, n_facts: int) -> tuple[list[str], str, str, int]:
    """(fact sentences in order, question, answer text, number of answer choices) for one example."""
    if variant == "babilong_qa1":
        actors = [ACTORS[i] for i in rng.integers(0, len(ACTORS), n_facts)]
        locs = [LOCATIONS[i] for i in rng.integers(0, len(LOCATIONS), n_facts)]
        verbs = [VERBS[i] for i in rng.integers(0, len(VERBS), n_facts)]
        facts = [f" {a} {v} to the {loc}." for a, v, loc in zip(actors, verbs, locs)]
        who = actors[int(rng.integers(0, n_facts))]
        where = next(loc for a, loc in zip(reversed(actors), reversed(locs)) if a == who)
        return facts, f" Where is {who}? Answer:", f" {where}", len(LOCATIONS)
    if variant == "niah_multikey":
        keys = [KEYS[i] for i in rng.permutation(len(KEYS))[:n_facts]]
        vals = rng.integers(100, 1000, n_facts)
        facts = [f" The special magic number for {k} is {v}." for k, v in zip(keys, vals)]
        j = int(rng.integers(0, n_facts))
        return facts, f" What is the special magic number for {keys[j]}? Answer:", f" {vals[j]}", 900
    if variant == "niah_multivalue":
        key = KEYS[int(rng.integers(0, len(KEYS)))]
        vals = rng.integers(100, 1000, n_facts)
        facts = [f" The special magic number for {key} is {v}." for v in vals]
        return facts, f" What are all the special magic numbers for {key}? Answer:", "".join(f" {v}" for v in vals), \
            900 ** n_facts
    if variant == "vt":
        names = [VAR_NAMES[i] for i in rng.permutation(len(VAR_NAMES))[:n_facts]]
        value = int(rng.integers(100, 1000))
        facts = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return facts, f" VAR {names[-1]} has the value", f" {value}", 900
    raise ConfigError([f"unknown long-context variant {variant!r}; valid: {', '.join(VARIANTS)}"], "long-context task")


@dataclass
class LongBatch:
    """`rows` examples of `length` tokens each, as spans; `segment(i, S)` gives segment i."""

    length: int
    filler: np.ndarray                 # the tokenized book, read cyclically
    offsets: np.ndarray                # (rows,) filler start per row
    pieces: list[list[tuple[int, np.ndarray]]]   # per row: (start position, tokens) of inserted pieces, sorted
    answer_len: np.ndarray             # (rows,) answer tokens at the very end
    choices: int                       # answer choices (chance = 1 / choices for an exact answer)

    @property
    def rows(self) -> int:
        return len(self.pieces)

    def segment(self, i: int, seg_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of shape (rows, seg_len) for positions [i*S, (i+1)*S); past `length`
        inputs are 0 and labels IGNORE. Labels are the next tokens of the answer."""
        a = i * seg_len
        pos = a + np.arange(seg_len + 1)                     # one more: the label of the last input
        x = np.empty((self.rows, seg_len + 1), dtype=np.int64)
        for r in range(self.rows):
            inserted_before = np.zeros(seg_len + 1, dtype=np.int64)   # piece tokens before each position
            override = np.full(seg_len + 1, -1, dtype=np.int64)
            for start, toks in self.pieces[r]:
                inserted_before += np.clip(pos - start, 0, len(toks))
                inside = (pos >= start) & (pos < start + len(toks))
                if inside.any():
                    override[inside] = toks[pos[inside] - start]
            fill = self.filler[(self.offsets[r] + pos - inserted_before) % len(self.filler)]
            x[r] = np.where(override >= 0, override, fill)
        valid = pos < self.length
        x[:, ~valid] = 0
        y = np.full((self.rows, seg_len), IGNORE_INDEX, dtype=np.int64)
        for r in range(self.rows):
            lab = (pos[1:] >= self.length - self.answer_len[r]) & (pos[1:] < self.length)
            y[r, lab] = x[r, 1:][lab]
        return x[:, :seg_len], y

    def materialize(self, seg_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole examples (rows, length) -- for short lengths (training, tests)."""
        n = -(-self.length // seg_len)
        xs, ys = zip(*(self.segment(i, seg_len) for i in range(n)))
        return np.concatenate(xs, 1)[:, :self.length], np.concatenate(ys, 1)[:, :self.length]


def long_batch(tokenizer: Tokenizer, filler: np.ndarray, variant: str, rows: int, length: int, seed: Seed,
               n_facts: int = 2, depth: float | None = None) -> LongBatch:
    """`rows` examples of exactly `length` tokens. Facts at uniform random positions of the
    haystack (sorted, in order: BABILong's scattering), or all together at relative `depth`."""
    rng = make_rng(seed)
    filler = np.asarray(filler, dtype=np.int64)
    if filler.ndim != 1 or filler.size == 0:
        raise ConfigError(["filler must be a non-empty 1-D token array"], "long-context task")
    enc = lambda t: np.asarray(tokenizer.encode(t), dtype=np.int64)  # noqa: E731
    pieces, alen, offsets, choices, errs = [], [], rng.integers(0, filler.size, rows), 1, []
    for r in range(rows):
        facts, q, ans, choices = question_answer(variant, rng, n_facts)
        fact_toks = [enc(f) for f in facts]
        tail = np.concatenate([enc(q), enc(ans)])
        budget = length - tail.size - sum(f.size for f in fact_toks)
        if budget < 0:
            errs.append(f"length {length} cannot hold {n_facts} facts and the question ({length - budget} tokens)")
            break
        if depth is None:
            at = np.sort(rng.integers(0, budget + 1, len(fact_toks)))          # haystack offsets
        else:
            at = np.full(len(fact_toks), int(round(depth * budget)))
        spans, shift = [], 0
        for a, f in zip(at, fact_toks):
            spans.append((int(a) + shift, f))
            shift += f.size
        spans.append((length - tail.size, tail))
        pieces.append(spans)
        alen.append(enc(ans).size)
    if errs:
        raise ConfigError(errs, "long-context task")
    return LongBatch(length, filler, offsets, pieces, np.asarray(alen), choices)
