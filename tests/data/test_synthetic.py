"""Tests for memstack.data.synthetic: MQAR, passkey retrieval and segment-level AR."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memstack.data.synthetic import (
    IGNORE_INDEX, PASSKEY_NEEDLE, PASSKEY_PREFIX, PASSKEY_QUESTION, SEG_AR_PAD, SEG_AR_SEP,
    SyntheticBatch, mqar, passkey, passkey_grid, power_law_gap_probs, sample_without_replacement,
    segment_ar,
)
from memstack.data.synthetic._common import make_rng
from memstack.data.tokenizer_base import ByteTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()
ENGLISH = (
    "The harbour was quiet in the early morning, and the fishing boats rocked gently against "
    "the old stone wall. A woman in a grey coat walked along the pier, counting the gulls that "
    "sat on the posts. She had come back to the town after many years away, and everything "
    "looked smaller than she remembered: the bakery on the corner, the church with its crooked "
    "spire, the school where she had learned to read. The baker still opened at six. "
)
FILLER = np.array(TOK.encode(ENGLISH * 12), dtype=np.int64)


def _digest(b: SyntheticBatch) -> str:
    return hashlib.sha256(b.inputs.tobytes() + b.labels.tobytes()).hexdigest()


def _all_three(seed):
    return (mqar(64, 64, 8, 300, seed),
            passkey(TOK, FILLER, 8, 500, None, seed),
            segment_ar(32, 6, 6, 40, seed, rewrite=True))


# ----------------------------------------------------------------------------- determinism

def test_same_seed_identical_different_seed_differs():
    a, b, c = _all_three(3), _all_three(3), _all_three(4)
    for x, y, z in zip(a, b, c):
        assert x.inputs.dtype == np.int64 and x.labels.dtype == np.int64
        np.testing.assert_array_equal(x.inputs, y.inputs)
        np.testing.assert_array_equal(x.labels, y.labels)
        assert not np.array_equal(x.inputs, z.inputs)


def test_identical_across_processes():
    code = (
        "import hashlib, sys; import numpy as np;"
        "from memstack.data.synthetic import mqar, passkey, segment_ar;"
        "from memstack.data.tokenizer_base import ByteTokenizer;"
        "filler = np.array(ByteTokenizer().encode(sys.argv[1] * 12), dtype=np.int64);"
        "bs = (mqar(64, 64, 8, 300, 11), passkey(ByteTokenizer(), filler, 8, 500, None, 11),"
        " segment_ar(32, 6, 6, 40, 11, rewrite=True));"
        "print(' '.join(hashlib.sha256(b.inputs.tobytes() + b.labels.tobytes()).hexdigest() for b in bs))"
    )
    out = subprocess.run([sys.executable, "-c", code, ENGLISH], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT)
    assert out.stdout.split() == [_digest(b) for b in _all_three(11)]


def test_generators_leave_global_rng_alone():
    np.random.seed(123)
    before = np.random.random(3)
    np.random.seed(123)
    _all_three(0)
    np.testing.assert_array_equal(np.random.random(3), before)


def test_seed_validation():
    with pytest.raises(ValueError):
        make_rng(-1)
    with pytest.raises(ValueError):
        make_rng(True)


# ----------------------------------------------------------------------------- samplers

def test_uniform_sampler_distinct_and_uniform():
    rng = make_rng(0)
    for k, n in [(3, 10), (8, 10)]:  # Floyd path, then the exponential-race path
        s = sample_without_replacement(rng, 20_000, k, n)
        assert s.shape == (20_000, k) and s.min() >= 0 and s.max() < n
        assert all(len(set(r)) == k for r in s[:500])
        first = np.bincount(s[:, 0], minlength=n) / len(s)  # the first slot is uniform too
        assert np.abs(first - 1 / n).max() < 0.012
        assert np.abs(np.bincount(s.ravel(), minlength=n) / s.size - 1 / n).max() < 0.01


def test_weighted_sampler_matches_successive_draws():
    p = np.array([0.5, 0.3, 0.2])
    s = sample_without_replacement(make_rng(1), 40_000, 2, 3, p=p)
    first = np.bincount(s[:, 0], minlength=3) / len(s)
    np.testing.assert_allclose(first, p, atol=0.01)
    # P(second = 2) = P(0 first) * .2/.5 + P(1 first) * .2/.7
    assert abs(np.mean(s[:, 1] == 2) - (0.5 * 0.4 + 0.3 * 0.2 / 0.7)) < 0.01


# ----------------------------------------------------------------------------- MQAR

def test_mqar_shapes_vocab_halves_and_labels():
    n, L, k, V = 500, 128, 16, 512
    b = mqar(n, L, k, V, seed=0)
    assert b.inputs.shape == b.labels.shape == (n, L)
    ctx = b.inputs[:, : 2 * k]
    keys, vals = ctx[:, 0::2], ctx[:, 1::2]
    assert keys.min() >= 1 and keys.max() < V // 2
    assert vals.min() >= V // 2 and vals.max() < V
    assert all(len(set(r)) == k for r in keys) and all(len(set(r)) == k for r in vals)
    np.testing.assert_array_equal(keys, b.meta["keys"])
    assert ((b.labels != IGNORE_INDEX).sum(axis=1) == k).all()
    assert (b.labels[:, : 2 * k] == IGNORE_INDEX).all()
    for i in range(n):
        pos = np.flatnonzero(b.labels[i] != IGNORE_INDEX)
        assert ((pos - 2 * k) % 2 == 0).all()
        binding = dict(zip(keys[i].tolist(), vals[i].tolist()))
        queried = b.inputs[i, pos]
        assert sorted(queried.tolist()) == sorted(binding)  # every key asked exactly once
        assert [binding[q] for q in queried.tolist()] == b.labels[i, pos].tolist()


def test_mqar_filler_zero_or_random_with_same_structure():
    z = mqar(200, 64, 4, 256, seed=5, random_non_queries=False)
    r = mqar(200, 64, 4, 256, seed=5, random_non_queries=True)
    np.testing.assert_array_equal(z.labels, r.labels)
    structural = np.zeros_like(z.inputs, dtype=bool)
    structural[:, :8] = True
    np.put_along_axis(structural, z.meta["query_positions"], True, axis=1)
    np.testing.assert_array_equal(z.inputs[structural], r.inputs[structural])
    assert (z.inputs[~structural] == 0).all()
    fill = r.inputs[~structural]
    assert fill.min() >= 0 and fill.max() < 256 and len(np.unique(fill)) > 200


def test_mqar_constraints_list_every_violation():
    with pytest.raises(ValueError) as e:
        mqar(10, 63, 16, 50, seed=0)
    msg = str(e.value)
    assert "3 problem" in msg
    assert "even" in msg and "vocab_size must be > input_seq_len" in msg and "4*num_kv_pairs" in msg
    with pytest.raises(ValueError) as e:
        mqar(10, 64, 17, 100, seed=0)
    assert "(1 problem" in str(e.value) and "4*num_kv_pairs must be <= input_seq_len (got 68 > 64)" in str(e.value)
    with pytest.raises(ValueError, match="power_a"):
        mqar(10, 64, 4, 100, seed=0, power_a=0.0)
    assert mqar(10, 64, 16, 65, seed=0).inputs.shape == (10, 64)  # boundary: 4*16 == 64, V = L+1


def test_mqar_power_law_favours_short_gaps():
    n, L, k, V = 2000, 256, 8, 1024
    space = (L - 2 * k) // 2
    short = mqar(n, L, k, V, seed=1, power_a=0.01).meta["gaps"]
    flat = mqar(n, L, k, V, seed=1, power_a=1.0).meta["gaps"]
    assert abs(flat.mean() - (space - 1) / 2) < 2.0       # power_a = 1 is uniform
    assert short.mean() < 0.5 * flat.mean()
    assert np.median(short) < 0.25 * np.median(flat)
    assert np.mean(short < 10) > 3 * np.mean(flat < 10)
    # same law as Zoology's numpy.random.choice(space, k, replace=False, p=p), slot by slot
    rs = np.random.RandomState(0)
    p = power_law_gap_probs(space, 0.01)
    ref = np.array([rs.choice(space, k, replace=False, p=p) for _ in range(n)])
    np.testing.assert_allclose(short.mean(axis=0), ref.mean(axis=0), atol=4.0)
    # with a single pair the gap is one draw from Zoology's power law
    one = mqar(20_000, 64, 1, 128, seed=2).meta["gaps"][:, 0]
    emp = np.bincount(one, minlength=31) / len(one)
    assert 0.5 * np.abs(emp - power_law_gap_probs(31, 0.01)).sum() < 0.04


# ----------------------------------------------------------------------------- passkey

def _answer_text(b, i):
    a0 = b.meta["answer_start"][i]
    return TOK.decode(b.inputs[i, a0:].tolist())


def test_passkey_layout_needle_and_answer():
    length = 600
    b = passkey(TOK, FILLER, 20, length, 0.5, seed=7)
    assert b.inputs.shape == b.labels.shape == (20, length)
    for i in range(20):
        text = TOK.decode(b.inputs[i].tolist())
        assert text.startswith(PASSKEY_PREFIX)
        off, nl = b.meta["needle_offset"][i], b.meta["needle_len"][i]
        needle = TOK.decode(b.inputs[i, off:off + nl].tolist())
        m = re.fullmatch(r" The pass key is (\d+)\. Remember it\. (\d+) is the pass key\. ", needle)
        assert m and m.group(1) == m.group(2)
        assert _answer_text(b, i) == " " + m.group(1) == f" {b.meta['keys'][i]}"
        assert len(m.group(1)) == 5 and m.group(1)[0] != "0"
        assert text.endswith(PASSKEY_QUESTION + " " + m.group(1))
        # the filler is a contiguous run of the caller's array, split by the needle
        f_len, f_off = b.meta["filler_len"][i], b.meta["filler_offset"][i]
        p = len(PASSKEY_PREFIX)
        run = np.concatenate([b.inputs[i, p:off], b.inputs[i, off + nl:off + nl + f_len - (off - p)]])
        np.testing.assert_array_equal(run, FILLER[f_off:f_off + f_len])
        assert abs((off - p) - 0.5 * f_len) <= 0.5


def test_passkey_labels_only_on_answer_tokens():
    b = passkey(TOK, FILLER, 10, 400, None, seed=1, n_digits=7)
    for i in range(10):
        a0, alen = b.meta["answer_start"][i], b.meta["answer_len"][i]
        assert a0 + alen == 400 and alen == 8  # " " + 7 digits, one byte each
        pos = np.flatnonzero(b.labels[i] != IGNORE_INDEX)
        np.testing.assert_array_equal(pos, np.arange(a0 - 1, 399))
        np.testing.assert_array_equal(b.labels[i, pos], b.inputs[i, pos + 1])


def test_passkey_depth_extremes_and_random_depth():
    n, length = 12, 700
    d0 = passkey(TOK, FILLER, n, length, 0.0, seed=3)
    d1 = passkey(TOK, FILLER, n, length, 1.0, seed=3)
    np.testing.assert_array_equal(d0.meta["keys"], d1.meta["keys"])  # same keys, only depth moves
    q_and_a = len(PASSKEY_QUESTION) + d1.meta["answer_len"]
    assert (d0.meta["needle_offset"] == len(PASSKEY_PREFIX)).all()
    np.testing.assert_array_equal(d1.meta["needle_offset"] + d1.meta["needle_len"], length - q_and_a)
    assert (d1.meta["needle_offset"] - d0.meta["needle_offset"] > 400).all()
    rnd = passkey(TOK, FILLER, 200, length, None, seed=3)
    assert 0.0 <= rnd.meta["depth"].min() and rnd.meta["depth"].max() <= 1.0
    assert rnd.meta["depth"].std() > 0.2


def test_passkey_too_short_raises_and_exact_minimum_fits():
    b = passkey(TOK, FILLER, 1, 400, 0.3, seed=0)
    need = 400 - b.meta["filler_len"][0]  # byte tokenizer: same needle length for every 5-digit key
    tight = passkey(TOK, FILLER, 3, int(need), 0.3, seed=0)
    assert tight.inputs.shape == (3, need) and (tight.meta["filler_len"] == 0).all()
    with pytest.raises(ValueError, match=f"need {need} tokens"):
        passkey(TOK, FILLER, 3, int(need) - 1, 0.3, seed=0)
    with pytest.raises(ValueError, match="depth"):
        passkey(TOK, FILLER, 3, 400, 1.5, seed=0)
    with pytest.raises(ValueError, match="filler_ids"):
        passkey(TOK, np.array([300]), 3, 400, 0.5, seed=0)


def test_passkey_short_filler_is_read_cyclically():
    short = FILLER[:50]
    b = passkey(TOK, short, 4, 500, 0.0, seed=2)
    p, nl = len(PASSKEY_PREFIX), b.meta["needle_len"][0]
    run = b.inputs[0, p + nl:p + nl + b.meta["filler_len"][0]]
    np.testing.assert_array_equal(run, short[(b.meta["filler_offset"][0] + np.arange(run.size)) % 50])


class _PairTokenizer(ByteTokenizer):
    """Bytes, but a doubled digit ("00".."99") is one token 257+d: token counts vary with the key."""

    def encode(self, text: str) -> list[int]:
        raw, out, i = text.encode("utf-8"), [], 0
        while i < len(raw):
            if i + 1 < len(raw) and raw[i] == raw[i + 1] and 48 <= raw[i] <= 57:
                out.append(257 + raw[i] - 48)
                i += 2
            else:
                out.append(raw[i])
                i += 1
        return out

    def decode(self, ids: list[int]) -> str:
        return b"".join(bytes([i]) if i < 256 else str(i - 257).encode() * 2 for i in ids
                        if i != 256).decode("utf-8", errors="replace")


def test_passkey_variable_token_counts():
    tok = _PairTokenizer(name="pairs", vocab_size=267)
    b = passkey(tok, FILLER, 300, 450, None, seed=4, n_digits=6)
    assert b.inputs.shape == (300, 450)
    assert len(np.unique(b.meta["answer_len"])) > 1 and len(np.unique(b.meta["needle_len"])) > 1
    for i in range(300):
        a0 = b.meta["answer_start"][i]
        assert tok.decode(b.inputs[i, a0:].tolist()) == f" {b.meta['keys'][i]}"
        off, nl = b.meta["needle_offset"][i], b.meta["needle_len"][i]
        assert tok.decode(b.inputs[i, off:off + nl].tolist()) == PASSKEY_NEEDLE.format(key=b.meta["keys"][i])
        assert (b.labels[i] != IGNORE_INDEX).sum() == b.meta["answer_len"][i]
        np.testing.assert_array_equal(b.labels[i, a0 - 1:-1], b.inputs[i, a0:])


def test_passkey_grid_cells():
    cells = passkey_grid(TOK, FILLER, [400, 800], [0.0, 0.5, 1.0], per_cell=3, seed=9)
    assert [(c.length, c.depth) for c in cells] == [(L, d) for L in (400, 800) for d in (0.0, 0.5, 1.0)]
    for c in cells:
        assert c.batch.inputs.shape == (3, c.length)
        direct = passkey(TOK, FILLER, 3, c.length, c.depth, seed=(9, c.length))
        np.testing.assert_array_equal(c.batch.inputs, direct.inputs)
    np.testing.assert_array_equal(cells[0].batch.meta["keys"], cells[2].batch.meta["keys"])
    assert not np.array_equal(cells[0].batch.inputs, cells[1].batch.inputs)


# ----------------------------------------------------------------------------- segment AR

def _parse_segment(seg, first_value, is_query):
    """-> (key tuple, value or None); asserts the segment holds exactly one well-formed pair."""
    seps = np.flatnonzero(seg == SEG_AR_SEP)
    assert seps.size == 1
    s = int(seps[0])
    key = tuple(seg[:s].tolist())
    assert 1 <= len(key) <= 3 and all(2 <= t < first_value for t in key)
    if is_query:
        assert (seg[s + 1:] == SEG_AR_PAD).all()
        return key, None
    assert first_value <= seg[s + 1] < first_value + 16
    assert (seg[s + 2:] == SEG_AR_PAD).all()
    return key, int(seg[s + 1])


def _check_segment_ar(b, num_pairs, seg_len):
    n = b.num_examples
    assert b.inputs.shape == b.labels.shape == (n, (num_pairs + 1) * seg_len)
    segs = b.inputs.reshape(n, num_pairs + 1, seg_len)
    fv = b.meta["first_value"]
    out = []
    for i in range(n):
        writes = [_parse_segment(segs[i, j], fv, False) for j in range(num_pairs)]
        qkey, _ = _parse_segment(segs[i, num_pairs], fv, True)
        latest = {k: (j, v) for j, (k, v) in enumerate(writes)}  # later writes overwrite
        assert qkey in latest
        j_ans, v_ans = latest[qkey]
        pos = np.flatnonzero(b.labels[i] != IGNORE_INDEX)
        assert pos.tolist() == [num_pairs * seg_len + len(qkey)]
        assert b.labels[i, pos[0]] == v_ans == b.meta["answer"][i]
        assert b.meta["answer_segment"][i] == j_ans
        first_v = next(v for k, v in writes if k == qkey)
        out.append(([k for k, _ in writes], v_ans, first_v))
    return out


def test_segment_ar_plain():
    b = segment_ar(300, 12, 6, 40, seed=0)
    for keys, v_ans, first_v in _check_segment_ar(b, 12, 6):
        assert len(set(keys)) == len(keys) and v_ans == first_v
    assert len(np.unique(b.meta["write_key_lens"])) == 3


def test_segment_ar_rewrite_uses_latest_value():
    b = segment_ar(300, 10, 5, 34, seed=1, rewrite=True)
    parsed = _check_segment_ar(b, 10, 5)
    assert all(len(set(keys)) < len(keys) for keys, _, _ in parsed)  # every example repeats a key
    not_first = sum(v_ans != first_v for _, v_ans, first_v in parsed)
    assert not_first > 0.3 * len(parsed)
    assert (b.meta["answer_segment"] != b.meta["first_segment"]).mean() > 0.3
    # a re-write always changes the key's value, so "latest" and "first" really disagree
    segs = b.inputs.reshape(300, 11, 5)
    for i in range(300):
        last: dict = {}
        for j in range(10):
            key, v = _parse_segment(segs[i, j], b.meta["first_value"], False)
            assert last.get(key) != v
            last[key] = v


def test_segment_ar_config_errors():
    with pytest.raises(ValueError) as e:
        segment_ar(4, 3, 4, 20, seed=0)
    msg = str(e.value)
    assert "2 problem" in msg and "vocab_size must be >= 2 + n_key_symbols + n_values = 34" in msg
    assert "segment_len must be >= max key length + 2 = 5" in msg
    with pytest.raises(ValueError, match="num_pairs >= 2"):
        segment_ar(4, 1, 5, 34, seed=0, rewrite=True)
    with pytest.raises(ValueError, match="exceeds the 4 distinct keys"):
        segment_ar(4, 5, 5, 34, seed=0, key_len=(1, 1), n_key_symbols=4, n_values=4)
    assert segment_ar(4, 4, 5, 34, seed=0, key_len=(1, 1), n_key_symbols=4).inputs.shape == (4, 25)
