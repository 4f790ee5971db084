"""``apt_salience.cli`` (``main``): the ``report`` command, exit statuses, one-line errors, ``--debug``.

The commands' own behaviour is tested next to their modules (``test_cli_commands.py``,
``test_cli_data.py``, ``test_cli_models.py``, ``test_cli_demo.py``, ``test_report.py``); here the
command line itself: a profile -> report round trip, the report command's input checks, and how
errors reach the user.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from apt_salience.cli import main
from apt_salience.scores import SalienceScores
from tests._cli import bert_dir, csv_file  # noqa: F401  (fixtures)
from tests._cli import FFN, HEADS, HIDDEN, LAYERS, assert_one_line_error, check_png, run


def test_profile_train_then_report_roundtrip(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prof"
    rc, _, err = run(["profile", "--model", str(bert_dir), "--data", str(csv_file), "--text-column", "review",
                       "--label-column", "sentiment", "--steps", "3", "--batch-size", "4", "--train",
                       "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    # the model folder is not modified by profiling
    scores = SalienceScores.load(out / "scores.json")
    assert scores.step == 3
    assert scores.head is not None and len(scores.head) == LAYERS * HEADS
    assert scores.neuron is not None and len(scores.neuron) == LAYERS * FFN
    assert scores.hidden is not None and len(scores.hidden) == HIDDEN
    assert bool((scores.head.kurtosis > 0).all())  # the default config's outlier term is on
    for name in ("head_salience", "head_kurtosis", "head_outlier_aware", "neuron_salience", "hidden_salience",
                 "density_ranking"):
        check_png(out / f"{name}.png")

    rep = tmp_path / "rep"
    rc, stdout, err = run(["report", str(out / "scores.json"), "--out", str(rep), "--top", "3", "--budget", "0.4"],
                           capsys)
    assert rc == 0, err
    assert str(rep) in stdout
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert pngs == sorted(["head_salience.png", "head_kurtosis.png", "head_outlier_aware.png", "neuron_salience.png",
                           "hidden_salience.png", "density_ranking.png"])
    for p in rep.glob("*.png"):
        check_png(p)
    again = SalienceScores.load(rep / "scores.json")
    for kind in ("head", "neuron", "hidden"):
        torch.testing.assert_close(getattr(again, kind).outlier_aware, getattr(scores, kind).outlier_aware)
    md = (rep / "summary.md").read_text()
    # the top head by density, found independently from the JSON
    raw = json.loads((out / "scores.json").read_text())
    dens = [o / p for o, p in zip(raw["head"]["outlier_aware"], raw["head"]["param_count"])]
    best = max(range(len(dens)), key=lambda i: dens[i])
    worst = min(range(len(dens)), key=lambda i: dens[i])
    site_of = [(n, j) for n, c in raw["head"]["sites"] for j in range(c)]
    top_section = md.split("## Head blocks: top 3 by density")[1].split("##")[0]
    bottom_section = md.split("## Head blocks: bottom 3 by density")[1].split("##")[0]
    first_row = [line for line in top_section.splitlines() if line.startswith("| 1 |")][0]
    assert f"`{site_of[best][0]}` | {site_of[best][1]} |" in first_row
    last_row = [line for line in bottom_section.splitlines() if line.startswith(f"| {len(dens)} |")][0]
    assert f"`{site_of[worst][0]}` | {site_of[worst][1]} |" in last_row
    # the budget line: 40% of the head + FFN parameters, counted by hand
    head_params, neuron_params = 4 * (HIDDEN // HEADS) * HIDDEN, 2 * HIDDEN
    total = LAYERS * (HEADS * head_params + FFN * neuron_params)
    assert f"of {total:,.0f} parameters" in md
    assert "budget 40%" in md


def test_error_report_missing_and_bad_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["report", str(tmp_path / "scores.json"), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(rc, err, "scores.json", "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    rc, _, err = run(["report", str(bad), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(rc, err, "not an apt_salience scores")
    notjson = tmp_path / "notjson.json"
    notjson.write_text("{{{")
    rc, _, err = run(["report", str(notjson), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(rc, err, "not JSON")


def test_debug_shows_traceback(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["profile", "--model", str(bert_dir), "--data", str(tmp_path / "none.csv"), "--debug"], capsys)
    assert rc == 1
    assert "Traceback" in err and "does not exist" in err
    rc, _, err = run(["--debug", "report", str(tmp_path / "none.json"), "--out", str(tmp_path)], capsys)
    assert rc == 1 and "Traceback" in err


def test_report_without_matplotlib_names_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    scores = tmp_path / "s.json"
    b = {"salience": [1.0, 2.0], "kurtosis": [3.0, 3.0], "outlier_aware": [2.0, 3.0], "param_count": [4.0, 4.0],
         "density": [0.5, 0.75], "sites": [["l.0.fc2", 2]]}
    scores.write_text(json.dumps({"step": 1, "d_model": 2, "meta": {}, "neuron": b}))
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rc, _, err = run(["report", str(scores), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(rc, err, "matplotlib", "pip install matplotlib")


def test_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["profile", "--model", "x"])  # --data missing
    assert e.value.code == 2
    assert "--data" in capsys.readouterr().err
    assert main([]) == 2


def test_console_entry_point_exit_status(tmp_path: Path) -> None:
    """The installed script's module: a real process gets exit status 1 and one stderr line."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "apt_salience.cli", "report", str(tmp_path / "missing.json"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"apt-salience: error: scores file '{tmp_path / 'missing.json'}' does not exist"]


def test_report_names_the_missing_field_and_refuses_a_file_as_out(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    block = {"salience": [1.0], "outlier_aware": [1.0], "param_count": [1.0], "density": [1.0], "sites": [["l.0.fc2", 1]]}
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({"step": 1, "d_model": 1, "meta": {}, "neuron": block}))
    rc, _, err = run(["report", str(scores), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(rc, err, "not an apt_salience scores file", "the 'neuron' scores have no field 'kurtosis'")
    assert "KeyError" not in err
    nostep = tmp_path / "n.json"
    nostep.write_text(json.dumps({"neuron": block}))
    rc, _, err = run(["report", str(nostep), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(rc, err, "missing field 'step'")
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"step": 1, "d_model": 1, "meta": {}, "neuron": {**block, "kurtosis": [0.0]}}))
    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    rc, _, err = run(["report", str(good), "--out", str(existing)], capsys)
    assert_one_line_error(rc, err, str(existing), "exists and is not a folder")
    assert "Errno" not in err
    # an existing folder is written into (files of the same names overwritten), deliberately
    folder = tmp_path / "r2"
    folder.mkdir()
    (folder / "summary.md").write_text("old")
    rc, _, err = run(["report", str(good), "--out", str(folder)], capsys)
    assert rc == 0, err
    assert (folder / "summary.md").read_text() != "old"
