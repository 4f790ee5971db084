"""The ``relative`` allocation of select_blocks (added for the score-quality issue) against a brute force."""

from __future__ import annotations


import pytest
import torch

from apt_salience.scores import BlockScores, SalienceScores
from apt_salience.selection import select_blocks

D_MODEL = 4
HEAD_PC = 32.0  # parameters of one head block
NEURON_PC = 8.0  # of one neuron block


def _scores(head_vals, neuron_vals, n_layers=2, heads=2, neurons=3):
    def mk(v, pc, sites):
        v = torch.tensor(v, dtype=torch.float32)
        return BlockScores.build(salience=v, kurtosis=torch.zeros(len(v)), outlier_aware=v,
                                 param_count=torch.full((len(v),), pc), sites=sites)

    hs = [(f"l.{i}.o", heads) for i in range(n_layers)]
    ns = [(f"l.{i}.down", neurons) for i in range(n_layers)]
    total = n_layers * (heads * HEAD_PC + neurons * NEURON_PC) / D_MODEL
    layers = {**{n: n.rsplit(".", 1)[0] for n, _ in hs}, **{n: n.rsplit(".", 1)[0] for n, _ in ns}}
    bs = {**{n: 2 for n, _ in hs}, **{n: 1 for n, _ in ns}}
    return SalienceScores(step=1, d_model=D_MODEL, head=mk(head_vals, HEAD_PC, hs), neuron=mk(neuron_vals, NEURON_PC, ns),
                          hidden=mk([1.0] * D_MODEL, total, [("hidden", D_MODEL)]), meta={"layers": layers, "block_size": bs})


def _brute_relative(head_vals, neuron_vals, budget, heads=2, neurons=3):
    """Relative densities by hand; the largest prefix of their descending order within the budget."""
    blocks = []  # (relative density, tie index, kind, index, cost)
    idx = 0
    for kind, vals, per, pc in (("head", head_vals, heads, HEAD_PC), ("neuron", neuron_vals, neurons, NEURON_PC)):
        for start in range(0, len(vals), per):
            site = vals[start:start + per]
            mean_density = sum(v / pc for v in site) / len(site)
            for j, v in enumerate(site):
                rel = (v / pc) / mean_density if mean_density > 0 else v / pc
                blocks.append((rel, idx, kind, start + j, pc))
                idx += 1
    blocks.sort(key=lambda b: (-b[0], b[1]))
    keep = {"head": [False] * len(head_vals), "neuron": [False] * len(neuron_vals)}
    spent = 0.0
    for rel, _, kind, i, pc in blocks:
        if spent + pc > budget + 1e-9:
            break
        spent += pc
        keep[kind][i] = True
    return keep, spent


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.35])
def test_relative_allocation_matches_brute_force(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    head_vals = (torch.rand(4, generator=g) * 10 ** torch.randint(-2, 3, (4,), generator=g)).tolist()
    neuron_vals = (torch.rand(6, generator=g) * 10 ** torch.randint(-2, 3, (6,), generator=g)).tolist()
    sc = _scores(head_vals, neuron_vals)
    sel = select_blocks(sc, keep_ratio=ratio, kinds=("head", "neuron"), allocation="relative")
    total = 4 * HEAD_PC + 6 * NEURON_PC
    keep, spent = _brute_relative(head_vals, neuron_vals, ratio * total)
    assert sel.head.tolist() == keep["head"] and sel.neuron.tolist() == keep["neuron"]
    assert sel.params_kept == pytest.approx(spent) and sel.params_kept <= ratio * total + 1e-9
    assert sel.allocation == "relative"


def test_relative_allocation_ignores_per_site_scale_global_does_not():
    head_vals = [1.0, 3.0, 2.0, 5.0]
    neuron_vals = [0.1, 0.4, 0.2, 3.0, 1.0, 2.0]
    scaled_heads = [v * 1e4 for v in head_vals[:2]] + head_vals[2:]  # layer 0's heads on another scale
    scaled_neurons = neuron_vals[:3] + [v * 1e-3 for v in neuron_vals[3:]]  # layer 1's neurons too
    a = select_blocks(_scores(head_vals, neuron_vals), keep_ratio=0.5, kinds=("head", "neuron"), allocation="relative")
    b = select_blocks(_scores(scaled_heads, scaled_neurons), keep_ratio=0.5, kinds=("head", "neuron"), allocation="relative")
    assert torch.equal(a.head, b.head) and torch.equal(a.neuron, b.neuron)
    ga = select_blocks(_scores(head_vals, neuron_vals), keep_ratio=0.5, kinds=("head", "neuron"), allocation="global")
    gb = select_blocks(_scores(scaled_heads, scaled_neurons), keep_ratio=0.5, kinds=("head", "neuron"), allocation="global")
    assert not (torch.equal(ga.head, gb.head) and torch.equal(ga.neuron, gb.neuron))


def test_relative_allocation_honours_min_per_site_and_previous():
    head_vals = [5.0, 4.0, 1e-6, 1e-6]
    neuron_vals = [9.0, 8.0, 7.0, 1e-6, 1e-6, 1e-6]
    sc = _scores(head_vals, neuron_vals)
    sel = select_blocks(sc, keep_ratio=0.5, kinds=("head", "neuron"), allocation="relative", min_per_site=1)
    for kind in ("head", "neuron"):
        for site, m in sel.site_masks(kind).items():
            assert bool(m.any()), f"{site} emptied despite min_per_site=1"
    prev = {"head": torch.tensor([0.0, 1, 1, 1]), "neuron": torch.ones(6)}
    sel2 = select_blocks(sc, keep_ratio=0.6, kinds=("head", "neuron"), allocation="relative", previous=prev)
    assert not bool(sel2.head[0])  # pruned before, stays pruned
