"""Seeds, spread and selection: the learning rate is chosen on validation, the test split reported."""
from __future__ import annotations

import math

import pytest

from memstack.evals.stats import best_entries, compare, entries, z_vs_value


def rec(memory, lr, seed, test, val, se=0.0, task="t", primary="acc", hib=True):
    return {"memory": memory, "task": task, "lr": lr, "seed": seed, "primary": primary, "higher_is_better": hib,
            "metrics": {primary: test, f"{primary}_se": se}, "metrics_val": {primary: val}}


def test_learning_rate_is_chosen_on_validation_not_test():
    # lr 1e-3 is better on test, 3e-3 on validation: the choice must follow validation
    rs = [rec("m", 1e-3, 0, 0.9, 0.5), rec("m", 1e-3, 1, 0.9, 0.5),
          rec("m", 3e-3, 0, 0.6, 0.7), rec("m", 3e-3, 1, 0.6, 0.7)]
    e = best_entries(rs)[("m", "t")]
    assert e.lr == 3e-3 and e.mean == pytest.approx(0.6)


def test_lower_is_better_metrics_choose_the_lowest_validation_mean():
    rs = [rec("m", 1e-3, 0, 2.0, 2.5, primary="bpb", hib=False), rec("m", 3e-3, 0, 2.2, 2.1, primary="bpb", hib=False)]
    assert best_entries(rs)[("m", "t")].lr == 3e-3


def test_mean_sd_range_and_standard_error_over_seeds():
    rs = [rec("m", 1e-3, s, v, v, se) for s, (v, se) in enumerate([(0.5, 0.03), (0.7, 0.04), (0.6, 0.0)])]
    e = entries(rs)[("m", "t", 1e-3)]
    assert e.seeds == [0, 1, 2] and e.mean == pytest.approx(0.6) and (e.lo, e.hi) == (0.5, 0.7)
    assert e.sd == pytest.approx(0.1)
    # sampling part sum(se_i^2)/S^2, seed part sd^2/S
    assert e.se == pytest.approx(math.sqrt((0.03 ** 2 + 0.04 ** 2) / 9 + 0.01 / 3))


def test_one_seed_has_only_the_sampling_error():
    e = entries([rec("m", 1e-3, 0, 0.5, 0.5, 0.02)])[("m", "t", 1e-3)]
    assert e.sd == 0 and e.se == pytest.approx(0.02)


def test_a_diverged_seed_is_dropped_and_its_lr_not_preferred():
    rs = [rec("m", 1e-3, 0, math.nan, math.nan), rec("m", 1e-3, 1, 0.99, 0.99),   # better mean, one seed lost
          rec("m", 3e-3, 0, 0.5, 0.5), rec("m", 3e-3, 1, 0.5, 0.5)]
    es = entries(rs)
    assert es[("m", "t", 1e-3)].test == [0.99] and len(es[("m", "t", 1e-3)].records) == 2
    assert best_entries(rs)[("m", "t")].lr == 3e-3
    # every lr lost a seed: the best validation mean among them
    assert best_entries(rs[:2])[("m", "t")].lr == 1e-3
    assert best_entries([rec("m", 1e-3, 0, math.nan, math.nan)]) == {}


def test_compare_difference_z_and_spread():
    a = entries([rec("a", 1, 0, 0.9, 0.9, 0.01), rec("a", 1, 1, 0.8, 0.8, 0.01)])[("a", "t", 1)]
    b = entries([rec("b", 1, 0, 0.1, 0.1, 0.01), rec("b", 1, 1, 0.2, 0.2, 0.01)])[("b", "t", 1)]
    c = compare(a, b)
    assert c.diff == pytest.approx(0.7) and c.beyond_spread
    assert c.z == pytest.approx(0.7 / math.sqrt(a.se ** 2 + b.se ** 2))
    close = entries([rec("c", 1, 0, 0.15, 0.15), rec("c", 1, 1, 0.3, 0.3)])[("c", "t", 1)]
    assert not compare(close, b).beyond_spread                  # 0.15 lies inside b's [0.1, 0.2]
    one = entries([rec("e", 1, 0, 0.99, 0.99)])[("e", "t", 1)]
    assert not compare(one, b).beyond_spread                    # one seed has no spread to be beyond
    exact = entries([rec("d", 1, 0, 0.5, 0.5)])[("d", "t", 1)]
    assert math.isnan(compare(exact, exact).z) and math.isnan(z_vs_value(exact, 0.25))   # no error to measure by


def test_a_test_value_never_decides_the_choice():
    """A seed finite on validation but not on test (or worse on test) does not move the choice:
    completeness and the validation mean are read from the validation values alone."""
    rs = [rec("m", 1e-3, 0, math.nan, 0.9), rec("m", 1e-3, 1, 0.1, 0.7),
          rec("m", 3e-3, 0, 0.95, 0.75), rec("m", 3e-3, 1, 0.95, 0.75)]
    assert best_entries(rs)[("m", "t")].lr == 1e-3     # val mean 0.8 (both seeds) > 0.75
