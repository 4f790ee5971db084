"""select_blocks against brute-force prefix scans, schedules and mask updates against hand values."""

from __future__ import annotations

import math
import random
import time
import warnings
from typing import Dict, List, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from apt_salience.scores import BlockScores, SalienceScores
from apt_salience.selection import (
    ALLOCATIONS,
    BlockLayout,
    Selection,
    SelectionWarning,
    cubic_keep_ratio,
    register_allocation,
    select_blocks,
    update_masks,
)

KIND_ORDER = ("head", "neuron", "hidden")


def _blocks(values: Sequence[float], counts: Sequence[float], sites: List[Tuple[str, int]]) -> BlockScores:
    v = torch.tensor(values, dtype=torch.float32)
    return BlockScores.build(salience=v * 0.5, kurtosis=torch.zeros_like(v), outlier_aware=v,
                             param_count=torch.tensor(counts, dtype=torch.float32), sites=sites)


def random_scores(rng: random.Random, n_layers: int = 3, d_model: int = 6, ties: bool = False) -> SalienceScores:
    """Random layout: per layer a head site (own head count, head cost as with GQA) and a neuron site."""
    hv: List[float] = []
    hc: List[float] = []
    nv: List[float] = []
    nc: List[float] = []
    hs: List[Tuple[str, int]] = []
    ns: List[Tuple[str, int]] = []
    layers: Dict[str, str] = {}
    bsz: Dict[str, int] = {}
    per_dim_total = 0.0
    draw = (lambda: float(rng.randint(0, 3))) if ties else (lambda: rng.random() * 10)
    for layer in range(n_layers):
        n_h = rng.randint(1, 4)
        n_kv = rng.choice([k for k in range(1, n_h + 1) if n_h % k == 0])
        d_head = rng.choice([2, 4])
        gated = rng.random() < 0.5
        n_f = rng.randint(1, 7)
        c_head = (2 + 2 * n_kv / n_h) * d_head  # per hidden dim
        c_neuron = 3.0 if gated else 2.0
        hname, nname = f"m.layers.{layer}.attn.o", f"m.layers.{layer}.mlp.down"
        hs.append((hname, n_h))
        ns.append((nname, n_f))
        layers[hname] = layers[nname] = f"m.layers.{layer}"
        bsz[hname], bsz[nname] = d_head, 1
        hv += [draw() for _ in range(n_h)]
        hc += [c_head * d_model] * n_h
        nv += [draw() for _ in range(n_f)]
        nc += [c_neuron * d_model] * n_f
        per_dim_total += c_head * n_h + c_neuron * n_f
    xv = [draw() * 10 for _ in range(d_model)]
    return SalienceScores(
        step=1, d_model=d_model, head=_blocks(hv, hc, hs), neuron=_blocks(nv, nc, ns),
        hidden=_blocks(xv, [per_dim_total] * d_model, [("hidden", d_model)]),
        meta={"layers": layers, "block_size": bsz},
    )


# ----------------------------------------------------------------------------- brute force


def _entries(scores: SalienceScores, kinds: Sequence[str], field: str = "outlier_aware"):
    """(kind, position, site, density) of every block of the selected kinds, via Python floats."""
    out = []
    for kind in kinds:
        b: BlockScores = getattr(scores, kind)
        vals = getattr(b, field).double().tolist()
        pcs = b.param_count.double().tolist()
        site_of = [name for name, c in b.sites for _ in range(c)]
        for i, (v, p) in enumerate(zip(vals, pcs)):
            out.append((kind, i, site_of[i], v / p))
    return out


def _cost(scores: SalienceScores, keep: Dict[str, List[bool]]) -> float:
    """The issue's formula, layer by layer: d_m' * sum_layers(c_head * n_h' + c_neuron * n_f')."""
    d = scores.d_model
    d_kept = sum(keep["hidden"])
    total = 0.0
    layers = scores.meta["layers"]
    per_layer: Dict[str, float] = {}
    for kind in ("head", "neuron"):
        b = getattr(scores, kind)
        pcs = b.param_count.double().tolist()
        pos = 0
        for name, count in b.sites:
            c = pcs[pos] / d  # per-dimension cost of one block of this site
            n_kept = sum(keep[kind][pos : pos + count])
            per_layer[layers[name]] = per_layer.get(layers[name], 0.0) + c * n_kept
            pos += count
    for v in per_layer.values():
        total += v
    return d_kept * total


def brute_force_global(scores: SalienceScores, budget: float, kinds: Sequence[str]) -> Dict[str, List[bool]]:
    ents = _entries(scores, kinds)
    ents.sort(key=lambda e: (-e[3], KIND_ORDER.index(e[0]), e[1]))
    full = {k: [k not in kinds] * len(getattr(scores, k)) for k in KIND_ORDER}
    best = {k: list(v) for k, v in full.items()}
    keep = {k: list(v) for k, v in full.items()}
    for kind, pos, _, _ in ents:  # linear scan over every prefix
        keep[kind][pos] = True
        if _cost(scores, keep) <= budget * (1 + 1e-12):
            best = {k: list(v) for k, v in keep.items()}
    # the scan must stop at the first prefix over budget: C is monotone, so the last fitting prefix is the answer
    return best


def _as_lists(sel: Selection) -> Dict[str, List[bool]]:
    return {k: sel.masks()[k].tolist() for k in KIND_ORDER}


@pytest.mark.parametrize("seed", range(40))
def test_global_equals_brute_force_prefix_scan(seed: int) -> None:
    rng = random.Random(seed)
    scores = random_scores(rng, n_layers=rng.randint(1, 4), d_model=rng.randint(2, 6), ties=seed % 3 == 0)
    kinds = [("head", "neuron", "hidden"), ("head", "neuron"), ("neuron",), ("head", "hidden")][seed % 4]
    ratio = rng.uniform(0.05, 1.0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sel = select_blocks(scores, keep_ratio=ratio, kinds=kinds)
    total = _cost(scores, {k: [True] * len(getattr(scores, k)) for k in KIND_ORDER})
    assert sel.params_total == pytest.approx(total, rel=1e-9)
    assert sel.budget == pytest.approx(ratio * total, rel=1e-9)
    expect = brute_force_global(scores, ratio * total, kinds)
    assert _as_lists(sel) == expect
    assert sel.params_kept == pytest.approx(_cost(scores, expect), rel=1e-9)
    fixed = {k: [k not in kinds] * len(getattr(scores, k)) for k in KIND_ORDER}
    if _cost(scores, fixed) > sel.budget:  # the kinds kept whole alone exceed the budget: warned, nothing kept
        assert any(issubclass(w.category, SelectionWarning) for w in rec)
        assert _as_lists(sel) == fixed
    else:
        assert not rec
        assert sel.params_kept <= sel.budget * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), ratio=st.floats(0.01, 1.0), ties=st.booleans(),
       kinds=st.sampled_from([("head", "neuron", "hidden"), ("head", "neuron"), ("neuron", "hidden"), ("hidden",)]))
def test_global_equals_brute_force_property(seed: int, ratio: float, ties: bool, kinds: Tuple[str, ...]) -> None:
    rng = random.Random(seed)
    scores = random_scores(rng, n_layers=rng.randint(1, 3), d_model=rng.randint(1, 5), ties=ties)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionWarning)
        sel = select_blocks(scores, keep_ratio=ratio, kinds=kinds)
    assert _as_lists(sel) == brute_force_global(scores, sel.budget, kinds)


def test_prefix_scan_is_largest_fitting_prefix_not_greedy_skip() -> None:
    # neuron 0 is densest but expensive in a 1-neuron layer; after it does not fit, cheaper blocks are NOT added
    scores = SalienceScores(
        step=1, d_model=1,
        head=_blocks([1.0], [10.0], [("l.0.o", 1)]),
        neuron=_blocks([100.0, 1.0], [50.0, 1.0], [("l.0.d", 2)]),
        hidden=_blocks([1.0], [61.0], [("hidden", 1)]),
        meta={"layers": {"l.0.o": "l.0", "l.0.d": "l.0"}, "block_size": {"l.0.o": 1, "l.0.d": 1}},
    )
    # densities: neuron0 = 2, neuron1 = 1, head = 0.1; budget 40 < 50: nothing fits
    sel = select_blocks(scores, budget=40.0, kinds=("head", "neuron"))
    assert sel.neuron.tolist() == [False, False] and sel.head.tolist() == [False]
    assert sel.params_kept == 0.0


def test_ties_break_by_kind_then_model_order() -> None:
    # every block has density 1; the budget fits exactly 3 head-equivalents of 4 params
    scores = SalienceScores(
        step=1, d_model=2,
        head=_blocks([4.0, 4.0], [4.0, 4.0], [("l.0.o", 2)]),
        neuron=_blocks([4.0, 4.0], [4.0, 4.0], [("l.0.d", 2)]),
        hidden=_blocks([16.0, 16.0], [16.0, 16.0], [("hidden", 2)]),
        meta={"layers": {"l.0.o": "l.0", "l.0.d": "l.0"}, "block_size": {"l.0.o": 1, "l.0.d": 1}},
    )
    sel = select_blocks(scores, budget=12.0, kinds=("head", "neuron"))
    assert sel.head.tolist() == [True, True] and sel.neuron.tolist() == [True, False]


def test_uniform_allocation_equals_brute_force() -> None:
    for seed in range(15):
        rng = random.Random(100 + seed)
        scores = random_scores(rng, n_layers=3, d_model=4)
        kinds = ("head", "neuron")
        ratio = rng.uniform(0.1, 1.0)
        sel = select_blocks(scores, keep_ratio=ratio, kinds=kinds, allocation="uniform")
        budget = ratio * sel.params_total
        # brute force: every fraction j / n_g, keep floor(f * n_g) most dense per (kind, layer) group
        groups: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
        for kind, pos, site, dens in _entries(scores, kinds):
            groups.setdefault((kind, scores.meta["layers"][site]), []).append((pos, dens))
        fracs = sorted({j / len(g) for g in groups.values() for j in range(len(g) + 1)})
        best = None
        for f in fracs:
            keep = {k: [k not in kinds] * len(getattr(scores, k)) for k in KIND_ORDER}
            for (kind, _), members in groups.items():
                k = math.floor(f * len(members) + 1e-9)
                for pos, _ in sorted(members, key=lambda e: (-e[1], e[0]))[:k]:
                    keep[kind][pos] = True
            if _cost(scores, keep) <= budget * (1 + 1e-12):
                best = keep
        assert best is not None
        assert _as_lists(sel) == best


def test_uniform_keeps_same_fraction_per_layer() -> None:
    meta = {"layers": {f"l.{i}.d": f"l.{i}" for i in range(3)}, "block_size": {f"l.{i}.d": 1 for i in range(3)}}
    vals = [float(v) for v in range(1, 31)]  # layer 2 has all the large scores
    scores = SalienceScores(
        step=1, d_model=2, neuron=_blocks(vals, [4.0] * 30, [(f"l.{i}.d", 10) for i in range(3)]),
        hidden=_blocks([1.0, 1.0], [60.0, 60.0], [("hidden", 2)]), meta=meta,
    )
    glob = select_blocks(scores, keep_ratio=0.5, kinds=("neuron",))
    uni = select_blocks(scores, keep_ratio=0.5, kinds=("neuron",), allocation="uniform")
    assert glob.neuron.view(3, 10).sum(1).tolist() == [0, 5, 10]
    assert uni.neuron.view(3, 10).sum(1).tolist() == [5, 5, 5]
    assert uni.neuron.view(3, 10)[:, 5:].all()  # the most salient half of each layer


def test_uniform_honours_min_per_site_and_previous() -> None:
    scores = random_scores(random.Random(21), n_layers=4, d_model=4)
    custom = {k: getattr(scores, k).outlier_aware.clone() for k in KIND_ORDER}
    n0 = scores.neuron.sites[0][1]
    prev = {"neuron": torch.ones(len(scores.neuron))}
    prev["neuron"][n0 : n0 + 1] = 0.0  # first neuron of layer 1 already pruned
    custom["neuron"][n0] = 1e6  # ... and now it would be the densest of all
    sel = select_blocks(scores, keep_ratio=0.6, kinds=("head", "neuron"), score=custom, allocation="uniform",
                        min_per_site=1, previous=prev)
    assert not sel.neuron[n0]
    assert all(m.any() for kind in ("head", "neuron") for m in sel.by_site(kind).values())
    assert sel.params_kept <= sel.budget


def test_site_mean_calibration_equals_custom_calibrated_scores() -> None:
    rng = random.Random(7)
    scores = random_scores(rng, n_layers=4, d_model=5)
    cal: Dict[str, torch.Tensor] = {}
    for kind in KIND_ORDER:
        b = getattr(scores, kind)
        parts = [v / v.mean() for v in b.by_site("outlier_aware").values()]
        cal[kind] = torch.cat(parts)
    a = select_blocks(scores, keep_ratio=0.4, calibration="site_mean")
    b = select_blocks(scores, keep_ratio=0.4, score=cal)
    assert _as_lists(a) == _as_lists(b)
    assert a.calibration == "site_mean" and b.score == "custom"


def test_score_by_field_name_and_by_dict_agree() -> None:
    scores = random_scores(random.Random(3), n_layers=3, d_model=4)
    a = select_blocks(scores, keep_ratio=0.5, score="salience")
    b = select_blocks(scores, keep_ratio=0.5, score={k: getattr(scores, k).salience for k in KIND_ORDER})
    c = select_blocks(scores, keep_ratio=0.5, score="outlier_aware")
    assert _as_lists(a) == _as_lists(b)
    # salience is outlier_aware / 2 here, so the ranking is the same too
    assert _as_lists(a) == _as_lists(c)


def test_min_per_site_keeps_the_densest_block_of_every_site() -> None:
    scores = random_scores(random.Random(11), n_layers=4, d_model=4)
    custom = {k: getattr(scores, k).outlier_aware.clone() for k in KIND_ORDER}
    first = scores.neuron.sites[0][1]
    custom["neuron"][:first] = 1e-6  # layer 0's neurons are worthless: a plain selection empties that site
    plain = select_blocks(scores, keep_ratio=0.6, kinds=("head", "neuron"), score=custom)
    assert not plain.neuron[:first].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = select_blocks(scores, keep_ratio=0.6, kinds=("head", "neuron"), score=custom, min_per_site=1)
    for kind in ("head", "neuron"):
        dens = {n: v / p for (n, v), p in zip(
            [(n, custom[kind][sl]) for n, sl in sel.layout.by_site(kind).items()],
            getattr(scores, kind).by_site("param_count").values())}
        for name, m in sel.by_site(kind).items():
            assert m.any(), name
            assert bool(m[int(torch.argmax(dens[name]))])
    assert sel.params_kept <= sel.budget


def test_min_per_site_over_budget_warns() -> None:
    scores = random_scores(random.Random(12), n_layers=4, d_model=4)
    with pytest.warns(SelectionWarning, match="min_per_site"):
        sel = select_blocks(scores, budget=1.0, kinds=("head", "neuron"), min_per_site=1)
    assert all(m.sum() == 1 for m in sel.by_site("head").values())


def test_previously_pruned_blocks_stay_pruned() -> None:
    scores = random_scores(random.Random(5), n_layers=3, d_model=4)
    first = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"))
    # reverse the scores: a fresh selection would revive many blocks
    rev = {k: -getattr(scores, k).outlier_aware + 100 for k in KIND_ORDER}
    second = select_blocks(scores, keep_ratio=0.9, kinds=("head", "neuron"), score=rev, previous=first)
    for kind in ("head", "neuron"):
        assert not (second.masks()[kind] & ~first.masks()[kind]).any()
    # float masks: 0 means pruned, anything above is alive
    floats = {"neuron": first.neuron.float() * 0.5}
    third = select_blocks(scores, keep_ratio=0.9, kinds=("neuron",), previous=floats)
    assert not (third.neuron & ~first.neuron).any()


def test_kind_left_out_is_kept_whole_and_counted() -> None:
    scores = random_scores(random.Random(9), n_layers=2, d_model=4)
    heads = float(scores.head.param_count.double().sum())
    neurons = float(scores.neuron.param_count.double().sum())
    sel = select_blocks(scores, budget=heads + 0.5 * neurons, kinds=("neuron",))
    assert sel.head.all() and sel.hidden.all()
    assert sel.params_kept == pytest.approx(_cost(scores, _as_lists(sel)))
    assert heads < sel.params_kept <= heads + 0.5 * neurons


def test_bad_inputs_raise_clear_errors() -> None:
    scores = random_scores(random.Random(1), n_layers=2, d_model=4)
    with pytest.raises(ValueError, match="keep_ratio"):
        select_blocks(scores, keep_ratio=1.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        select_blocks(scores, keep_ratio=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(scores)
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(scores, keep_ratio=0.5, budget=10.0)
    with pytest.raises(ValueError, match="larger than the model"):
        select_blocks(scores, budget=1e12)
    with pytest.raises(ValueError, match="budget"):
        select_blocks(scores, budget=-3.0)
    with pytest.raises(ValueError, match="kinds"):
        select_blocks(scores, keep_ratio=0.5, kinds=("adapter",))
    with pytest.raises(ValueError, match="allocation"):
        select_blocks(scores, keep_ratio=0.5, allocation="random")
    with pytest.raises(ValueError, match="calibration"):
        select_blocks(scores, keep_ratio=0.5, calibration="zscore")
    with pytest.raises(ValueError, match="score"):
        select_blocks(scores, keep_ratio=0.5, score="nonsense")
    other = random_scores(random.Random(2), n_layers=5, d_model=4)
    with pytest.raises(ValueError, match="same"):  # custom scores from another model
        select_blocks(scores, keep_ratio=0.5, score={k: getattr(other, k).outlier_aware for k in KIND_ORDER})
    with pytest.raises(ValueError, match="layout|same model"):  # previous selection from another model
        select_blocks(scores, keep_ratio=0.5, previous=select_blocks(other, keep_ratio=0.5))
    nan = {k: getattr(scores, k).outlier_aware.clone() for k in KIND_ORDER}
    nan["head"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        select_blocks(scores, keep_ratio=0.5, score=nan)
    with pytest.raises(TypeError, match="SalienceScores"):
        select_blocks({"head": []}, keep_ratio=0.5)  # type: ignore[arg-type]


def test_registered_allocation_is_used() -> None:
    def keep_nothing(prob, budget):  # type: ignore[no-untyped-def]
        return prob.forced.clone()

    register_allocation("test_nothing", keep_nothing)
    try:
        scores = random_scores(random.Random(4), n_layers=2, d_model=4)
        sel = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"), allocation="test_nothing")
        assert not sel.head.any() and not sel.neuron.any() and sel.params_kept == 0.0
    finally:
        del ALLOCATIONS["test_nothing"]


def test_selection_round_trips_through_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    scores = random_scores(random.Random(6), n_layers=2, d_model=4)
    sel = select_blocks(scores, keep_ratio=0.6, min_per_site=1)
    back = Selection.load(sel.save(tmp_path / "sel.json"))
    assert _as_lists(back) == _as_lists(sel)
    assert back.layout.sites == sel.layout.sites and back.params_kept == sel.params_kept


def test_hundred_thousand_blocks_run() -> None:
    # 100k blocks: 32 layers x (32 heads + 3000 neurons) + 1024 hidden dims. Timing is printed by -s, not asserted.
    torch.manual_seed(0)
    L, H, F, D = 32, 32, 3000, 1024
    hs = [(f"m.layers.{i}.o", H) for i in range(L)]
    ns = [(f"m.layers.{i}.down", F) for i in range(L)]
    meta = {"layers": {**{n: n.rsplit(".", 1)[0] for n, _ in hs}, **{n: n.rsplit(".", 1)[0] for n, _ in ns}},
            "block_size": {**{n: 32 for n, _ in hs}, **{n: 1 for n, _ in ns}}}
    scores = SalienceScores(
        step=1, d_model=D, meta=meta,
        head=_blocks(torch.rand(L * H).tolist(), [4 * 32 * D] * (L * H), hs),
        neuron=_blocks(torch.rand(L * F).tolist(), [2 * D] * (L * F), ns),
        hidden=_blocks(torch.rand(D).tolist(), [L * (4 * 32 * H + 2 * F)] * D, [("hidden", D)]),
    )
    t0 = time.perf_counter()
    sel = select_blocks(scores, keep_ratio=0.4)
    dt = time.perf_counter() - t0
    print(f"select_blocks on {L * (H + F) + D} blocks: {dt * 1e3:.1f} ms")
    assert 0.39 * sel.params_total < sel.params_kept <= sel.budget


# ----------------------------------------------------------------------------- schedule and masks


def test_cubic_schedule_values() -> None:
    assert cubic_keep_ratio(0, 10, 0.3) == 1.0
    assert cubic_keep_ratio(10, 10, 0.3) == pytest.approx(0.3)
    assert cubic_keep_ratio(25, 10, 0.3) == pytest.approx(0.3)
    assert cubic_keep_ratio(5, 10, 0.3) == pytest.approx(0.3 + 0.7 * 0.125)
    assert cubic_keep_ratio(2, 10, 0.5) == pytest.approx(0.5 + 0.5 * 0.512)
    vals = [cubic_keep_ratio(t, 20, 0.2) for t in range(21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError, match="final_ratio"):
        cubic_keep_ratio(1, 10, 0.0)
    with pytest.raises(ValueError, match="total_steps"):
        cubic_keep_ratio(1, 0, 0.5)


def test_update_masks_values() -> None:
    lay = BlockLayout({"head": (("o", 2),), "neuron": (("d", 4),)}, {"o": 2, "d": 1}, {"o": "l", "d": "l"}, 4)
    sel = Selection(torch.tensor([True, False]), torch.tensor([True, False, True, False]), None, 0.0, 1.0, 1.0, lay)
    m = update_masks(None, sel, alpha=0.25)
    assert m["head"].tolist() == [1.0, 0.75] and m["neuron"].tolist() == [1.0, 0.75, 1.0, 0.75]
    m = update_masks({"head": torch.tensor([0.5, 0.1]), "neuron": torch.tensor([0.0, 0.2, 0.99, 1.0])}, sel, alpha=0.25)
    assert m["head"].tolist() == [0.75, 0.0]
    assert m["neuron"].tolist() == pytest.approx([0.25, 0.0, 1.0, 0.75])
    m = update_masks(None, sel)  # default alpha 0.01
    assert m["head"].tolist() == pytest.approx([1.0, 0.99])
    with pytest.raises(ValueError, match="alpha"):
        update_masks(None, sel, alpha=0.0)
    with pytest.raises(ValueError, match="same model"):
        update_masks({"head": torch.ones(3)}, sel)


def test_selection_load_errors_name_the_file(tmp_path) -> None:
    from apt_salience.selection import Selection

    (tmp_path / "sel.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"selection file '.*sel\.json' is not JSON \(line 1\)"):
        Selection.load(tmp_path / "sel.json")
    with pytest.raises(ValueError, match="cannot read selection file"):
        Selection.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- unobserved (frozen) sites

def _frozen_bert_reading():  # type: ignore[no-untyped-def]
    """Tiny 3-layer BERT with embeddings and layer 0 frozen (no enable_input_require_grads): the tracker's
    reading, and the sites whose input never required grad, found by the test's own hooks."""
    import apt_salience
    from apt_salience import SalienceWarning
    from tests._models import make_batch, make_model
    from tests._reference import discover_sites

    model = make_model("bert", layers=3)
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    modules = dict(model.named_modules())
    grad_seen: Dict[str, bool] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        return lambda mod, args: grad_seen.__setitem__(name, grad_seen.get(name, False) or args[0].requires_grad)

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in discover_sites(model, "bert")]
    tracker = apt_salience.attach(model)
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(SalienceWarning, match="does not require grad"):
        for _ in range(2):
            inputs, mask = make_batch("bert", gen)
            with tracker.token_mask(mask):
                model(**inputs).loss.backward()
            tracker.step()
    tracker.remove()
    for h in handles:
        h.remove()
    frozen = sorted(n for n, seen in grad_seen.items() if not seen)
    assert frozen == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"]
    return tracker.scores(), frozen


def test_unobserved_sites_are_kept_and_named_and_the_rest_follows_the_budget() -> None:
    scores, frozen = _frozen_bert_reading()
    assert scores.unobserved_sites == tuple(frozen)
    with pytest.warns(SelectionWarning, match=r"2 site\(s\) were never observed.*layer\.0\.attention\.output\.dense, "
                                              r"bert\.encoder\.layer\.0\.output\.dense.*unobserved='prune'"):
        sel = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"))
    # oracle: the frozen blocks kept whole; the observed ones by one density sort (ties: head before neuron,
    # then model order) into what the budget leaves
    fixed, blocks = 0.0, []
    for kind in ("head", "neuron"):
        b = getattr(scores, kind)
        start = 0
        for name, n in b.sites:
            for i in range(start, start + n):
                pc = float(b.param_count[i])
                if name in frozen:
                    fixed += pc
                else:
                    blocks.append((-float(b.outlier_aware[i]) / pc, kind, i, pc))
            start += n
    blocks.sort(key=lambda t: (t[0], ("head", "neuron").index(t[1]), t[2]))
    expect = {k: torch.zeros(len(getattr(scores, k)), dtype=torch.bool) for k in ("head", "neuron")}
    used = fixed
    for _, kind, i, pc in blocks:
        if used + pc > sel.budget * (1 + 1e-12):
            break
        used += pc
        expect[kind][i] = True
    for kind in ("head", "neuron"):
        for name, sl in sel.layout.by_site(kind).items():
            if name in frozen:
                expect[kind][sl] = True
        assert torch.equal(getattr(sel, kind), expect[kind]), kind
    assert sel.params_kept == pytest.approx(used) and used <= sel.budget
    # asked to prune them: their zero scores rank them first, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionWarning)
        pruned = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"), unobserved="prune")
    for kind in ("head", "neuron"):
        for name, m in pruned.by_site(kind).items():
            assert not m.any() if name in frozen else True, name
    with pytest.raises(ValueError, match="unobserved must be 'keep' or 'prune', got 'drop'"):
        select_blocks(scores, keep_ratio=0.5, unobserved="drop")  # type: ignore[arg-type]


def test_selection_per_site_view_and_deprecated_alias() -> None:
    scores = random_scores(random.Random(3))
    sel = select_blocks(scores, keep_ratio=0.6)
    assert Selection.site_masks is Selection.by_site
    for kind in ("head", "neuron", "hidden"):
        parts = sel.by_site(kind)
        assert list(parts) == [n for n, _ in getattr(scores, kind).sites]
        assert torch.equal(torch.cat(list(parts.values())), getattr(sel, kind))
    with pytest.raises(ValueError, match="kind must be one of head, neuron, hidden, got 'adapter'"):
        sel.by_site("adapter")
