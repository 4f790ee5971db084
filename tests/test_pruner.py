"""AdaptivePruner: the schedule against the cubic formula by hand, the kept share from module shapes,
finalize against the model's own output, exact resume, hooks, the measured-collapse warning, errors."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import nn

import apt_salience
from apt_salience import AdaptivePruner, PruningWarning, RECOMMENDED_CONFIG
from apt_salience.config import ConfigError
from apt_salience.masks import apply_masks
from tests._models import make_batch, make_model

ARCHS = ["bert", "roberta", "llama"]


def _batches(arch: str, n: int, seed: int = 1) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [make_batch(arch, g, batch=4, seq=6)[0] for _ in range(n)]


def _setup(arch: str = "bert", seed: int = 0, cfg: Any = None, **kw: Any) -> Tuple[nn.Module, Any, Any, Any]:
    model = make_model(arch, seed)
    tracker = apt_salience.attach(model, RECOMMENDED_CONFIG if cfg is None else cfg)
    pruner = AdaptivePruner(model, tracker, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, tracker, pruner, opt


def _train_step(model: nn.Module, opt: Any, batch: Dict[str, torch.Tensor]) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()


def _outputs(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train(was)
    return out


def _head_ffn_weights(model: nn.Module, arch: str) -> int:
    """Weights of Q, K, V, O and the FFN of every layer, counted from the module shapes (biases excluded)."""
    total = 0
    if arch in ("bert", "roberta"):
        for layer in getattr(model, arch).encoder.layer:
            s = layer.attention.self
            for lin in (s.query, s.key, s.value, layer.attention.output.dense, layer.intermediate.dense,
                        layer.output.dense):
                total += lin.weight.numel()
    else:
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                total += lin.weight.numel()
    return total


# ------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("start,ramp,uf,keep", [(0, 6, 1, 0.5), (3, 5, 2, 0.4), (2, 7, 3, 0.6)])
def test_schedule_is_the_cubic_formula_from_start_step(start: int, ramp: int, uf: int, keep: float) -> None:
    n = start + ramp + 4
    model, tracker, pruner, opt = _setup(cfg={**RECOMMENDED_CONFIG, "update_frequency": uf}, keep_ratio=keep,
                                         start_step=start, ramp_steps=ramp, alpha=0.2)
    seen: List[int] = []
    for s, batch in enumerate(_batches("bert", n), 1):
        _train_step(model, opt, batch)
        tracker.step()
        if pruner.step():
            seen.append(s)
            t = min(max(s - start, 0), ramp)
            gamma = keep + (1 - keep) * (1 - t / ramp) ** 3  # by hand
            sel = pruner.selection
            assert sel is not None
            assert pruner.current_keep_ratio == pytest.approx(gamma, abs=1e-12)
            assert sel.budget == pytest.approx(gamma * sel.params_total, rel=1e-12)
            assert sel.params_kept <= sel.budget * (1 + 1e-9)
    # a mask update exactly at the steps that published a reading, from start_step on
    assert seen == [s for s in range(1, n + 1) if s % uf == 0 and s >= start]
    tracker.detach()


def test_pruned_blocks_stay_pruned_and_masks_move_by_alpha() -> None:
    model, tracker, pruner, opt = _setup(keep_ratio=0.4, ramp_steps=4, alpha=0.25)
    prev = None
    dead: Dict[str, torch.Tensor] = {}
    for batch in _batches("bert", 12):
        _train_step(model, opt, batch)
        tracker.step()
        assert pruner.step()
        masks = pruner.masks
        assert masks is not None and pruner.selection is not None
        for kind, m in masks.items():
            keep = getattr(pruner.selection, kind)
            before = prev[kind] if prev is not None else torch.ones_like(m)
            expected = torch.where(keep, before + 0.25, before - 0.25).clamp(0, 1)  # by hand
            assert torch.equal(m, expected)
            if kind in dead:
                assert bool((m[dead[kind]] == 0).all()) and not bool(keep[dead[kind]].any())
            dead[kind] = m == 0
        prev = masks
    assert any(bool(d.any()) for d in dead.values())
    tracker.detach()


# ------------------------------------------------------------------------------------------ finalize


@pytest.mark.parametrize("arch", ARCHS)
def test_finalize_keeps_the_output_and_the_share(arch: str) -> None:
    keep = 0.5
    model, tracker, pruner, opt = _setup(arch, keep_ratio=keep, ramp_steps=4, alpha=0.5)
    before_w = _head_ffn_weights(model, arch)
    batches = _batches(arch, 9)
    for batch in batches:
        _train_step(model, opt, batch)
        tracker.step()
        pruner.step()
    masks = pruner.masks
    assert masks is not None and all(bool(((m == 0) | (m == 1)).all()) for m in masks.values())  # settled
    probe = batches[0]
    before = _outputs(model, probe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)  # hard masks: nothing to warn about
        report = pruner.finalize()
    after = _outputs(model, probe)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert report.params_after < report.params_before
    share = _head_ffn_weights(model, arch) / before_w
    sel = pruner.final_selection
    assert sel is not None
    if arch in ("bert", "roberta"):  # no grouped-query attention: every removed block leaves the shapes
        assert share <= keep + 1e-9
        assert share == pytest.approx(sel.params_kept / sel.params_total, abs=1e-12)
    else:  # GQA: a KV group goes only with all its query heads, so the shapes keep a little more
        assert sel.params_kept <= keep * sel.params_total * (1 + 1e-9) and share < 1
    # the tracker reads the new shapes
    assert tracker.attached
    _train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), probe)
    assert tracker.step()
    assert len(tracker.scores().head) == int(sel.head.sum()) + report.placeholder_heads
    tracker.detach()


def test_finalize_with_soft_masks_warns_and_equals_the_hard_masked_model() -> None:
    model, tracker, pruner, opt = _setup(keep_ratio=0.5, ramp_steps=3, alpha=0.1)
    batches = _batches("bert", 4)
    for batch in batches:
        _train_step(model, opt, batch)
        tracker.step()
        pruner.step()
    state = copy.deepcopy(model.state_dict())  # the masks are hooks: these are the unmasked weights
    with pytest.warns(PruningWarning, match=r"had not reached 0 or 1"):
        pruner.finalize()
    oracle = make_model("bert")
    oracle.load_state_dict(state)
    assert pruner.final_selection is not None
    with apply_masks(oracle, pruner.final_selection):
        expected = _outputs(oracle, batches[0])
    torch.testing.assert_close(_outputs(model, batches[0]), expected, atol=1e-5, rtol=0)
    tracker.detach()


def test_finalize_without_steps_is_retraining_free_pruning() -> None:
    model = make_model("bert")
    tracker = apt_salience.attach(model, RECOMMENDED_CONFIG)
    model(**_batches("bert", 1)[0]).loss.backward()
    tracker.step()
    scores = tracker.scores()
    pruner = AdaptivePruner(model, tracker, 0.5, ramp_steps=10)
    pruner.finalize()
    sel = apt_salience.select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"), min_per_site=1)
    assert pruner.final_selection is not None
    assert torch.equal(pruner.final_selection.head, sel.head) and torch.equal(pruner.final_selection.neuron, sel.neuron)
    tracker.detach()


# ------------------------------------------------------------------------------------------ resume


def test_resume_mid_ramp_equals_an_uninterrupted_run(tmp_path: Any) -> None:
    kw = dict(keep_ratio=0.4, start_step=2, ramp_steps=6, alpha=0.2)
    batches = _batches("bert", 14)
    model_a, tracker_a, pruner_a, opt_a = _setup(**kw)
    for batch in batches:
        _train_step(model_a, opt_a, batch)
        tracker_a.step()
        pruner_a.step()
    model_b, tracker_b, pruner_b, opt_b = _setup(**kw)
    for batch in batches[:5]:  # mid-ramp: the ramp runs over steps 2..8
        _train_step(model_b, opt_b, batch)
        tracker_b.step()
        pruner_b.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "tracker": tracker_b.state_dict(),
                "pruner": pruner_b.state_dict()}, path)
    tracker_b.detach()
    pruner_b.remove()
    ckpt = torch.load(path, weights_only=True)
    model_c, tracker_c, pruner_c, opt_c = _setup(seed=7, **kw)  # fresh objects, other initial weights
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    tracker_c.load_state_dict(ckpt["tracker"])
    pruner_c.load_state_dict(ckpt["pruner"])
    assert pruner_c.steps == 5 and pruner_c.current_keep_ratio < 1
    for batch in batches[5:]:
        _train_step(model_c, opt_c, batch)
        tracker_c.step()
        pruner_c.step()
    ma, mc = pruner_a.masks, pruner_c.masks
    assert ma is not None and mc is not None
    for kind in ma:
        assert torch.equal(ma[kind], mc[kind])
    for (na, pa), (nc, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert na == nc and torch.equal(pa, pc), na
    probe = batches[0]
    assert torch.equal(_outputs(model_a, probe), _outputs(model_c, probe))
    ra, rc = pruner_a.finalize(), pruner_c.finalize()
    assert ra.shapes == rc.shapes
    tracker_a.detach()
    tracker_c.detach()


def test_load_state_dict_with_other_settings_warns() -> None:
    model, tracker, pruner, opt = _setup(keep_ratio=0.5, ramp_steps=4)
    _train_step(model, opt, _batches("bert", 1)[0])
    tracker.step()
    pruner.step()
    state = pruner.state_dict()
    tracker.detach()
    pruner.remove()
    model2, tracker2, pruner2, _ = _setup(keep_ratio=0.3, ramp_steps=4)
    with pytest.warns(PruningWarning, match=r"keep_ratio \(0.5 -> 0.3\)"):
        pruner2.load_state_dict(state)
    assert pruner2.keep_ratio == 0.3 and pruner2.steps == 1
    with pytest.raises(ValueError, match="not an apt_salience pruner state"):
        pruner2.load_state_dict({"version": 99})
    tracker2.detach()
    # a state saved before a setting existed (pruning.unobserved) holds its default: no warning for it
    model3, tracker3, pruner3, _ = _setup(keep_ratio=0.5, ramp_steps=4)
    old = {**state, "config": {k: v for k, v in state["config"].items() if k != "unobserved"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)
        pruner3.load_state_dict(old)
    tracker3.detach()


# ------------------------------------------------------------------------------------------ hooks


def test_remove_takes_the_hooks_off_and_is_idempotent() -> None:
    model, tracker, pruner, opt = _setup(keep_ratio=0.5, ramp_steps=2, alpha=1.0)
    batch = _batches("bert", 1)[0]
    _train_step(model, opt, batch)
    tracker.step()
    pruner.step()
    tracker.detach()
    masked = _outputs(model, batch)
    pruner.remove()
    pruner.remove()
    unmasked = _outputs(model, batch)
    assert not torch.allclose(masked, unmasked)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="removed"):
        pruner.step()


# ------------------------------------------------------------------------------------------ warnings, errors


def test_measured_collapse_warns_once_with_the_figure() -> None:
    model = make_model("bert")
    tracker = apt_salience.attach(model)  # the paper's default: compressed + add
    with pytest.warns(PruningWarning) as rec:
        pruner = AdaptivePruner(model, tracker, 0.5, ramp_steps=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for batch in _batches("bert", 3):
            _train_step(model, opt, batch)
            tracker.step()
            pruner.step()
    msgs = [str(w.message) for w in rec if issubclass(w.category, PruningWarning)]
    assert len(msgs) == 1
    assert "41.2%" in msgs[0] and "compressed" in msgs[0] and "fisher" in msgs[0] and "scaled" in msgs[0]
    tracker.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)
        for cfg, alloc in ((RECOMMENDED_CONFIG, "global"), (None, "uniform")):
            model = make_model("bert")
            tr = apt_salience.attach(model, cfg)
            AdaptivePruner(model, tr, 0.5, ramp_steps=3, allocation=alloc)
            tr.detach()


def test_errors_name_the_argument_before_anything_changes() -> None:
    model = make_model("bert")
    tracker = apt_salience.attach(model, RECOMMENDED_CONFIG)
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    cases: List[Tuple[Dict[str, Any], type, str]] = [
        ({}, ValueError, "ramp_steps is required"),
        ({"ramp_steps": 0}, ConfigError, r"ramp_steps must be an integer >= 1"),
        ({"ramp_steps": 5, "keep_ratio": 1.5}, ConfigError, r"keep_ratio must be a number with 0 < keep_ratio <= 1, got 1.5"),
        ({"ramp_steps": 5, "alpha": 0}, ConfigError, r"alpha must be a number with 0 < alpha <= 1, got 0"),
        ({"ramp_steps": 5, "start_step": -1}, ConfigError, r"start_step must be an integer >= 0, got -1"),
        ({"ramp_steps": 5, "kinds": ["heads"]}, ConfigError, r"kinds must be a non-empty list .* got \['heads'\]"),
        ({"ramp_steps": 5, "allocation": "globl"}, ConfigError, r"allocation got 'globl'.*Did you mean 'global'"),
        ({"ramp_steps": 5, "score": "density"}, ConfigError, r"score got 'density'; allowed: outlier_aware, salience"),
    ]
    for kw, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            AdaptivePruner(model, tracker, **kw)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    with pytest.raises(ValueError, match="another model"):
        AdaptivePruner(make_model("bert"), tracker, 0.5, ramp_steps=3)
    with pytest.raises(TypeError, match="SalienceTracker"):
        AdaptivePruner(model, object(), 0.5, ramp_steps=3)
    pruner = AdaptivePruner(model, tracker, 0.5, ramp_steps=3)
    with pytest.raises(ValueError, match="finalize needs a reading"):
        pruner.finalize()
    tracker.detach()
    with pytest.raises(ValueError, match="detached"):
        AdaptivePruner(model, tracker, 0.5, ramp_steps=3)


def test_pruning_section_of_the_config_is_the_default() -> None:
    model = make_model("bert")
    cfg = {**RECOMMENDED_CONFIG, "pruning": {"keep_ratio": 0.3, "ramp_steps": 9, "alpha": 0.5, "kinds": ["neuron"]}}
    tracker = apt_salience.attach(model, cfg)
    pruner = AdaptivePruner(model, tracker)
    assert (pruner.keep_ratio, pruner.config.ramp_steps, pruner.config.alpha, pruner.config.kinds) == (
        0.3, 9, 0.5, ("neuron",))
    assert AdaptivePruner(model, tracker, 0.6, config={"pruning": {"ramp_steps": 2}}).config.ramp_steps == 2
    model(**_batches("bert", 1)[0]).loss.backward()
    tracker.step()
    pruner.step()
    assert pruner.selection is not None and bool(pruner.selection.head.all())  # heads are not pruned
    tracker.detach()


@pytest.mark.parametrize("policy", ["keep", "prune"])
def test_blocks_of_frozen_unobserved_layers_are_kept_unless_asked(policy: str) -> None:
    from apt_salience.selection import SelectionWarning

    model = make_model("bert", layers=3)
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)  # its sites' inputs never require grad
    frozen = ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense")
    cfg = {**RECOMMENDED_CONFIG, "pruning": {"unobserved": policy}}
    tracker = apt_salience.attach(model, cfg)
    pruner = AdaptivePruner(model, tracker, keep_ratio=0.5, ramp_steps=1, alpha=1.0, min_per_site=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for batch in _batches("bert", 2):
            _train_step(model, opt, batch)
            tracker.step()
            pruner.step()
    selection_warnings = [str(w.message) for w in seen if issubclass(w.category, SelectionWarning)]
    masks = pruner.masks
    assert masks is not None and tracker.scores().unobserved_sites == frozen
    lay = pruner.selection.layout  # type: ignore[union-attr]
    for kind in ("head", "neuron"):
        for name, sl in lay.by_site(kind).items():
            if name in frozen:  # kept whole by default; ranked first for pruning (salience 0) when asked
                assert bool((masks[kind][sl] == (1.0 if policy == "keep" else 0.0)).all()), (kind, name)
    assert pruner.kept_share <= 0.5 + 1e-9
    assert bool(selection_warnings) == (policy == "keep")
    assert all(frozen[0] in m and frozen[1] in m for m in selection_warnings)
    pruner.remove()
    tracker.remove()
