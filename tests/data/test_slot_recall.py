"""The cross-segment slot-recall generator: layout, labels, determinism and what a model without
memory can know."""
from __future__ import annotations

import numpy as np
import pytest

from memstack.data.synthetic._common import IGNORE_INDEX
from memstack.data.synthetic.slot_recall import slot_recall, slot_recall_errors, slot_recall_layout
from memstack.errors import ConfigError


def test_layout_and_vocab():
    lay = slot_recall_layout(8, 32, 64)
    assert lay == {"pad": 0, "first_marker": 1, "first_value": 9, "first_noise": 9 + 256, "vocab_size": 9 + 256 + 64}


@pytest.mark.parametrize("n_context", [1, 3])
def test_every_slot_is_stated_once_in_the_context_and_queried_in_the_last_segment(n_context):
    S, K, V = 32, 6, 5
    b = slot_recall(50, S, 7, n_slots=K, n_values=V, n_noise=9, n_context=n_context, n_queries=4)
    lay = slot_recall_layout(K, V, 9)
    assert b.inputs.shape == b.labels.shape == (50, (n_context + 1) * S)
    assert b.inputs.min() >= 1 and b.inputs.max() < lay["vocab_size"]
    ctx, query = b.inputs[:, :n_context * S], b.inputs[:, n_context * S:]
    for i in range(50):
        for j in range(K):                                    # marker j once in the context, then its value
            (pos,) = np.nonzero(ctx[i] == 1 + j)
            assert len(pos) == 1 and pos[0] % 2 == 0 and pos[0] == b.meta["pair_positions"][i, j]
            assert ctx[i, pos[0] + 1] == lay["first_value"] + j * V + b.meta["values"][i, j]
        # every other context token is noise
        special = (ctx[i] < lay["first_noise"]).sum()
        assert special == 2 * K
        lab = np.nonzero(b.labels[i] != IGNORE_INDEX)[0]
        assert len(lab) == 4 and (lab >= n_context * S).all()   # labels only in the query segment
        slots = b.inputs[i, lab] - 1
        assert len(set(slots.tolist())) == 4                     # distinct slots asked
        assert (b.labels[i, lab] == lay["first_value"] + slots * V + b.meta["values"][i, slots]).all()
        assert (b.inputs[i, lab + 1] == b.labels[i, lab]).all()  # the value follows its query (teacher forcing)
        # the query segment holds each asked value exactly once, after its own query: nothing to copy earlier
        for p, v in zip(lab, b.labels[i, lab]):
            assert (query[i] == v).sum() == 1 and not (b.inputs[i, n_context * S:p + 1] == v).any()


def test_values_are_uniform_so_chance_is_one_over_n_values():
    b = slot_recall(20000, 16, 0, n_slots=2, n_values=4, n_noise=3)
    counts = np.bincount(b.meta["values"].ravel(), minlength=4) / b.meta["values"].size
    assert np.allclose(counts, 0.25, atol=0.01)
    assert b.meta["chance"] == 0.25


def test_deterministic_in_seed():
    a, b, c = (slot_recall(10, 16, s, n_slots=3, n_values=4, n_noise=5) for s in (1, 1, 2))
    assert (a.inputs == b.inputs).all() and (a.labels == b.labels).all()
    assert not (a.inputs == c.inputs).all()


def test_bad_configuration_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        slot_recall(10, 15, 0, n_slots=20, n_values=1, n_noise=0, n_context=1, n_queries=30)
    msg = str(e.value)
    for part in ("segment_len must be even", "n_noise must be a positive int"):
        assert part in msg
    assert len(slot_recall_errors(1, 16, 20, 1, 4, 1, 30)) == 4   # n_values, n_queries > slots, pairs, queries
