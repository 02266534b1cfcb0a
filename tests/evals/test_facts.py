"""The facts task: closed-book queries carry labels only on the value, in-context answers are in
the context and never among the trained facts, training mixes both, bad configs list reasons."""
from __future__ import annotations

import numpy as np
import pytest

from memstack.data.packing import IGNORE
from memstack.errors import ConfigError
from memstack.evals.facts import FactsTask, FactsTaskConfig, make_facts


def test_facts_are_deterministic_and_distinct():
    a, b = make_facts(50, 3), make_facts(50, 3)
    assert a == b and len({k for k, _ in a}) == 50 and make_facts(50, 4) != a


def test_examples_label_exactly_the_values():
    t = FactsTask(FactsTaskConfig(n_facts=10, icl_pairs=2, n_icl_test=20), 128)
    tok = t.tokenizer
    x, y = t.fact_test
    for i, (k, v) in enumerate(t.facts):
        assert tok.decode([int(a) for a in y[i] if a != IGNORE]) == f" {v}."
        assert tok.decode(x[i][: (x[i] != tok.eot_id).sum() + 1]).startswith(f"the code of {k} is")
    keys = {k for k, _ in t.facts}
    x, y = t.icl_test
    for i in range(len(x)):
        text = tok.decode(x[i])
        answer = tok.decode([int(a) for a in y[i] if a != IGNORE])
        query_key = text.split("the code of ")[-1].split(" is")[0]
        assert query_key not in keys and f"{query_key} is{answer}" in text.split(". the code of")[0] + text
    tx, ty = t.train_arrays(200, 0)
    assert tx.shape == (200, 128) and ((ty != IGNORE).sum(1) > 0).all()
    closed = sum(any(k in tok.decode(r) for k in keys) for r in tx)
    assert 60 < closed < 140                                   # icl_frac 0.5


def test_bad_config_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        FactsTaskConfig(n_facts=0, icl_frac=2.0, tokenizer="nope")
    assert len(e.value.reasons) == 3
    with pytest.raises(ValueError, match="raise seq_len"):
        FactsTask(FactsTaskConfig(seq_len=32, icl_pairs=3), 32).icl_test
