"""The segment curriculum end to end with RMT (1 -> 2 -> 4 segments, varied counts, checkpoint
carry-over across stages, resume mid-curriculum bit for bit), tasks that follow it, and
evaluation at longer lengths than trained."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.evals.passkey import PasskeyTaskConfig
from memstack.evals.segment_ar import SegmentARTaskConfig
from memstack.evals.task import build_task
from memstack.memory.learned.config import RMTConfig
from memstack.train.config import TrainConfig
from memstack.train.trainer import Trainer

S, ROWS = 8, 4
TASK = SegmentARTaskConfig(vocab=40, num_pairs=2, n_key_symbols=8, n_values=8, n_test=24, eval_pairs=(8,),
                           follow_curriculum=True)
CURRICULUM = ((0, 1), (2, 2), (4, 4))


def model():
    torch.manual_seed(0)
    bb = BackboneConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S)
    return build_model(ModelConfig(bb, (RMTConfig(n_tokens=2),)))


def trainer(task, **kw):
    cfg = TrainConfig(**{**dict(lr=3e-3, warmup_steps=1, max_steps=7, batch_size=ROWS, curriculum=CURRICULUM,
                                progress=False, seed=0, log_every=1), **kw})
    return Trainer(model(), cfg, task.train_source(ROWS, 0), evaluate=task.evaluate)


# ----------------------------------------------------------------------------- the draw

def test_segments_for_follows_the_curriculum_and_varies_deterministically():
    plain = TrainConfig(curriculum=CURRICULUM)
    assert [plain.segments_for(s) for s in range(6)] == [1, 1, 2, 2, 4, 4]
    vary = TrainConfig(curriculum=((0, 8),), vary_segments=True, min_segments=2, seed=5)
    draws = [vary.segments_for(s) for s in range(400)]
    assert set(draws) == set(range(2, 9))                                   # every count in [2, 8] occurs
    assert draws == [vary.segments_for(s) for s in range(400)]              # same (seed, step), same draw
    assert draws != [TrainConfig(curriculum=((0, 8),), vary_segments=True, min_segments=2, seed=6).segments_for(s)
                     for s in range(400)]
    counts = np.bincount(draws, minlength=9)[2:]
    assert counts.min() > 400 / 7 * 0.5                                     # roughly uniform


def test_min_segments_is_checked():
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError, match="min_segments"):
        TrainConfig(min_segments=0)


# ----------------------------------------------------------------------------- end to end

def test_rmt_trains_through_the_curriculum_with_growing_examples():
    task = build_task(TASK, S)
    tr = trainer(task)
    recs = [tr.train_step() for _ in range(6)]
    assert [r["segments"] for r in recs] == [1, 1, 2, 2, 4, 4]
    # examples follow: n pair segments + the query segment; tokens counted accordingly
    assert [r["tokens"] for r in recs] == list(np.cumsum([ROWS * (n + 1) * S for n in (1, 1, 2, 2, 4, 4)]))
    assert all(np.isfinite(r["loss"]) for r in recs)


def test_resume_mid_curriculum_continues_bit_for_bit(tmp_path):
    """Checkpoint carry-over: stop inside stage 2, resume in a new process-like trainer (new
    model init, fresh source), cross into stage 3 (4 segments, varied counts): identical to an
    uninterrupted run."""
    task = build_task(TASK, S)
    kw = dict(curriculum=((0, 1), (2, 2), (4, 5)), vary_segments=True, max_steps=8)
    straight = trainer(task, **kw)
    ra = [straight.train_step() for _ in range(8)]
    first = trainer(task, **kw)
    for _ in range(3):
        first.train_step()
    first.save(tmp_path / "ckpt")
    torch.manual_seed(99)
    second = Trainer(build_model(first.model.cfg), first.cfg, build_task(TASK, S).train_source(ROWS, 0),
                     evaluate=task.evaluate)
    second.resume(tmp_path / "ckpt")
    rb = [second.train_step() for _ in range(5)]
    assert [r["segments"] for r in rb] == [r["segments"] for r in ra[3:]]
    assert len({r["segments"] for r in ra[4:]}) > 1                        # varied counts in the last stage
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra[3:]]
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_evaluation_at_longer_lengths_than_trained():
    """Trained on up to 2 pair segments, evaluated at 2 (acc) and 8 (acc@8: 9 segments per example)."""
    task = build_task(TASK, S)
    tr = trainer(task, max_steps=3)
    tr.fit(progress=False)
    res = tr.history[-1]["eval"]
    assert set(res) == {"acc", "exact", "acc@8"}
    assert 0.0 <= res["acc@8"] <= 1.0
    long = task.test_at(8)
    assert long.inputs.shape == (TASK.n_test, 9 * S)
    assert not np.array_equal(long.inputs[:, :S], task.test.inputs[:, :S])


def test_rewrite_curriculum_needs_two_pairs_and_says_so():
    task = build_task(SegmentARTaskConfig(vocab=40, num_pairs=4, n_key_symbols=8, n_values=8, rewrite=True,
                                          follow_curriculum=True), S)
    src = task.train_source(ROWS, 0)
    assert src.next(2).tokens.shape == (ROWS, 3, S)
    with pytest.raises(ValueError, match="min_segments at 2"):
        src.next(1)


def test_passkey_follows_the_curriculum():
    task = build_task(PasskeyTaskConfig(tokenizer="bpe512", follow_curriculum=True, lengths=(192,), depths=(0.5,),
                                        per_cell=2), 64)
    src = task.train_source(ROWS, 0)
    for n in (3, 5):                                  # 3 segments = 192 tokens: the template needs 136
        b = src.next(n)
        assert b.tokens.shape == (ROWS, n, 64)
        assert ((b.targets != -100).sum(dim=(1, 2)) >= 1).all()       # every row has its answer to predict
        assert (b.targets[:, -1] != -100).any(1).all()                 # ... at the end of the example
    state = src.state_dict()
    again = task.train_source(ROWS, 0)
    again.load_state_dict(state)
    assert torch.equal(src.next(4).tokens, again.next(4).tokens)
