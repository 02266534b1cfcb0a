"""Long-context tasks: the BABILong-style / RULER-style generators, streaming equal to the whole
example, and the length sweep's metrics."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.synthetic.longctx import LOCATIONS, long_batch
from memstack.data.tokenizer_base import ByteTokenizer
from memstack.errors import ConfigError
from memstack.evals.longctx import LongContextTaskConfig, stream_exact, wilson
from memstack.evals.task import build_task, example_predictions
from memstack.memory.learned.config import RMTConfig

TOK = ByteTokenizer()
FILLER = np.asarray(TOK.encode("Call me Ishmael. Some years ago, never mind how long precisely. " * 20))


def text(b, r, seg=16):
    x, _ = b.materialize(seg)
    return TOK.decode(x[r].tolist())


def test_babilong_qa1_answer_is_the_queried_actors_latest_location():
    b = long_batch(TOK, FILLER, "babilong_qa1", 40, 900, 3, n_facts=4)
    x, y = b.materialize(16)
    assert x.shape == y.shape == (40, 900) and b.choices == len(LOCATIONS)
    for r in range(40):
        t = text(b, r)
        moves = re.findall(r" (Mary|John|Daniel|Sandra) (?:went back|went|moved|journeyed|travelled) to the (\w+)\.", t)
        assert len(moves) == 4                                 # every fact in the haystack, in order
        who = re.search(r"Where is (\w+)\? Answer: (\w+)$", t)
        assert who and who.group(2) == [loc for a, loc in moves if a == who.group(1)][-1]
        lab = TOK.decode(y[r][y[r] != -100].tolist())
        assert lab == " " + who.group(2) and t.endswith(lab)   # labels: the answer tokens, at the very end


@pytest.mark.parametrize("variant", ["niah_multikey", "niah_multivalue", "vt"])
def test_ruler_style_variants_carry_their_answer(variant):
    b = long_batch(TOK, FILLER, variant, 10, 700, 1, n_facts=3)
    for r in range(10):
        t = text(b, r)
        if variant == "niah_multikey":
            key, ans = re.search(r"number for (\w+)\? Answer: (\d+)$", t).groups()
            assert f"magic number for {key} is {ans}." in t and len(re.findall(r"magic number for \w+ is", t)) == 3
        elif variant == "niah_multivalue":
            vals = re.findall(r"magic number for \w+ is (\d+)\.", t)
            assert t.endswith("Answer: " + " ".join(vals)) and len(vals) == 3
        else:
            first = re.search(r"VAR (\w+) = (\d+)\.", t)
            chain = re.findall(r"VAR (\w+) = VAR (\w+)\.", t)
            assert len(chain) == 2 and chain[0][1] == first.group(1) and chain[1][1] == chain[0][0]
            assert t.endswith(f"VAR {chain[1][0]} has the value {first.group(2)}")


def test_filler_is_read_in_order_around_the_facts():
    b = long_batch(TOK, FILLER, "babilong_qa1", 3, 500, 0, n_facts=2)
    x, _ = b.materialize(64)
    for r in range(3):
        keep = np.ones(500, dtype=bool)
        for start, toks in b.pieces[r]:
            keep[start:start + len(toks)] = False
        hay = x[r][keep]
        want = FILLER[(b.offsets[r] + np.arange(len(hay))) % len(FILLER)]
        assert (hay == want).all()


def test_too_short_length_is_refused():
    with pytest.raises(ConfigError, match="cannot hold"):
        long_batch(TOK, FILLER, "niah_multivalue", 2, 20, 0, n_facts=3)
    with pytest.raises(ConfigError) as e:
        LongContextTaskConfig(variant="nope", train_len=4096, lengths=(1, 2), examples=(1,), tokenizer="byte")
    assert len(e.value.reasons) == 3


def test_streaming_equals_the_whole_example_processed_in_segments():
    torch.manual_seed(0)
    m = build_model(ModelConfig(BackboneConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, seg_len=16),
                                (RMTConfig(n_tokens=2),))).eval()
    b = long_batch(TOK, FILLER, "babilong_qa1", 6, 200, 5, n_facts=2)
    with torch.no_grad():
        got = stream_exact(m, b, 16)
        x, y = b.materialize(16)
        correct, mask = example_predictions(m, x, y, 16)
    assert (got == (correct | ~mask).all(axis=1)).all()


def test_wilson_interval():
    lo, hi = wilson(4, 4)
    assert hi == 1.0 and lo == pytest.approx(0.5101, abs=1e-3)
    lo, hi = wilson(0, 8)
    assert lo == 0.0 and hi == pytest.approx(0.3244, abs=1e-3)
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_task_sweep_metrics(tmp_path):
    cfg = LongContextTaskConfig(tokenizer="byte", train_len=128, lengths=(300, 700), examples=(3, 2), n_test=5,
                                progress=False)
    task = build_task(cfg, 32)
    m = build_model(ModelConfig(BackboneConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, seg_len=32),
                                (RMTConfig(n_tokens=2),))).eval()
    val, test = task.evaluate(m, "val"), task.evaluate(m, "test")
    assert set(val) == {"exact", "exact_se"}
    for L, n in ((300, 3), (700, 2)):
        assert test[f"n@{L}"] == n and 0 <= test[f"exact_lo@{L}"] <= test[f"exact@{L}"] <= test[f"exact_hi@{L}"] <= 1
        assert test[f"rss_mb@{L}"] > 0 and test[f"seconds@{L}"] > 0
    assert task.chance() == pytest.approx(1 / 6)
    # choices at a length are made on validation examples: other ones than the test's, which keep their seeds
    for L in (300, 700):
        v, t = task.length_batch(L, 3, "val"), task.length_batch(L, 3, "test")
        assert not np.array_equal(v.materialize(32)[0], t.materialize(32)[0])
        assert np.array_equal(t.offsets, task.batch(3, L, (cfg.seed + 1_000_003, L), cfg.eval_filler).offsets)
    assert set(task.evaluate_length(m, 300, 2, "val")) == {k for k in test if k.endswith("@300")}
    b = task.train_source(4, 0).next(1)
    assert tuple(b.tokens.shape) == (4, 4, 32) and int((b.targets != -100).sum()) > 0


def test_curriculum_lengths_are_capped_at_train_len():
    """follow_curriculum trains on n_segments * seg_len tokens, never more than train_len: a
    vary_segments / curriculum run stays within the <= 1k tokens it is reported as trained on."""
    cfg = LongContextTaskConfig(tokenizer="byte", train_len=300, follow_curriculum=True, n_test=2, progress=False)
    src = build_task(cfg, 32).train_source(2, 0)
    for n, segs, last in ((4, 4, 128), (6, 6, 192), (10, 10, 300), (16, 10, 300)):
        b = src.next(n)
        assert tuple(b.tokens.shape) == (2, segs, 32)
        labelled = np.nonzero((b.targets.reshape(2, -1) != -100).numpy())[1]
        # the answer ends the example: its last label is the last position of a `last`-token example
        assert labelled.max() == last - 2
