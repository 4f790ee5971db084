"""The score-quality benchmark's bookkeeping (``benchmarks/_quality.py``): the recommended-setting bar,
each column's best option on validation, and the Markdown tables, on hand-filled results.

The runner itself (a 30-minute fine-tune and evaluation) is exercised by
``python benchmarks/score_quality.py --quick``; here the decisions it takes from its numbers.
"""

from __future__ import annotations

import math

import pytest

from apt_salience.cli.demo import load_score_quality

Q = load_score_quality()
Comparison = Q.Comparison


def _comparison(values, dense=0.80):
    cols = ["compressed+add", "compressed+scaled", "taylor+add", "taylor+scaled", "fisher+add", "fisher+scaled",
            "magnitude", "random", "wanda", "weight_taylor"]
    c = Comparison(budgets=(0.7, 0.5), dense={"test": dense, "val": dense}, recommended=("taylor+scaled", "uniform", "none"))
    for b, row in values.items():
        for col, v in zip(cols, row):
            c.test[(col, "uniform", "none", b, False)] = v
    return c


def test_meets_bar_requires_strict_win_everywhere_and_small_gap():
    win = {0.7: [0.5, 0.5, 0.6, 0.78, 0.6, 0.6, 0.5, 0.4, 0.5, 0.7], 0.5: [0.4] * 3 + [0.7] + [0.4] * 6}
    r = _comparison(win).meets_bar()
    assert r["meets"] is True and r["beats_every_column"] == {0.7: True, 0.5: True}
    assert math.isclose(r["gap_to_dense_at_0.7"], 0.02)
    tie = {0.7: win[0.7], 0.5: [0.4] * 3 + [0.7] + [0.4] * 5 + [0.7]}
    assert _comparison(tie).meets_bar()["meets"] is False
    assert _comparison(win, dense=0.84).meets_bar()["meets"] is False  # 6 points below dense at 70%
    md = _comparison(win).to_markdown()
    assert "| 70% |" in md and "**0.780**" in md and "taylor+scaled" in md


def test_best_option_is_chosen_on_validation_and_enters_the_bar():
    c = _comparison({0.7: [0.5] * 3 + [0.78] + [0.5] * 6, 0.5: [0.4] * 3 + [0.7] + [0.4] * 6})
    for b, (u, g) in {0.7: (0.60, 0.70), 0.5: (0.55, 0.50)}.items():  # magnitude: global better on average
        c.val[("magnitude", "uniform", "none", b)] = u
        c.val[("magnitude", "global", "none", b)] = g
    assert c.best_option("magnitude") == ("global", "none")  # mean 0.60 > 0.575
    assert c.best_option("wanda") is None
    c.test[("magnitude", "global", "none", 0.7, False)] = 0.79  # better than the recommended 0.78
    c.test[("magnitude", "global", "none", 0.5, False)] = 0.30
    assert c.best_option_row(0.7, False) == {"magnitude": 0.79}
    r = c.meets_bar()
    assert r["beats_every_column"] == {0.7: False, 0.5: True} and r["meets"] is False
    assert "global/none" in c.to_markdown()


def test_columns_are_every_tracker_setting_then_the_baselines() -> None:
    assert list(Q.TRACKER_SETTINGS) == ["compressed+add", "compressed+scaled", "taylor+add", "taylor+scaled",
                                        "fisher+add", "fisher+scaled"]
    assert Q.TRACKER_SETTINGS["fisher+scaled"] == {"salience": {"mode": "fisher"}, "kurtosis": {"combine": "scaled"}}
    assert Comparison(budgets=(0.5,)).columns() == list(Q.TRACKER_SETTINGS) + ["magnitude", "random", "wanda",
                                                                                "weight_taylor"]


@pytest.mark.parametrize("kwargs,match", [({"budgets": (0.5, 1.5)}, "budgets"), ({"budgets": (0,)}, "budgets"),
                                          ({"options": (("", ""),)}, "options")])
def test_compare_criteria_checks_its_arguments_before_loading_anything(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Q.compare_criteria(**kwargs)
