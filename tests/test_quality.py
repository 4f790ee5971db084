"""Baseline criteria of apt_salience.quality against hand computations on a tiny BERT.

Oracles address the BERT modules by name (query/key/value rows, attention output columns,
intermediate rows, output columns), independently of the producer discovery in the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from apt_salience import attach
from apt_salience.quality import (
    ActivationNorms,
    Comparison,
    WeightTaylor,
    magnitude_scores,
    wanda_scores,
    weight_taylor_scores,
)
from tests._models import FFN, HEAD_DIM, HEADS, make_batch, make_model

LAYERS = 2


def _layers(model):
    return model.bert.encoder.layer


def _hand_weight_taylor(model, grads=None):
    """|sum over each head's / neuron's weights of W * dW| from named modules (float64)."""
    g = (lambda p: p.grad) if grads is None else (lambda p: grads[id(p)])
    heads, neurons = [], []
    with torch.no_grad():
        return _hand_wt_inner(model, g, heads, neurons)


def _hand_wt_inner(model, g, heads, neurons):
    for layer in _layers(model):
        att = layer.attention
        for h in range(HEADS):
            sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            t = 0.0
            for lin in (att.self.query, att.self.key, att.self.value):
                t += float((lin.weight[sl, :].double() * g(lin.weight)[sl, :].double()).sum())
            o = att.output.dense
            t += float((o.weight[:, sl].double() * g(o.weight)[:, sl].double()).sum())
            heads.append(abs(t))
        up, down = layer.intermediate.dense, layer.output.dense
        for j in range(FFN):
            t = float((up.weight[j, :].double() * g(up.weight)[j, :].double()).sum())
            t += float((down.weight[:, j].double() * g(down.weight)[:, j].double()).sum())
            neurons.append(abs(t))
    return torch.tensor(heads, dtype=torch.float64), torch.tensor(neurons, dtype=torch.float64)


def test_weight_taylor_scores_match_hand_computation():
    model = make_model("bert", seed=1)
    batch, _ = make_batch("bert", torch.Generator().manual_seed(0))
    model(**batch).loss.backward()
    s = weight_taylor_scores(model)
    heads, neurons = _hand_weight_taylor(model)
    assert s["head"].shape == (LAYERS * HEADS,) and s["neuron"].shape == (LAYERS * FFN,)
    torch.testing.assert_close(s["head"], heads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s["neuron"], neurons, rtol=1e-9, atol=1e-12)


def test_weight_taylor_stream_sums_signed_within_step_abs_then_ema():
    """Two micro-batches per step (signed sum), clipping after backward ignored, EMA across steps."""
    model = make_model("bert", seed=2)
    gen = torch.Generator().manual_seed(3)
    beta = 0.6
    wt = WeightTaylor(model, ema_beta=beta)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    exp_h = torch.zeros(LAYERS * HEADS, dtype=torch.float64)
    exp_n = torch.zeros(LAYERS * FFN, dtype=torch.float64)
    for _ in range(2):
        for _ in range(2):
            batch, _ = make_batch("bert", gen)
            model(**batch).loss.backward()
        # oracle from the accumulated .grad (= sum of both backward passes), before clipping
        h, n = _hand_weight_taylor(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # must not change the scores
        opt.step()
        opt.zero_grad()
        assert wt.step() is True
        exp_h = beta * exp_h + (1 - beta) * h
        exp_n = beta * exp_n + (1 - beta) * n
    s = wt.scores()
    # the oracle reads the float32-accumulated .grad, the stream sums each backward in float64
    torch.testing.assert_close(s["head"], exp_h, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(s["neuron"], exp_n, rtol=1e-5, atol=1e-10)
    wt.detach()
    assert wt.step() is False  # no hook left: nothing observed
    with pytest.raises(ValueError, match="ema_beta"):
        WeightTaylor(model, ema_beta=1.0)


def test_weight_taylor_before_any_gradient_raises():
    wt = WeightTaylor(make_model("bert"))
    with pytest.raises(RuntimeError, match="no gradient"):
        wt.scores()
    wt.detach()


def test_taylor_mode_equals_weight_taylor_over_site_columns():
    """The tracker's taylor mode |sum_t H*dL/dH| per head = |sum over the head's o-proj columns of W*dW|."""
    model = make_model("bert", seed=4)
    tr = attach(model, {"salience": {"mode": "taylor"}, "kurtosis": {"enabled": False}, "ema_beta": 0.0})
    batch, mask = make_batch("bert", torch.Generator().manual_seed(5), pad=False)
    model(**batch).loss.backward()
    tr.step()
    sc = tr.scores()
    tr.detach()
    heads, neurons = [], []
    model.requires_grad_(False)  # hand computations below need no graph
    for layer in _layers(model):
        o = layer.attention.output.dense
        for h in range(HEADS):
            sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            heads.append(abs(float((o.weight[:, sl].double() * o.weight.grad[:, sl].double()).sum())))
        d = layer.output.dense
        neurons += (d.weight.double() * d.weight.grad.double()).sum(0).abs().tolist()
    torch.testing.assert_close(sc.head.salience.double(), torch.tensor(heads, dtype=torch.float64), rtol=2e-4, atol=1e-9)
    torch.testing.assert_close(sc.neuron.salience.double(), torch.tensor(neurons, dtype=torch.float64), rtol=2e-4, atol=1e-9)


def test_wanda_scores_with_padding_excluded():
    model = make_model("bert", seed=6)
    model.eval()
    batch, mask = make_batch("bert", torch.Generator().manual_seed(7), batch=3, seq=6, pad=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    captured = {}
    hooks = []
    for i, layer in enumerate(_layers(model)):
        for name, mod in (("head", layer.attention.output.dense), ("neuron", layer.output.dense)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, key=(i, name): captured.__setitem__(key, a[0].detach().clone())))
    with ActivationNorms(model) as an:
        with torch.no_grad(), an.token_mask(mask):
            model(**inputs)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    heads, neurons = [], []
    for i, layer in enumerate(_layers(model)):
        for name, mod, out in (("head", layer.attention.output.dense, heads), ("neuron", layer.output.dense, neurons)):
            x = captured[(i, name)].reshape(-1, mod.in_features)[keep].double()
            norm = torch.sqrt((x ** 2).sum(0))
            per_col = mod.weight.detach().double().abs().sum(0) * norm
            out.append(per_col.view(-1, HEAD_DIM).sum(1) if name == "head" else per_col)
    norms = an.norms()
    assert len(norms) == 2 * LAYERS
    s = wanda_scores(model, norms)
    torch.testing.assert_close(s["head"], torch.cat(heads), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s["neuron"], torch.cat(neurons), rtol=1e-6, atol=1e-9)
    # the padding mattered: the norms without the mask differ
    with ActivationNorms(model) as an2:
        with torch.no_grad():
            model(**inputs)
    assert not torch.allclose(wanda_scores(model, an2.norms())["neuron"], s["neuron"])
    with pytest.raises(ValueError, match="no entry for site"):
        wanda_scores(model, {})


def test_magnitude_scores_match_hand_computation():
    model = make_model("bert", seed=8)
    s = magnitude_scores(model)
    heads, neurons = [], []
    with torch.no_grad():
        for layer in _layers(model):
            att = layer.attention
            for h in range(HEADS):
                sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                t = sum(float(lin.weight[sl, :].abs().sum()) for lin in (att.self.query, att.self.key, att.self.value))
                heads.append(t + float(att.output.dense.weight[:, sl].abs().sum()))
            up, down = layer.intermediate.dense, layer.output.dense
            neurons += (up.weight.abs().sum(1) + down.weight.abs().sum(0)).tolist()
    torch.testing.assert_close(s["head"].double(), torch.tensor(heads, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["neuron"].double(), torch.tensor(neurons, dtype=torch.float64), rtol=1e-5, atol=1e-6)


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
