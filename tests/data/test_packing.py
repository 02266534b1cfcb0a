"""Packing of documents and fixed-length examples into (B, N, S) batches (memstack.data.packing)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memstack.data.packing import IGNORE, Batch, DocumentStream, ExampleSource

S, EOT = 8, 7
LENGTHS = (1, 5, 16, 17, 40)


def make_docs(lengths=LENGTHS) -> list[np.ndarray]:
    """Document k holds 1000*(k+1) + 0, 1, 2, ...: every token says which document it is from."""
    return [1000 * (k + 1) + np.arange(n, dtype=np.int64) for k, n in enumerate(lengths)]


def doc_of(token: int) -> int:
    return token // 1000 - 1


def stream_segments(stream: DocumentStream, calls: list[int]) -> Batch:
    """Concatenate the batches of several next() calls along the segment axis."""
    bs = [stream.next(n) for n in calls]
    return Batch(torch.cat([b.tokens for b in bs], 1), torch.cat([b.targets for b in bs], 1),
                 torch.cat([b.reset for b in bs], 1))


# ----------------------------------------------------------------------------- DocumentStream

def test_every_token_is_a_target_exactly_once_in_order_with_its_context():
    docs = make_docs()
    stream = DocumentStream(docs, 2, S, EOT, shuffle=False, loop=False)
    b = stream_segments(stream, [1] * 12)
    assert b.tokens.dtype == b.targets.dtype == torch.int64 and b.reset.dtype == torch.bool
    assert b.tokens.shape == b.targets.shape == (2, 12, S) and b.reset.shape == (2, 12)
    seen = {k: [] for k in range(len(docs))}
    for r in range(2):
        cur = None
        for n in range(12):
            tok, tgt, reset = b.tokens[r, n].tolist(), b.targets[r, n].tolist(), bool(b.reset[r, n])
            real = [i for i, t in enumerate(tgt) if t != IGNORE]
            if not real:                                    # an idle row: nothing to predict
                assert all(t == IGNORE for t in tgt)
                cur = None
                continue
            assert real == list(range(len(real)))           # targets first, padding after
            k = doc_of(tgt[0])
            assert all(doc_of(t) == k for t in tgt[: len(real)])
            starts = tgt[0] == 1000 * (k + 1)
            assert reset is starts                          # reset exactly at a document's first segment
            if starts:
                assert tok[0] == EOT                        # the first token is predicted from <eot>
                cur = k
            assert cur == k                                 # a row never switches documents mid-way
            for i in real:                                  # the input is the previous token
                expect_in = EOT if tgt[i] == 1000 * (k + 1) else tgt[i] - 1
                assert tok[i] == expect_in
            for i in range(len(real), S):                   # padding
                assert tgt[i] == IGNORE
            seen[k] += tgt[: len(real)]
    for k, d in enumerate(docs):
        assert seen[k] == d.tolist()                        # every token once, in order
    assert b.n_targets == sum(LENGTHS)


def test_exact_layout_of_the_small_stream():
    """Rows pull documents in (segment, row) order: row 0 gets docs 0, 2, 4; row 1 docs 1, 3."""
    stream = DocumentStream(make_docs(), 2, S, EOT, shuffle=False, loop=False)
    b = stream_segments(stream, [1] * 10)
    owner = [[doc_of(int(t[0])) if int(t[0]) != IGNORE else None for t in b.targets[r]] for r in range(2)]
    assert owner[0] == [0, 2, 2, 4, 4, 4, 4, 4, None, None]
    assert owner[1] == [1, 3, 3, 3, None, None, None, None, None, None]
    assert b.reset[0, :8].tolist() == [True, True, False, True, False, False, False, False]
    assert b.reset[1, :4].tolist() == [True, True, False, False]
    # last segments: doc 0 (1 token), doc 1 (5), doc 2 (16 = 2 full), doc 3 (17: 1 in its 3rd), doc 4 (40 = 5 full)
    assert (b.targets[0, 0] != IGNORE).sum() == 1 and (b.targets[1, 0] != IGNORE).sum() == 5
    assert (b.targets[0, 2] != IGNORE).sum() == 8 and (b.targets[1, 3] != IGNORE).sum() == 1
    assert (b.targets[0, 7] != IGNORE).sum() == 8
    assert int(b.tokens[1, 3, 0]) == 1000 * 4 + 15 and int(b.targets[1, 3, 0]) == 1000 * 4 + 16
    assert (b.tokens[1, 3, 2:] == EOT).all()                  # beyond the document: <eot> inputs


def test_segment_grouping_does_not_change_the_stream():
    a = stream_segments(DocumentStream(make_docs(), 2, S, EOT, shuffle=False, loop=False), [1] * 9)
    b = stream_segments(DocumentStream(make_docs(), 2, S, EOT, shuffle=False, loop=False), [3, 2, 4])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets) and torch.equal(a.reset, b.reset)


def test_exhausted_turns_true_once_every_row_is_idle():
    stream = DocumentStream(make_docs(), 2, S, EOT, shuffle=False, loop=False)
    flags, counts = [], []
    for _ in range(11):
        b = stream.next(1)
        flags.append(stream.exhausted)
        counts.append(b.n_targets)
    # row 1 idles from segment 4, row 0 from segment 8 (see the layout test)
    assert flags == [False] * 8 + [True] * 3
    assert counts[8:] == [0, 0, 0]
    assert all(c > 0 for c in counts[:8])
    b = stream.next(2)                                      # stays idle: padding only
    assert b.n_targets == 0 and (b.tokens == EOT).all() and stream.exhausted


def test_loop_wraps_to_the_next_epoch_without_shuffle():
    stream = DocumentStream(make_docs((3, 3, 3)), 1, S, EOT, shuffle=False, loop=True)
    b = stream.next(7)
    assert [doc_of(int(t[0])) for t in b.targets[0]] == [0, 1, 2, 0, 1, 2, 0]
    assert b.reset.all() and not stream.exhausted
    assert stream.epoch == 2


def _doc_sequence(stream: DocumentStream, n: int) -> list[int]:
    b = stream.next(n)
    return [doc_of(int(t)) for t in b.targets[0, :, 0]]


def test_shuffle_is_a_seeded_permutation_that_changes_per_epoch():
    docs = make_docs(tuple(range(1, 9)))                   # 8 one-segment documents
    seq = _doc_sequence(DocumentStream(docs, 1, S, EOT, seed=5), 24)
    epochs = [seq[0:8], seq[8:16], seq[16:24]]
    for e in epochs:
        assert sorted(e) == list(range(8))                 # each epoch: every document once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(8))                     # actually shuffled
    assert _doc_sequence(DocumentStream(docs, 1, S, EOT, seed=5), 24) == seq      # seeded
    assert _doc_sequence(DocumentStream(docs, 1, S, EOT, seed=6), 24) != seq


def test_shuffle_with_loop_false_visits_each_document_once():
    docs = make_docs(tuple(range(1, 9)))
    stream = DocumentStream(docs, 2, S, EOT, seed=1, loop=False)
    b = stream_segments(stream, [1] * 5)
    firsts = [doc_of(int(t)) for t in b.targets[:, :, 0].flatten() if int(t) != IGNORE]
    assert sorted(firsts) == list(range(8))
    assert stream.exhausted


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_single_process_batch(world):
    docs = make_docs((3, 30, 9, 17, 1, 44, 8, 25, 12))
    kw = dict(seed=11, shuffle=True, loop=True)
    single = DocumentStream(docs, 4, S, EOT, **kw)
    ranks = [DocumentStream(docs, 4, S, EOT, rank=r, world=world, **kw) for r in range(world)]
    for n in (1, 3, 2, 4, 1, 5):
        want = single.next(n)
        parts = [s.next(n) for s in ranks]
        assert all(p.tokens.shape[0] == 4 // world for p in parts)
        assert torch.equal(torch.cat([p.tokens for p in parts]), want.tokens)
        assert torch.equal(torch.cat([p.targets for p in parts]), want.targets)
        assert torch.equal(torch.cat([p.reset for p in parts]), want.reset)
    assert single.epoch >= 1                              # the check crossed a reshuffle


def test_state_dict_resumes_the_identical_sequence():
    docs = make_docs((3, 30, 9, 17, 1, 44, 8, 25, 12))
    a = DocumentStream(docs, 3, S, EOT, seed=2)
    for n in (2, 3, 1):
        a.next(n)
    sd = json.loads(json.dumps(a.state_dict()))           # as it would come back from trainer.json
    assert any(o > 0 for o in sd["off"])                  # saved mid-document
    rest_a = [a.next(n) for n in (4, 1, 5, 6)]
    b = DocumentStream(docs, 3, S, EOT, seed=2)
    b.load_state_dict(sd)
    rest_b = [b.next(n) for n in (4, 1, 5, 6)]
    for x, y in zip(rest_a, rest_b):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets) and torch.equal(x.reset, y.reset)
    assert a.epoch >= 1 and a.state_dict() == b.state_dict()


def test_state_dict_is_a_snapshot():
    a = DocumentStream(make_docs(), 2, S, EOT, shuffle=False)
    a.next(1)
    sd = a.state_dict()
    frozen = json.dumps(sd)
    a.next(3)
    assert json.dumps(sd) == frozen


def test_empty_documents_are_skipped_and_no_documents_refused():
    docs = [np.array([], dtype=np.int64), np.array([101, 102]), np.array([], dtype=np.int64)]
    b = DocumentStream(docs, 1, S, EOT, shuffle=False, loop=False).next(2)
    assert b.targets[0, 0, :2].tolist() == [101, 102] and b.n_targets == 2
    with pytest.raises(ValueError, match="at least one non-empty document"):
        DocumentStream([np.array([], dtype=np.int64)], 1, S, EOT)


def test_batch_helpers():
    b = DocumentStream(make_docs(), 2, S, EOT, shuffle=False, loop=False).next(2)
    assert b.n_targets == int((b.targets != IGNORE).sum()) == 1 + 5 + 8 + 8
    r = b.rows(1, 2)
    assert torch.equal(r.tokens, b.tokens[1:2]) and torch.equal(r.reset, b.reset[1:2])
    c = b.to("cpu")
    assert torch.equal(c.targets, b.targets)


# ----------------------------------------------------------------------------- ExampleSource

E, L = 5, 10


def examples():
    """Example e: inputs 100*e + position; labels = inputs + 1 except the first 3 positions (no loss)."""
    inputs = 100 * np.arange(E)[:, None] + np.arange(L)[None, :]
    labels = inputs + 1
    labels[:, :3] = IGNORE
    return inputs.astype(np.int64), labels.astype(np.int64)


def ids(b: Batch) -> list[int]:
    return [int(t) // 100 for t in b.tokens[:, 0, 0]]


def test_examples_are_cut_into_padded_segments_reset_at_the_first():
    x, y = examples()
    src = ExampleSource(x, y, 2, 4, pad_id=9, shuffle=False)
    assert src.n_segments == 3
    b = src.next()
    assert b.tokens.shape == b.targets.shape == (2, 3, 4)
    assert torch.equal(b.tokens[0].reshape(-1)[:L], torch.from_numpy(x[0]))
    assert torch.equal(b.targets[1].reshape(-1)[:L], torch.from_numpy(y[1]))
    assert b.tokens[:, 2, 2:].eq(9).all() and b.targets[:, 2, 2:].eq(IGNORE).all()   # padded tail
    assert b.reset.tolist() == [[True, False, False]] * 2
    assert b.n_targets == 2 * (L - 3)


def test_exact_multiple_of_seg_len_has_no_padding():
    x, y = examples()
    src = ExampleSource(x, y, 1, 5, shuffle=False)
    b = src.next()
    assert src.n_segments == 2 and b.tokens.shape == (1, 2, 5)
    assert torch.equal(b.tokens.reshape(-1), torch.from_numpy(x[0]))


def test_examples_in_order_across_epochs_without_shuffle():
    x, y = examples()
    src = ExampleSource(x, y, 2, 4, shuffle=False)
    assert [ids(src.next(7)) for _ in range(5)] == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]  # n_segments ignored
    assert src.epoch == 1 and not src.exhausted


def test_shuffled_examples_are_a_seeded_permutation_per_epoch():
    x, y = examples()
    src = ExampleSource(x, y, 1, 4, seed=3)
    seq = [ids(src.next())[0] for _ in range(15)]
    epochs = [seq[0:5], seq[5:10], seq[10:15]]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    again = ExampleSource(x, y, 1, 4, seed=3)
    assert [ids(again.next())[0] for _ in range(15)] == seq


def test_one_pass_ends_with_a_partial_batch_then_stops():
    x, y = examples()
    src = ExampleSource(x, y, 2, 4, shuffle=False, loop=False)
    got, flags = [], []
    for _ in range(3):
        got.append(ids(src.next()))
        flags.append(src.exhausted)
    assert got == [[0, 1], [2, 3], [4]]
    assert flags == [False, False, True]
    with pytest.raises(StopIteration):
        src.next()


@pytest.mark.parametrize("loop", [True, False])
def test_example_ranks_split_the_single_process_batch(loop):
    x, y = examples()
    single = ExampleSource(x, y, 4, 4, seed=8, loop=loop)
    ranks = [ExampleSource(x, y, 4, 4, seed=8, loop=loop, rank=r, world=2) for r in range(2)]
    for _ in range(2 if not loop else 4):
        want = single.next()
        parts = [s.next() for s in ranks]
        for f in ("tokens", "targets", "reset"):
            assert torch.equal(torch.cat([getattr(p, f) for p in parts]), getattr(want, f))


def test_example_state_dict_resumes():
    x, y = examples()
    a = ExampleSource(x, y, 2, 4, seed=4)
    for _ in range(3):
        a.next()
    sd = json.loads(json.dumps(a.state_dict()))
    want = [ids(a.next()) for _ in range(4)]
    b = ExampleSource(x, y, 2, 4, seed=4)
    b.load_state_dict(sd)
    assert [ids(b.next()) for _ in range(4)] == want
