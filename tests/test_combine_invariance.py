"""``kurtosis.combine: scaled`` is scale-free; ``add`` (the paper) is not.

The oracle recomputes the outlier-aware salience from full activations and gradients (captured
with ``retain_grad``), kurtosis from scipy, and the scaled combination
``S + mean_site(S) * sqrt(K) / mean_site(sqrt(K))``, independently of the tracker. Then the
ranking of the densities must not change when the loss is multiplied by a constant, the batch
is duplicated, or the gradients are scaled (``backward(gradient=c)``).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from apt_salience import attach
from tests._models import HEAD_DIM, make_batch, make_model

BETA = 0.85
STEPS = 2


def _batches():
    gen = torch.Generator().manual_seed(11)
    return [make_batch("bert", gen, batch=3, seq=6, pad=False)[0] for _ in range(STEPS)]


def _run(mode, combine, *, loss_scale=1.0, duplicate=False, grad_scale=1.0, capture=False):
    """Scores of a tracker (and, with capture, the site inputs and their gradients per step)."""
    model = make_model("bert", seed=21)
    tr = attach(model, {"salience": {"mode": mode}, "kurtosis": {"combine": combine}, "ema_beta": BETA})
    sites = [(f"{i}.head", layer.attention.output.dense) for i, layer in enumerate(model.bert.encoder.layer)]
    sites += [(f"{i}.neuron", layer.output.dense) for i, layer in enumerate(model.bert.encoder.layer)]
    sites.sort(key=lambda s: (int(s[0].split(".")[0]), s[0].endswith("neuron")))
    store = {}
    hooks = []
    if capture:
        for name, mod in sites:
            def pre(m, args, name=name):
                args[0].retain_grad()
                store[name] = args[0]
            hooks.append(mod.register_forward_pre_hook(pre))
    steps = []
    for batch in _batches():
        if duplicate:
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}
        loss = model(**batch).loss * loss_scale
        loss.backward(torch.tensor(grad_scale))
        tr.step()
        if capture:
            steps.append({n: (t.detach().double().reshape(-1, t.shape[-1]), t.grad.double().reshape(-1, t.shape[-1]))
                          for n, t in store.items()})
        model.zero_grad()
    for h in hooks:
        h.remove()
    sc = tr.scores()
    tr.detach()
    return sc, [n for n, _ in sites], steps


def _oracle(mode, names, steps):
    """EMA of S + mean_site(S) sqrt(K) / mean_site(sqrt(K)) per block, heads then neurons, model order."""
    ema = {}
    for step in steps:
        for name in names:
            h, g = step[name]
            bs = HEAD_DIM if name.endswith("head") else 1
            if mode == "compressed":
                per_ch = h.abs().sum(0) * g.abs().sum(0)
                s = per_ch.view(-1, bs).sum(1)
            else:
                t = (h * g).sum(0).view(-1, bs).sum(1)
                s = t.abs() if mode == "taylor" else t ** 2
            hn = h.numpy()
            k = np.array([scipy.stats.kurtosis(hn[:, j * bs:(j + 1) * bs].reshape(-1), fisher=False, bias=True)
                          for j in range(hn.shape[1] // bs)])
            sk = torch.from_numpy(np.sqrt(k))
            s_hat = s + s.mean() * sk / sk.mean()
            ema[name] = BETA * ema.get(name, torch.zeros_like(s_hat)) + (1 - BETA) * s_hat
    heads = torch.cat([ema[n] for n in names if n.endswith("head")])
    neurons = torch.cat([ema[n] for n in names if n.endswith("neuron")])
    return heads, neurons


def _global_order(sc):
    d = torch.cat([sc.head.density.double(), sc.neuron.density.double()])
    return torch.sort(d, descending=True, stable=True).indices


@pytest.mark.parametrize("mode", ["compressed", "taylor", "fisher"])
def test_scaled_combination_matches_independent_oracle(mode):
    sc, names, steps = _run(mode, "scaled", capture=True)
    heads, neurons = _oracle(mode, names, steps)
    torch.testing.assert_close(sc.head.outlier_aware.double(), heads, rtol=2e-4, atol=1e-12)
    torch.testing.assert_close(sc.neuron.outlier_aware.double(), neurons, rtol=2e-4, atol=1e-12)


@pytest.mark.parametrize("mode", ["compressed", "taylor", "fisher"])
@pytest.mark.parametrize("change", [dict(loss_scale=1e3), dict(loss_scale=1e-3), dict(duplicate=True),
                                    dict(grad_scale=37.0)])
def test_scaled_ranking_is_invariant(mode, change):
    base, _, _ = _run(mode, "scaled")
    other, _, _ = _run(mode, "scaled", **change)
    # every score is multiplied by one common factor, so the global density order is unchanged
    ratio = torch.cat([other.head.outlier_aware, other.neuron.outlier_aware]).double() / \
        torch.cat([base.head.outlier_aware, base.neuron.outlier_aware]).double()
    assert float(ratio.max() - ratio.min()) <= 1e-3 * float(ratio.mean())
    scale = change.get("loss_scale", change.get("grad_scale", 1.0))
    expected = {"compressed": scale, "taylor": scale, "fisher": scale ** 2}[mode] * (2.0 if change.get("duplicate") and mode == "compressed" else 1.0)
    assert float(ratio.mean()) == pytest.approx(expected, rel=1e-3)
    assert torch.equal(_global_order(base), _global_order(other))


def test_add_combination_is_not_scale_free():
    """The paper's S + sqrt(K): scaling the loss reorders the blocks (the defect scaled removes)."""
    small, _, _ = _run("compressed", "add", loss_scale=1e-4)
    large, _, _ = _run("compressed", "add", loss_scale=1e4)
    assert not torch.equal(_global_order(small), _global_order(large))
