"""``apt_salience.criteria``: every baseline criterion against hand computations, on every architecture preset.

Oracles address the modules by name (query/key/value rows, attention output columns, up / gate
rows, down columns), independently of the producer discovery in the code: on a tiny BERT in
detail, and for every preset through a table of which modules feed each site (grouped-query K/V
and GPT-2's fused QKV are not producers: their width differs from the site's input). Gradients are
the model's own ``.grad``; activation norms come from the test's own hooks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import pytest
import torch

from apt_salience import attach
from apt_salience.criteria import (
    ActivationNorms,
    WeightTaylor,
    block_groups,
    magnitude_scores,
    random_scores,
    wanda_scores,
    weight_taylor_scores,
)
from apt_salience.scores import BlockScores, SalienceScores
from apt_salience.selection import BlockLayout, select_blocks
from tests._models import ARCHS, FFN, HEAD_DIM, HEADS, head_dim_of, make_batch, make_model

LAYERS = 2


def _layers(model):
    return model.bert.encoder.layer


# ------------------------------------------------------------------------------------------------
# every preset: which modules feed each site, by name


#: preset -> [(site-name suffix, producer suffixes replacing it)]; the first matching suffix wins.
FEEDS: Dict[str, List[Tuple[str, List[str]]]] = {
    "bert": [("attention.output.dense", ["attention.self.query", "attention.self.key", "attention.self.value"]),
             ("output.dense", ["intermediate.dense"])],
    "llama": [("self_attn.o_proj", ["self_attn.q_proj"]),  # k / v: 2 KV heads, narrower than the site's input
              ("mlp.down_proj", ["mlp.gate_proj", "mlp.up_proj"])],
    "t5": [("SelfAttention.o", ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v"]),
           ("EncDecAttention.o", ["EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v"]),
           ("DenseReluDense.wo", ["DenseReluDense.wi"])],
    "gpt2": [("attn.c_proj", []),  # the fused c_attn is 3 x wider than the site's input
             ("mlp.c_proj", ["mlp.c_fc"])],
    "opt": [("self_attn.out_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]), ("fc2", ["fc1"])],
    "vit": [("attention.o_proj", ["attention.q_proj", "attention.k_proj", "attention.v_proj"]),  # transformers 5.x names
            ("mlp.fc2", ["mlp.fc1"])],
}
FEEDS["roberta"] = FEEDS["bert"]
FEEDS["mistral"] = FEEDS["qwen2"] = FEEDS["llama"]
FEEDS["t5-gated"] = FEEDS["t5"][:2] + [("DenseReluDense.wo", ["DenseReluDense.wi_0", "DenseReluDense.wi_1"])]


def _weight(mod: Any) -> torch.Tensor:
    """[out, in] of a linear, a transformers Conv1D ([in, out] stored) or a PEFT LoRA wrapper's base layer."""
    base = mod.base_layer if hasattr(mod, "base_layer") else mod
    return base.weight.t() if type(base).__name__ == "Conv1D" else base.weight


def _grad(mod: Any) -> torch.Tensor:
    base = mod.base_layer if hasattr(mod, "base_layer") else mod
    g = base.weight.grad
    return g.t() if type(base).__name__ == "Conv1D" else g


def _magnitude(mod: Any, idx: Any) -> float:
    return float(_weight(mod)[idx].detach().double().abs().sum())


def _product(mod: Any, idx: Any) -> float:
    return float((_weight(mod)[idx].detach().double() * _grad(mod)[idx].double()).sum())


def _by_hand(model: Any, sites: Sequence[Tuple[str, int]], arch: str, value: Any) -> torch.Tensor:
    """Per block of ``sites``: value(site weight columns) + sum of value(producer weight rows) (FEEDS)."""
    modules = dict(model.named_modules())
    out: List[float] = []
    for name, n_blocks in sites:
        suffix, feeds = next((suf, f) for suf, f in FEEDS[arch] if name.endswith(suf))
        site = modules[name]
        prods = [modules[name[: -len(suffix)] + f] for f in feeds]
        size = _weight(site).shape[1] // n_blocks
        for j in range(n_blocks):
            sl = slice(j * size, (j + 1) * size)
            t = value(site, (slice(None), sl))
            for p in prods:
                t = t + value(p, (sl, slice(None)))
            out.append(t)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_preset_magnitude_and_taylor_by_hand_aligned_with_the_tracker(arch: str) -> None:
    model = make_model(arch, seed=3)
    tracker = attach(model)
    with WeightTaylor(model, ema_beta=0.0) as wt:
        batch, _ = make_batch(arch, torch.Generator().manual_seed(4))
        model(**batch).loss.backward()
        tracker.step()
        wt.step()
    reading = tracker.scores()
    tracker.detach()
    layout = BlockLayout.from_model(model)
    mag, tay = magnitude_scores(model), weight_taylor_scores(model)
    for kind in ("head", "neuron"):
        block = getattr(reading, kind)
        assert layout.sites[kind] == tuple(block.sites)  # the criteria's order is the reading's
        torch.testing.assert_close(mag[kind], _by_hand(model, block.sites, arch, _magnitude), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(tay[kind], _by_hand(model, block.sites, arch, _product).abs(), rtol=1e-9, atol=1e-12)
        # streamed within one step (one backward), the same numbers
        torch.testing.assert_close(wt.scores()[kind], tay[kind], rtol=1e-9, atol=1e-12)
        if kind == "head":  # blocks of d_head input columns (T5: d_kv = 10, not d_model / heads)
            modules = dict(model.named_modules())
            assert all(_weight(modules[n]).shape[1] == c * head_dim_of(arch) for n, c in block.sites)
    # random from the model = random from the reading (same parameter counts, same order)
    for kind, v in random_scores(model, seed=2).items():
        assert torch.equal(v, random_scores(reading, seed=2)[kind])
    sel = select_blocks(reading, keep_ratio=0.5, kinds=("head", "neuron"), score=mag)
    assert 0 < sel.params_kept <= sel.budget


# ------------------------------------------------------------------------------------------------
# BERT in detail: streaming, the tracker's taylor mode, Wanda with padding, random, LoRA


def test_weight_taylor_stream_sums_signed_within_step_abs_then_ema():
    """Two micro-batches per step (signed sum), clipping after backward ignored, EMA across steps."""
    model = make_model("bert", seed=2)
    gen = torch.Generator().manual_seed(3)
    beta = 0.6
    wt = WeightTaylor(model, ema_beta=beta)
    layout = BlockLayout.from_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    exp_h = torch.zeros(LAYERS * HEADS, dtype=torch.float64)
    exp_n = torch.zeros(LAYERS * FFN, dtype=torch.float64)
    for _ in range(2):
        for _ in range(2):
            batch, _ = make_batch("bert", gen)
            model(**batch).loss.backward()
        # oracle from the accumulated .grad (= sum of both backward passes), before clipping
        h = _by_hand(model, layout.sites["head"], "bert", _product).abs()
        n = _by_hand(model, layout.sites["neuron"], "bert", _product).abs()
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


def test_random_scores_give_uniform_density_from_any_source() -> None:
    pc_head, pc_neuron = 512.0, 32.0
    mk = lambda n, pc, site: BlockScores.build(salience=torch.ones(n), kurtosis=torch.zeros(n),  # noqa: E731
                                               outlier_aware=torch.ones(n), param_count=torch.full((n,), pc),
                                               sites=[(site, n)])
    sc = SalienceScores(step=1, head=mk(400, pc_head, "a.o"), neuron=mk(4000, pc_neuron, "a.down"))
    r = random_scores(sc, seed=5)
    assert r["head"].dtype == torch.float64 and r["head"].shape == (400,) and r["neuron"].shape == (4000,)
    dh, dn = r["head"] / pc_head, r["neuron"] / pc_neuron
    for dens in (dh, dn):
        assert bool(((dens >= 0) & (dens < 1)).all())
        assert abs(float(dens.mean()) - 0.5) < 0.05  # uniform on [0, 1), whatever the kind's block size
    assert torch.equal(r["head"], random_scores(sc, seed=5)["head"])
    assert not torch.equal(r["head"], random_scores(sc, seed=6)["head"])
    layout = BlockLayout(sites={"head": (("a.o", 400),), "neuron": (("a.down", 4000),)}, block_size={"a.o": 4},
                         layers={}, d_model=8, param_count={"head": torch.full((400,), pc_head, dtype=torch.float64),
                                                            "neuron": torch.full((4000,), pc_neuron, dtype=torch.float64)})
    from_layout = random_scores(layout, seed=5)  # a BlockLayout works the same way
    assert set(from_layout) == {"head", "neuron"}
    assert torch.equal(from_layout["head"], r["head"]) and torch.equal(from_layout["neuron"], r["neuron"])
    assert set(random_scores(sc, seed=5, kinds="neuron")) == {"neuron"}
    with pytest.raises(TypeError, match="seed"):
        random_scores(sc, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module, a SalienceScores or a BlockLayout"):
        random_scores({"head": 1}, seed=0)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers, via peft
def test_lora_wrappers_count_their_base_weight_once() -> None:
    from peft import LoraConfig, get_peft_model

    plain = make_model("bert", seed=5)
    want = magnitude_scores(plain)
    peft_model = get_peft_model(make_model("bert", seed=5), LoraConfig(r=2, target_modules=["query", "value"]))
    got = magnitude_scores(peft_model)  # q / v are LoRA wrappers now: their base weights, not the adapters
    for kind in ("head", "neuron"):
        torch.testing.assert_close(got[kind], want[kind], rtol=0, atol=0)
    groups = block_groups(peft_model, kinds="head")
    assert [len(p) for _, p in groups] == [3] * LAYERS


@pytest.mark.parametrize("call", [
    lambda m: magnitude_scores(m, kinds=("hidden",)),
    lambda m: weight_taylor_scores(m, kinds=()),
    lambda m: wanda_scores(m, {}, kinds=["head", "adapter"]),
    lambda m: random_scores(m, kinds="everything"),
    lambda m: ActivationNorms(m, kinds=("neurons",)),
    lambda m: WeightTaylor(m, kinds=("hidden",)),
])
def test_kinds_outside_head_and_neuron_are_refused_before_any_hook(call: Any) -> None:
    model = make_model("bert")
    with pytest.raises(ValueError, match=r"kinds must be a non-empty subset of \('head', 'neuron'\)"):
        call(model)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_collectors_remove_their_hooks() -> None:
    model = make_model("bert")
    sites = [m for m in model.modules() if m._forward_pre_hooks]
    assert not sites
    an = ActivationNorms(model)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 2 * LAYERS
    an.detach()
    an.detach()  # idempotent
    assert all(not m._forward_pre_hooks for m in model.modules())
    wt = WeightTaylor(model)
    assert sum(len(p._backward_hooks or {}) for p in model.parameters()) > 0
    wt.detach()
    wt.detach()
    assert all(not (p._backward_hooks or {}) for p in model.parameters())
