"""``apt_salience.cli.commands``: ``profile`` and ``prune`` end to end on tiny saved models, and their input checks.

The profile oracle is a brute-force run of the same batch with every site's input captured with
``retain_grad``; the prune oracle counts the saved model's head + FFN weights from its shapes and
recomputes its held-out accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import transformers as tf

from apt_salience.scores import SalienceScores
from apt_salience.selection import BlockLayout
from tests._cli import bert_dir, csv_file, gpt2_dir  # noqa: F401  (fixtures)
from tests._cli import FFN, HEADS, HIDDEN, LAYERS, ROWS, assert_one_line_error, check_png, profile_args, run


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
    rc, stdout, err = run(["profile", "--model", str(bert_dir), "--data", str(csv_file), "--text-column", "review",
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


def test_profile_causal_lm_on_text_file(gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(t for t, _ in ROWS) + "\n\n")
    out = tmp_path / "prof"
    rc, _, err = run(["profile", "--model", str(gpt2_dir), "--data", str(data), "--task", "causal-lm",
                       "--steps", "2", "--batch-size", "3", "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    scores = SalienceScores.load(out / "scores.json")
    assert BlockLayout.from_scores(scores).architecture == "gpt2"
    assert scores.head is not None and len(scores.head) == LAYERS * HEADS
    assert bool((scores.head.salience > 0).all())
    check_png(out / "density_ranking.png")


def test_profile_jsonl_with_integer_labels(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": int(lab == "pos")}) for t, lab in ROWS))
    out = tmp_path / "prof"
    rc, _, err = run(["profile", "--model", str(bert_dir), "--data", str(data), "--steps", "1", "--out", str(out),
                       "--quiet"], capsys)
    assert rc == 0, err
    assert (out / "scores.json").is_file()


@pytest.mark.parametrize("text,needles", [
    ("update_frequncy: 2\n", ("update_frequncy", "update_frequency")),
    ("ema_beta: 3\n", ("ema_beta", "3")),
    ("kurtosis: [1, 2\n", ("malformed YAML",)),
])
def test_error_bad_config(bert_dir: Path, csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          text: str, needles: Tuple[str, ...]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    rc, _, err = run(profile_args(bert_dir, csv_file, tmp_path, "--config", str(cfg)), capsys)
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "o").exists()  # failed before anything was written


def test_error_missing_config_file(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(profile_args(bert_dir, csv_file, tmp_path, "--config", str(tmp_path / "none.yaml")), capsys)
    assert_one_line_error(rc, err, "none.yaml")


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
    rc, stdout, err = run(_prune_args(bert_dir, csv_file, out, "--keep", "0.5", *extra), capsys)
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
    check_png(out / "density_ranking.png")


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
    model = bert_dir
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
    rc, _, err = run(args, capsys)
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "o").exists()  # failed before anything was written


def test_prune_refuses_an_existing_output(bert_dir: Path, csv_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    rc, _, err = run(_prune_args(bert_dir, csv_file, full), capsys)
    assert_one_line_error(rc, err, str(full), "not empty")
    assert (full / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run(_prune_args(bert_dir, csv_file, afile), capsys)
    assert_one_line_error(rc, err, str(afile), "not a folder")
    bad_cfg = tmp_path / "c.yaml"
    bad_cfg.write_text("pruning:\n  keep: 0.5\n")
    rc, _, err = run(_prune_args(bert_dir, csv_file, tmp_path / "o", "--config", str(bad_cfg)), capsys)
    assert_one_line_error(rc, err, "pruning.keep", "keep_ratio")
    slow = tmp_path / "slow.yaml"
    slow.write_text("update_frequency: 5\n")
    rc, _, err = run(_prune_args(bert_dir, csv_file, tmp_path / "o", "--config", str(slow), "--steps", "2"), capsys)
    assert_one_line_error(rc, err, "update_frequency (5)", "no reading would be published")
    two = tmp_path / "two.csv"
    two.write_text("review,sentiment\ngood,pos\nbad,neg\n")
    rc, _, err = run(_prune_args(bert_dir, two, tmp_path / "o"), capsys)
    assert_one_line_error(rc, err, "2 usable rows", "--eval-fraction")
    assert not (tmp_path / "o").exists()

