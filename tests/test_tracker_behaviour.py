"""Tracker behaviour: checkpointing, dropped micro-batches, eval forwards, detach, dtypes, loss scaling, PEFT, errors."""

from __future__ import annotations

import re
import warnings
from typing import List

import numpy as np
import pytest
import torch
from torch import nn

import apt_salience
from apt_salience import ConfigError, SalienceWarning, TrackerStateError
from tests._models import HEADS, HIDDEN, make_batch, make_model
from tests._reference import Capture, assert_close, discover_sites, reference_readings
from tests.test_tracker_reference import block_sizes, drive


def hook_counts(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            total += len(getattr(m, attr, {}) or {})
    return total


def scores_equal(a, b, rtol=1e-5, kinds=("head", "neuron", "hidden")):
    for k in kinds:
        for f in ("salience", "kurtosis", "outlier_aware", "density"):
            x, y = getattr(getattr(a, k), f), getattr(getattr(b, k), f)
            assert torch.allclose(x, y, rtol=rtol, atol=1e-12), f"{k}.{f} differs: max {(x - y).abs().max()}"


# ----------------------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_each_activation_once(arch: str, reentrant: bool) -> None:
    plain = make_model(arch)
    t_plain = apt_salience.attach(plain, {"update_frequency": 2})
    r_plain, _ = drive(plain, t_plain, arch, None, n_steps=2, micro=2)
    ckpt = make_model(arch)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        ckpt.enable_input_require_grads()
    ckpt.train()
    t_ckpt = apt_salience.attach(ckpt, {"update_frequency": 2})
    r_ckpt, _ = drive(ckpt, t_ckpt, arch, None, n_steps=2, micro=2)
    assert t_ckpt.observed_microbatches == t_plain.observed_microbatches == 4
    scores_equal(r_plain[-1], r_ckpt[-1], rtol=1e-4)
    t_plain.detach(); t_ckpt.detach()


# ----------------------------------------------------------------------------- non-finite micro-batches

def test_poisoned_microbatch_is_dropped_whole_and_counted() -> None:
    arch = "bert"
    ref_model = make_model(arch)
    t_ref = apt_salience.attach(ref_model, {"update_frequency": 1})
    gen = torch.Generator().manual_seed(0)
    good, mask = make_batch(arch, gen)
    bad, bad_mask = make_batch(arch, gen)
    with t_ref.token_mask(mask):
        ref_model(**good).loss.backward()
    t_ref.step()

    model = make_model(arch)
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    with tracker.token_mask(mask):
        model(**good).loss.backward()
    with tracker.token_mask(bad_mask):
        (model(**bad).loss * float("inf")).backward()
    with pytest.warns(SalienceWarning, match="non-finite"):
        assert tracker.step()
    assert tracker.dropped_microbatches == 1 and tracker.observed_microbatches == 1
    scores_equal(tracker.scores(), t_ref.scores())
    for kind in ("head", "neuron", "hidden"):
        bs = getattr(tracker.scores(), kind)
        assert torch.isfinite(bs.outlier_aware).all() and torch.isfinite(bs.kurtosis).all()
    # a step whose only micro-batch is poisoned publishes nothing and leaves the EMA as it was
    with tracker.token_mask(bad_mask):
        (model(**bad).loss * float("nan")).backward()
    with pytest.warns(SalienceWarning):
        assert not tracker.step()
    assert tracker.dropped_microbatches == 2
    scores_equal(tracker.scores(), t_ref.scores())
    t_ref.detach(); tracker.detach()


def test_nonfinite_activation_is_dropped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = {"architecture": "custom", "sites": {"neurons": r"2"}}
    tracker = apt_salience.attach(model, cfg)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    model(x_bad).sum().backward()
    with pytest.warns(SalienceWarning):
        tracker.step()
    assert tracker.dropped_microbatches == 1
    assert torch.isfinite(tracker.scores().neuron.outlier_aware).all()
    tracker.detach()


# ----------------------------------------------------------------------------- what is not observed

def test_eval_and_unbackwarded_forwards_are_ignored() -> None:
    arch = "bert"
    a, b = make_model(arch), make_model(arch)
    ta, tb = apt_salience.attach(a, {"update_frequency": 2}), apt_salience.attach(b, {"update_frequency": 2})
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        inputs, mask = make_batch(arch, gen)
        noise, _ = make_batch(arch, gen)
        for model, tr in ((a, ta), (b, tb)):
            with tr.token_mask(mask):
                model(**inputs).loss.backward()
        with torch.no_grad():
            b(**noise)  # evaluation forward
        b(**noise)  # gradient-enabled forward whose backward never comes
        with tb.paused():
            b(**noise).loss.backward()  # observed nothing while paused
        ta.step(); tb.step()
    scores_equal(ta.scores(), tb.scores(), rtol=1e-6)
    assert ta.observed_microbatches == tb.observed_microbatches == 2
    ta.detach(); tb.detach()


def test_sample_every_observes_every_kth_step() -> None:
    arch = "bert"
    model = make_model(arch)
    tracker = apt_salience.attach(model, {"update_frequency": 4, "sample_every": 2})
    sites = discover_sites(model, arch)
    readings, records = drive(model, tracker, arch, sites, n_steps=4, micro=1)
    assert tracker.observed_microbatches == 2
    # the oracle sees steps 0 and 2 only: one window of those two steps
    expected = reference_readings([records[0], records[2]], sites, block_sizes(sites, arch), 2, 0.85)
    for kind in ("head", "neuron", "hidden"):
        for f in ("salience", "outlier_aware", "kurtosis"):
            assert_close(getattr(getattr(readings[0], kind), f), expected[0][kind][f], what=f"{kind}.{f}")
    tracker.detach()


# ----------------------------------------------------------------------------- detach

def test_detach_leaves_model_exactly_as_it_was() -> None:
    arch = "llama"
    model = make_model(arch)
    before_hooks = hook_counts(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    inputs, mask = make_batch(arch, gen)
    model.eval()
    with torch.no_grad():
        out_before = model(**inputs).logits.clone()
    model.train()
    tracker = apt_salience.attach(model)
    assert hook_counts(model) > before_hooks
    drive(model, tracker, arch, None, n_steps=2, micro=1)
    tracker.detach()
    tracker.detach()  # idempotent
    assert hook_counts(model) == before_hooks == 0
    assert set(model.state_dict()) == set(state_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, out_before)
    for m in model.modules():
        assert not any("apt" in a.lower() or "salience" in a.lower() for a in vars(m)), "no attributes on modules"
    # the published scores stay readable; stepping a detached tracker is an error
    assert tracker.scores().step == 2
    with pytest.raises(TrackerStateError, match="detached"):
        tracker.step()


def test_no_hook_left_after_exception_in_training_step() -> None:
    arch = "bert"
    model = make_model(arch)
    gen = torch.Generator().manual_seed(0)
    inputs, mask = make_batch(arch, gen)
    with pytest.raises(RuntimeError, match="boom"):
        with apt_salience.attach(model) as tracker:
            with tracker.token_mask(mask):
                loss = model(**inputs).loss
            raise RuntimeError("boom")
    assert hook_counts(model) == 0
    # gradients flowing after detach through tensors hooked before it are harmless
    loss.backward()
    assert not tracker.attached


def test_hooks_of_others_are_kept() -> None:
    model = make_model("bert")
    calls: List[int] = []
    mod = model.bert.encoder.layer[0].attention.output.dense
    h = mod.register_forward_hook(lambda *a: calls.append(1))
    tracker = apt_salience.attach(model)
    tracker.detach()
    assert len(mod._forward_hooks) == 1
    model(input_ids=torch.tensor([[2, 3, 4]]))
    assert calls == [1]
    h.remove()


# ----------------------------------------------------------------------------- dtypes and loss scaling

def test_bf16_model_accumulates_in_float32() -> None:
    arch = "bert"
    model = make_model(arch).to(torch.bfloat16)
    tracker = apt_salience.attach(model, {"update_frequency": 2})
    sites = discover_sites(model, arch)
    readings, records = drive(model, tracker, arch, sites, n_steps=2, micro=2)
    for g in tracker._acc.groups:  # the flat step sums and window moments of every device group
        assert g.step.dtype == torch.float32 and g.win.dtype == torch.float64
    expected = reference_readings(records, sites, block_sizes(sites, arch), 2, 0.85)
    for kind in ("head", "neuron", "hidden"):
        # bf16 values are exact inputs; only float32 accumulation separates tracker and float64 oracle
        assert_close(readings[0].__getattribute__(kind).salience, expected[0][kind]["salience"], rel=1e-4, what=kind)
        assert_close(readings[0].__getattribute__(kind).kurtosis, expected[0][kind]["kurtosis"], rel=1e-3, what=kind)
    tracker.detach()


def test_bf16_autocast_matches_oracle() -> None:
    arch = "llama"
    model = make_model(arch)
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    sites = discover_sites(model, arch)
    cap = Capture(model, sites)
    gen = torch.Generator().manual_seed(0)
    inputs, mask = make_batch(arch, gen)
    cap.mask = mask
    with tracker.token_mask(mask), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    tracker.step()
    expected = reference_readings([cap.collect()], sites, block_sizes(sites, arch), 1, 0.85)
    assert_close(tracker.scores().head.salience, expected[0]["head"]["salience"], rel=1e-4, what="autocast heads")
    assert_close(tracker.scores().neuron.outlier_aware, expected[0]["neuron"]["outlier_aware"], rel=1e-3, what="neurons")
    tracker.detach(); cap.remove()


def _scaled_run(init_scale: float, growth_interval: int) -> apt_salience.SalienceScores:
    arch = "bert"
    model = make_model(arch)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: identical weights in every run
    tracker = apt_salience.attach(model, {"update_frequency": 2}, scaler=scaler)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for _ in range(2):
            inputs, mask = make_batch(arch, gen)
            with tracker.token_mask(mask):
                loss = model(**inputs).loss
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        tracker.step()
    tracker.detach()
    return tracker.scores()


def test_grad_scaler_scale_is_divided_out() -> None:
    one = _scaled_run(1.0, 10_000)
    big = _scaled_run(1024.0, 10_000)
    growing = _scaled_run(64.0, 1)  # the scale doubles after every step
    scores_equal(one, big, rtol=1e-5)
    scores_equal(one, growing, rtol=1e-5)


# ----------------------------------------------------------------------------- PEFT LoRA

def test_peft_lora_sites_and_adapter_ranks_match_oracle() -> None:
    import peft  # a test dependency: a missing peft must fail, not skip
    arch = "bert"
    base = make_model(arch)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value", "dense"],
                           init_lora_weights=False)
    model = peft.get_peft_model(base, lcfg)
    model.train()
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    names = [s.name for s in tracker.sites]
    assert not any(".lora_A" in n or n.endswith("base_layer") for n, k in zip(names, [s.kind for s in tracker.sites]) if k != "adapter")
    heads = [s.name for s in tracker.sites if s.kind == "head"]
    assert heads == [f"base_model.model.bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    adapters = [s for s in tracker.sites if s.kind == "adapter"]
    # query, value, attention.output.dense, intermediate.dense, output.dense per layer, plus the pooler's dense
    assert [s.name for s in adapters] == [n for n, _ in model.named_modules() if n.endswith(".lora_B.default")]
    assert len(adapters) == 2 * 5 + 1
    sites = discover_sites(model, arch)
    for s in adapters:
        sites[s.name] = "adapter"
    order = [n for n, _ in model.named_modules() if n in sites]
    sites = {n: sites[n] for n in order}
    assert order == names
    bsz = {n: (8 if k == "head" else 1) for n, k in sites.items()}
    readings, records = drive(model, tracker, arch, sites, n_steps=2, micro=1)
    expected = reference_readings(records, sites, bsz, 1, 0.85)
    for kind in ("head", "neuron", "hidden", "adapter"):
        for f in ("salience", "outlier_aware", "kurtosis"):
            assert_close(getattr(getattr(readings[-1], kind), f), expected[-1][kind][f], what=f"{kind}.{f}")
    # adapter parameter count per rank: lora_A in_features + lora_B out_features
    a = readings[-1].adapter
    assert a.sites[0][1] == 4
    assert torch.all(a.param_count[:4] == HIDDEN + HIDDEN)
    totals = a.site_totals("salience")
    assert set(totals) == {s.name for s in adapters}
    assert all(v > 0 for v in totals.values())
    tracker.detach()
    assert hook_counts(model) == 0


# ----------------------------------------------------------------------------- errors, before any hook

class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, 8)
        self.attn_out = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.down = nn.Linear(16, 8)
        self.up = nn.Linear(8, 16)

    def forward(self, x):
        return self.down(self.act(self.up(self.attn_out(self.proj_in(x)))))


def test_unknown_model_error_lists_modules_and_fix() -> None:
    model = Plain()
    with pytest.raises(ConfigError) as info:
        apt_salience.attach(model)
    msg = str(info.value)
    assert "could not recognise" in msg and "attn_out" in msg and "down" in msg
    assert "architecture: custom" in msg and "heads:" in msg and "head_dim" in msg
    assert hook_counts(model) == 0


@pytest.mark.parametrize("cfg, match", [
    ({"architecture": "custom", "sites": {"heads": "attn_out"}}, "sites.head_dim"),
    ({"architecture": "custom", "sites": {"heads": "attn_out", "head_dim": 3}}, "not a multiple of head_dim=3"),
    ({"architecture": "custom", "sites": {"neurons": "act"}}, "is a ReLU, not an nn.Linear"),
    ({"architecture": "custom", "sites": {"neurons": "down|up", "heads": "down", "head_dim": 4}}, "more than one kind"),
    ({"architecture": "custom", "sites": {"neurons": "nothing_here"}}, "no sites matched"),
    ({"architecture": "custom", "sites": {"neurons": "down|up"}}, "different hidden sizes"),
    ({"update_frequency": 0}, "update_frequency"),
    ({"kurtosis": {"sorce": "output"}}, "Did you mean 'source'"),
])
def test_bad_input_raises_before_any_hook(cfg, match) -> None:
    model = Plain()
    with pytest.raises(ConfigError, match=re.escape(match)):
        apt_salience.attach(model, cfg)
    assert hook_counts(model) == 0


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apt_salience.attach("not a model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GradScaler"):
        apt_salience.attach(Plain(), {"architecture": "custom", "sites": {"neurons": "down"}}, scaler=object())


def test_scores_before_first_reading_and_mask_mismatch() -> None:
    model = make_model("bert")
    tracker = apt_salience.attach(model, {"update_frequency": 3})
    with pytest.raises(TrackerStateError, match="no reading has been published yet"):
        tracker.scores()
    ids = torch.randint(2, 60, (2, 5))
    with pytest.raises(ValueError, match=r"token_mask shape \(2, 4\).*site 'bert\.encoder\.layer\.0\.attention\.output\.dense'"):
        with tracker.token_mask(torch.ones(2, 4)):
            model(input_ids=ids)
    with pytest.raises(TypeError, match="torch.Tensor"):
        with tracker.token_mask([[1, 1]]):  # type: ignore[arg-type]
            pass
    tracker.detach()


def test_frozen_input_warns_once_naming_site_and_fix() -> None:
    torch.manual_seed(0)
    model = Plain()
    tracker = apt_salience.attach(model, {"architecture": "custom", "sites": {"heads": "proj_in", "neurons": "down",
                                                                               "head_dim": 4}})
    x = torch.randn(3, 8)  # no requires_grad: proj_in's input has no gradient
    with pytest.warns(SalienceWarning, match=r"'proj_in'.*enable_input_require_grads"):
        model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # only once
    assert tracker.step()
    assert torch.all(tracker.scores().head.salience == 0)
    assert tracker.scores().neuron.salience.sum() > 0
    assert tracker.scores().unobserved_sites == ("proj_in",)
    # once its input requires grad (the layers below unfrozen), the site is scored and no longer listed
    model(x.clone().requires_grad_()).sum().backward()
    assert tracker.step()
    assert tracker.scores().unobserved_sites == ()
    assert torch.all(tracker.scores().head.salience > 0)
    tracker.detach()


# ----------------------------------------------------------------------------- refresh after shrinking

def test_refresh_reads_current_shapes() -> None:
    model = make_model("bert")
    tracker = apt_salience.attach(model)
    layer = model.bert.encoder.layer[0]
    layer.intermediate.dense = nn.Linear(HIDDEN, 20)
    layer.output.dense = nn.Linear(20, HIDDEN)
    tracker.refresh()
    drive(model, tracker, "bert", None, n_steps=1, micro=1)
    s = tracker.scores()
    assert s.neuron.sites == [("bert.encoder.layer.0.output.dense", 20), ("bert.encoder.layer.1.output.dense", 48)]
    assert s.hidden.param_count[0].item() == pytest.approx((2 * HEADS * 4 * 8 * HIDDEN + (20 + 48) * 2 * HIDDEN) / HIDDEN)
    tracker.detach()
    assert hook_counts(model) == 0


def test_uncertainty_follows_adalora_recursion() -> None:
    arch = "bert"
    model = make_model(arch)
    tracker = apt_salience.attach(model, {"update_frequency": 1, "ema_beta": 0.85, "uncertainty_beta": 0.7})
    sites = discover_sites(model, arch)
    readings, records = drive(model, tracker, arch, sites, n_steps=3, micro=1)
    expected = reference_readings(records, sites, block_sizes(sites, arch), 1, 0.85)
    u = np.zeros_like(expected[0]["head"]["outlier_aware"])
    prev = np.zeros_like(u)
    for r in expected:  # recover the window's S_hat from consecutive EMA values
        oa = r["head"]["outlier_aware"]
        s_hat = (oa - 0.85 * prev) / 0.15
        u = 0.7 * u + 0.3 * np.abs(s_hat - oa)
        prev = oa
    assert_close(tracker.scores().head.uncertainty, u, rel=1e-3, what="uncertainty")  # in the reading
    assert torch.equal(tracker.uncertainty()["head"], tracker.scores().head.uncertainty)
    tracker.detach()
    with pytest.raises(TrackerStateError, match="uncertainty_beta"):
        apt_salience.attach(make_model(arch)).uncertainty()
