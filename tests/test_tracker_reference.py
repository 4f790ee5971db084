"""The published figures equal a brute-force float64 oracle (tests/_reference.py), on every preset."""

from __future__ import annotations

import contextlib
from typing import Any, Dict

import numpy as np
import pytest
import torch

import apt_salience
from tests._models import ARCHS, FFN, HEADS, HIDDEN, head_dim_of, make_batch, make_model
from tests._reference import Capture, assert_close, discover_sites, reference_readings

GATED = {"llama", "mistral", "qwen2", "t5-gated"}
KV = {"llama": 2, "mistral": 2, "qwen2": 2}


def drive(model, tracker, arch, sites, n_steps, micro, seed=0, pad=True, loss_scale=None, batch=3, seq=6):
    """Train-less loop: forward/backward per micro-batch, tracker.step() per step. Returns (readings, records)."""
    cap = Capture(model, sites) if sites is not None else None
    gen = torch.Generator().manual_seed(seed)
    readings, records = [], []
    for _ in range(n_steps):
        for _ in range(micro):
            inputs, mask = make_batch(arch, gen, pad=pad, batch=batch, seq=seq)
            if cap is not None:
                cap.mask = mask
            ctx = tracker.token_mask(mask) if (mask is not None and tracker is not None) else contextlib.nullcontext()
            with ctx:
                loss = model(**inputs).loss
            (loss if loss_scale is None else loss * loss_scale).backward()
        if cap is not None:
            records.append(cap.collect())
        model.zero_grad(set_to_none=True)
        if tracker is not None and tracker.step():
            readings.append(tracker.scores())
    if cap is not None:
        cap.remove()
    return readings, records


def block_sizes(sites: Dict[str, str], arch: str) -> Dict[str, int]:
    return {n: (head_dim_of(arch) if k == "head" else 1) for n, k in sites.items()}


def compare(readings, expected, kinds=("head", "neuron", "hidden"), rel=1e-4):
    assert len(readings) == len(expected) > 0
    for got, exp in zip(readings, expected):
        for kind in kinds:
            bs = getattr(got, kind)
            for f in ("salience", "outlier_aware", "kurtosis"):
                assert_close(getattr(bs, f), exp[kind][f], rel=rel, what=f"{kind}.{f}")
            assert torch.allclose(bs.density, bs.outlier_aware / bs.param_count)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_preset_matches_bruteforce(arch: str) -> None:
    model = make_model(arch)
    cfg = {"update_frequency": 2, "ema_beta": 0.85}
    tracker = apt_salience.attach(model, cfg)
    assert tracker.architecture == arch.replace("-gated", "")
    sites = discover_sites(model, arch)
    assert [s.name for s in tracker.sites] == list(sites), "sites in model order"
    readings, records = drive(model, tracker, arch, sites, n_steps=4, micro=2)
    tracker.detach()
    expected = reference_readings(records, sites, block_sizes(sites, arch), update_frequency=2, beta=0.85)
    compare(readings, expected)
    # parameter counts, by hand from the tiny configs
    d_head = head_dim_of(arch)
    n_kv = KV.get(arch, HEADS)
    head_count = (2 + 2 * n_kv / HEADS) * d_head * HIDDEN
    neuron_count = (3 if arch in GATED else 2) * HIDDEN
    s = readings[-1]
    n_head_sites = sum(1 for k in sites.values() if k == "head")
    n_neuron_sites = sum(1 for k in sites.values() if k == "neuron")
    assert torch.all(s.head.param_count == head_count)
    assert torch.all(s.neuron.param_count == neuron_count)
    hidden_count = (n_head_sites * HEADS * head_count + n_neuron_sites * FFN * neuron_count) / HIDDEN
    assert torch.allclose(s.hidden.param_count, torch.full((HIDDEN,), hidden_count))
    assert s.head.sites == [(n, HEADS) for n, k in sites.items() if k == "head"]
    assert s.step == 4 and s.d_model == HIDDEN


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("mode", ["taylor", "fisher"])
def test_taylor_and_fisher_modes_match_bruteforce(arch: str, mode: str) -> None:
    model = make_model(arch)
    tracker = apt_salience.attach(model, {"update_frequency": 2, "salience": {"mode": mode}})
    sites = discover_sites(model, arch)
    readings, records = drive(model, tracker, arch, sites, n_steps=4, micro=2)
    tracker.detach()
    expected = reference_readings(records, sites, block_sizes(sites, arch), 2, 0.85, mode=mode)
    compare(readings, expected)


def test_taylor_mode_equals_weight_gradient_taylor() -> None:
    """|sum_tokens,block H*G| equals |sum over the block's input columns of W * dL/dW| (no bias path)."""
    model = make_model("llama")
    tracker = apt_salience.attach(model, {"update_frequency": 1, "ema_beta": 0.0, "kurtosis": {"enabled": False},
                                          "salience": {"mode": "taylor"}})
    gen = torch.Generator().manual_seed(3)
    inputs, _ = make_batch("llama", gen, pad=False)
    model(**inputs).loss.backward()
    assert tracker.step()
    got = tracker.scores()
    o = model.model.layers[0].self_attn.o_proj
    wg = (o.weight.detach().double() * o.weight.grad.double()).sum(0).reshape(HEADS, -1).sum(1).abs()
    assert_close(got.head.salience[:HEADS], wg.numpy(), rel=1e-4, what="taylor vs W*dW (heads)")
    d = model.model.layers[1].mlp.down_proj
    wg = (d.weight.detach().double() * d.weight.grad.double()).sum(0).abs()
    assert_close(got.neuron.salience[FFN:], wg.numpy(), rel=1e-4, what="taylor vs W*dW (neurons)")
    tracker.detach()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_kurtosis_from_outputs_matches_bruteforce(arch: str) -> None:
    model = make_model(arch)
    tracker = apt_salience.attach(model, {"update_frequency": 2, "kurtosis": {"source": "output"}})
    sites = discover_sites(model, arch)
    readings, records = drive(model, tracker, arch, sites, n_steps=2, micro=2)
    modules = dict(model.named_modules())

    def w(name):  # [out, in] -- GPT-2's Conv1D stores [in, out]
        wt = modules[name].weight.detach().double().numpy()
        return wt.T if arch == "gpt2" else wt

    tracker.detach()
    expected = reference_readings(records, sites, block_sizes(sites, arch), 2, 0.85,
                                  weights={n: w(n) for n in sites})
    compare(readings, expected)


@pytest.mark.parametrize("options", [
    {"kurtosis": {"excess": True}},
    {"kurtosis": {"enabled": False}},
    {"kurtosis": {"combine": "scaled"}},
    {"ema_beta": 0.0, "update_frequency": 1},
    {"ema_beta": 0.5, "update_frequency": 3},
])
def test_options_match_bruteforce(options: Dict[str, Any]) -> None:
    arch = "bert"
    model = make_model(arch)
    tracker = apt_salience.attach(model, options)
    sites = discover_sites(model, arch)
    uf = options.get("update_frequency", 1)
    readings, records = drive(model, tracker, arch, sites, n_steps=3 * uf if uf > 1 else 3, micro=2)
    tracker.detach()
    k = options.get("kurtosis", {})
    expected = reference_readings(records, sites, block_sizes(sites, arch), uf, options.get("ema_beta", 0.85),
                                  kurtosis=k.get("enabled", True), excess=k.get("excess", False),
                                  combine=k.get("combine", "add"))
    # sqrt(K - 3) amplifies the float32 rounding of K near K = 3 (dK ~ 1e-7 K gives ~1e-4 relative there)
    compare(readings, expected, rel=1e-3 if k.get("excess") else 1e-4)
    if not k.get("enabled", True):
        assert torch.equal(readings[-1].head.outlier_aware, readings[-1].head.salience)


def test_padding_is_excluded() -> None:
    """With the mask, padded tokens' values do not matter; without it they do."""
    arch = "bert"
    results = []
    for pad_value in (5, 60):
        model = make_model(arch)
        tracker = apt_salience.attach(model, {"ema_beta": 0.0})
        ids = torch.tensor([[2, 3, 4, 5, pad_value, pad_value], [7, 8, 9, 10, 11, 12]])
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
        with tracker.token_mask(mask):
            model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
        tracker.step()
        results.append(tracker.scores())
        tracker.detach()
    # token statistics at padded positions differ (different ids), yet masked scores agree
    assert torch.allclose(results[0].head.salience, results[1].head.salience, rtol=1e-5)
    assert torch.allclose(results[0].hidden.kurtosis, results[1].hidden.kurtosis, rtol=1e-5)


def test_gradient_accumulation_is_one_step() -> None:
    """Two micro-batches then step() give the product of the step's sums, not the sum of products."""
    arch = "bert"
    model = make_model(arch)
    tracker = apt_salience.attach(model, {"ema_beta": 0.0, "kurtosis": {"enabled": False}})
    sites = discover_sites(model, arch)
    readings, records = drive(model, tracker, arch, sites, n_steps=1, micro=2)
    n = next(iter(sites))
    (h1, g1, _, _), (h2, g2, _, _) = records[0][n]
    per_step = (np.abs(np.concatenate([h1, h2])).sum(0) * np.abs(np.concatenate([g1, g2])).sum(0))
    per_micro = np.abs(h1).sum(0) * np.abs(g1).sum(0) + np.abs(h2).sum(0) * np.abs(g2).sum(0)
    got = readings[0].head.salience[:HEADS]
    assert_close(got, per_step.reshape(HEADS, -1).sum(1), what="per-step product")
    assert not np.allclose(got.numpy(), per_micro.reshape(HEADS, -1).sum(1), rtol=1e-3)
    tracker.detach()


def test_encoder_decoder_masks() -> None:
    """T5: the encoder sites take the attention mask, the decoder sites (self and cross) the decoder mask."""
    arch = "t5"
    model = make_model(arch)
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    sites = discover_sites(model, arch)
    cap = Capture(model, sites)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 60, (3, 7), generator=gen)
    enc_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    labels = torch.randint(2, 60, (3, 4), generator=gen)
    dec_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    cap.mask, cap.decoder_mask = enc_mask, dec_mask
    with tracker.token_mask(enc_mask, decoder_mask=dec_mask):
        loss = model(input_ids=ids, attention_mask=enc_mask, labels=labels.masked_fill(dec_mask == 0, -100),
                     decoder_attention_mask=dec_mask).loss
    loss.backward()
    assert tracker.step()
    expected = reference_readings([cap.collect()], sites, block_sizes(sites, arch), 1, 0.85)
    compare([tracker.scores()], expected)
    # the encoder mask alone does not fit the decoder's tokens: a clear error naming a decoder site
    with pytest.raises(ValueError, match=r"site 'decoder\.block\.0\.layer\.0\.SelfAttention\.o'"):
        with tracker.token_mask(enc_mask):
            model(input_ids=ids, attention_mask=enc_mask, labels=labels)
    tracker.detach(); cap.remove()
