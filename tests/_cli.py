"""Shared by the command-line tests: tiny saved models, a data file, running ``main`` and checking its output.

The fixtures (``bert_dir``, ``gpt2_dir``, ``csv_file``; a test file imports the ones it uses) build their
folders once per session (``tmp_path_factory``), whichever test file asks first.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import transformers as tf
from PIL import Image

from apt_salience.cli import main

WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "is", "was", "not", "very", "plot", "actors", "fun"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROWS = [
    ("the movie is good", "pos"), ("the film was awful", "neg"), ("very good plot", "pos"),
    ("bad actors and a bad plot", "neg"), ("not fun", "neg"), ("great film very fun", "pos"),
    ("the plot was not good", "neg"), ("good actors", "pos"), ("awful", "neg"), ("the movie was great fun", "pos"),
]
LAYERS, HEADS, HIDDEN, FFN = 2, 4, 32, 48

_BUILT: Dict[str, Path] = {}


def tokenizer() -> Any:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    return tf.BertTokenizer(vocab=vocab)


def _saved(factory: pytest.TempPathFactory, name: str, seed: int, build: Callable[[], Any]) -> Path:
    """A model from ``build()`` (seeded) and the tokenizer saved in a session folder, built once."""
    if name not in _BUILT:
        d = factory.mktemp(name)
        torch.manual_seed(seed)
        build().save_pretrained(d)
        tokenizer().save_pretrained(d)
        _BUILT[name] = d
    return _BUILT[name]


def _tiny_bert() -> Any:
    cfg = tf.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=32)
    cfg.num_labels = 2
    return tf.BertForSequenceClassification(cfg)


def _tiny_gpt2() -> Any:
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(SPECIAL) + len(WORDS), n_embd=HIDDEN, n_layer=LAYERS,
                                            n_head=HEADS, n_inner=FFN, n_positions=32))


@pytest.fixture
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-class BertForSequenceClassification and its tokenizer, saved (once per session)."""
    return _saved(tmp_path_factory, "tiny_bert", 0, _tiny_bert)


@pytest.fixture
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT2LMHeadModel and the same tokenizer, saved (once per session)."""
    return _saved(tmp_path_factory, "tiny_gpt2", 1, _tiny_gpt2)


@pytest.fixture
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``reviews.csv`` with the columns ``review, sentiment`` and the rows of :data:`ROWS` (once per session)."""
    if "csv" not in _BUILT:
        p = tmp_path_factory.mktemp("data") / "reviews.csv"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["review", "sentiment"])
            w.writerows(ROWS)
        _BUILT["csv"] = p
    return _BUILT["csv"]


def run(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Tuple[int, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def check_png(path: Path, min_width: int = 400, min_height: int = 250) -> None:
    """The file is a PNG that decodes completely, at least ``min_width`` x ``min_height``."""
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.load()  # decodes every pixel
        assert im.format == "PNG"
        assert im.width >= min_width and im.height >= min_height, (path, im.size)


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    """Exit status 1 and exactly one ``apt-salience: error:`` line on stderr containing every needle."""
    assert rc == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("apt-salience: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def profile_args(model: Path, data: Path, tmp_path: Path, *extra: str) -> List[str]:
    """A one-step ``profile`` of ``reviews.csv``'s columns into ``tmp_path/o``."""
    return ["profile", "--model", str(model), "--data", str(data), "--text-column", "review", "--label-column",
            "sentiment", "--steps", "1", "--out", str(tmp_path / "o"), "--quiet", *extra]
