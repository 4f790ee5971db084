"""reconstruct: closed-form oracles for every site, streaming, padding, held-out error, error paths.

Oracles are computed here from the test's own hooks on the dense model and on the final
(physically pruned) model, in float64 with numpy's ``lstsq`` or the normal equations written out.
The architecture rows are every tiny preset model that ``prune_model`` supports; a preset added
to ``PRUNE_SPECS`` becomes a row of the parametrised tests without further change.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from apt_salience import reconstruct
from apt_salience.architectures import linear_weight
from apt_salience.pruning import prune_model
from apt_salience.reconstruct import ReconstructWarning
from apt_salience.selection import BlockLayout, Selection

from _models import ARCHS, make_batch, make_model


def _prunable(arch: str) -> bool:
    """Whether prune_model accepts this tiny preset model (it refuses an architecture it does not support)."""
    m = make_model(arch)
    lay = BlockLayout.from_model(m)
    keep_all = Selection(torch.ones(lay.num_blocks("head"), dtype=torch.bool),
                         torch.ones(lay.num_blocks("neuron"), dtype=torch.bool), None, 0.0, 1.0, 1.0, lay)
    try:
        prune_model(m, keep_all)
    except ValueError as e:
        if "supports" in str(e):
            return False
        raise
    return True


PRUNABLE = [a for a in ARCHS if _prunable(a)]
assert {"bert", "roberta", "llama", "mistral", "qwen2"} <= set(PRUNABLE)


def model_of(arch: str, seed: int = 0) -> nn.Module:
    return make_model(arch, seed).eval()


def batches_of(arch: str, n: int, seed: int, batch: int = 4, seq: int = 8) -> List[Dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [make_batch(arch, g, batch=batch, seq=seq)[0] for _ in range(n)]


def selection_of(model: nn.Module) -> Selection:
    """Heads: every 4th from the second dropped (with 2 KV groups of 2 this leaves a GQA placeholder);
    neurons: 3 of every 5 kept."""
    lay = BlockLayout.from_model(model)
    nh, nn_ = lay.num_blocks("head"), lay.num_blocks("neuron")
    return Selection(torch.arange(nh) % 4 != 1, torch.arange(nn_) % 5 < 3, None, 0.0, 1.0, 1.0, lay)


def site_names(sel: Selection) -> List[Tuple[str, str]]:
    return [(k, n) for k in ("head", "neuron") for n, _ in sel.layout.sites[k]]


def token_mask_of(batch: Mapping[str, Tensor], name: str) -> Optional[Tensor]:
    """The documented convention: sites under a 'decoder' module use decoder_attention_mask when the batch has one."""
    if "decoder" in name.split(".") and "decoder_attention_mask" in batch:
        return batch["decoder_attention_mask"]
    return batch.get("attention_mask")


def capture(model: nn.Module, names: List[str], batches: List[Dict[str, Tensor]],
            side: str) -> Dict[str, np.ndarray]:
    """float64 rows ([tokens, channels]) of each named module's input or output over all batches, padding dropped."""
    mods = dict(model.named_modules())
    rows: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    cur: Dict[str, Any] = {}

    def make(name: str) -> Any:
        def hook(m: nn.Module, args: Tuple[Any, ...], out: Tensor) -> None:
            t = (args[0] if side == "input" else out).detach().double()
            t2 = t.reshape(-1, t.shape[-1])
            mask = token_mask_of(cur["batch"], name)
            if mask is not None:
                t2 = t2[mask.reshape(-1) != 0]
            rows[name].append(t2.numpy())
        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                cur["batch"] = b
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) for n, v in rows.items()}


def state_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def site_weights(model: nn.Module, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    mod = dict(model.named_modules())[name]
    w = linear_weight(mod).detach().double().numpy()
    b = getattr(mod, "bias", None)
    return w, (None if b is None else b.detach().double().numpy())


def kept_columns(kind: str, keep: Tensor, block: int, final_w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(original channel indices of the selection's kept blocks, their columns in the final weight).

    The final weight keeps channels in ascending order; GQA placeholder heads are all-zero blocks
    among them (found here as the zero blocks, so the oracle does not re-derive prune_model's plan)."""
    orig = torch.arange(keep.numel() * block).view(-1, block)[keep].reshape(-1).numpy()
    if kind == "neuron":
        return orig, np.arange(final_w.shape[1])
    nb = final_w.shape[1] // block
    live = [h for h in range(nb) if np.any(final_w[:, h * block:(h + 1) * block] != 0)]
    cols = np.array([h * block + i for h in live for i in range(block)], dtype=np.int64)
    return orig, cols


# ---------------------------------------------------------------------------------------------
# The closed form at every site


CASES = [(a, "least_squares", 0.0) for a in PRUNABLE] + [(a, "least_squares", 0.3) for a in ("bert", "llama")] + [
    ("bert", "bias", 0.0), ("roberta", "bias", 0.0)]


@pytest.mark.parametrize("arch,method,damping", CASES)
def test_every_site_equals_the_closed_form_on_the_final_models_own_inputs(arch: str, method: str, damping: float) -> None:
    dense = model_of(arch)
    model = copy.deepcopy(dense)
    sel = selection_of(dense)
    cal = batches_of(arch, 5, seed=1)
    report = reconstruct(model, sel, cal, method=method, damping=damping)

    names = [n for _, n in site_names(sel)]
    y_dense = capture(dense, names, cal, "output")  # the target: dense site output on dense inputs
    x_final = capture(model, names, cal, "input")  # the pruned model's own inputs at each site
    recs = {r.name: r for r in report.sites}
    assert set(recs) == set(names)
    masks = {n: m for k in ("head", "neuron") for n, m in sel.by_site(k).items()}
    for kind, name in site_names(sel):
        block = sel.layout.block_size[name]
        w_dense, b_dense = site_weights(dense, name)
        w_final, b_final = site_weights(model, name)
        orig, cols = kept_columns(kind, masks[name], block, w_final)
        assert len(cols) == len(orig)
        X, Y = x_final[name][:, cols], y_dense[name]
        W0 = w_dense[:, orig]
        has_b = b_dense is not None
        Z = np.concatenate([X, np.ones((X.shape[0], 1))], 1) if has_b else X
        A0 = np.concatenate([W0, b_dense[:, None]], 1) if has_b else W0
        if method == "bias":
            expect_b = b_dense + (Y - X @ W0.T - b_dense).mean(0)
            np.testing.assert_allclose(w_final[:, cols], W0, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(b_final, expect_b, rtol=1e-4, atol=1e-5)
            A = np.concatenate([W0, expect_b[:, None]], 1)
        else:
            if damping == 0:
                A = np.linalg.lstsq(Z, Y, rcond=None)[0].T
            else:
                lam = damping * np.mean(np.sum(X * X, 0))
                D = np.diag([lam] * X.shape[1] + [0.0] * has_b)
                A = np.linalg.solve(Z.T @ Z + D, Z.T @ Y + D @ A0.T).T
            got = np.concatenate([w_final[:, cols], b_final[:, None]], 1) if has_b else w_final[:, cols]
            np.testing.assert_allclose(got, A, rtol=2e-3, atol=2e-4 * np.abs(A).max())
        # never worse than plain pruning on the calibration tokens, and the report says the same numbers
        sse_plain = np.sum((Y - Z @ A0.T) ** 2)
        sse_fit = np.sum((Y - Z @ A.T) ** 2)
        assert sse_fit <= sse_plain * (1 + 1e-6)
        r = recs[name]
        assert r.tokens == X.shape[0] and r.kept_channels == len(orig)
        assert r.error_before == pytest.approx(sse_plain / X.shape[0], rel=1e-3)
        assert r.error_after == pytest.approx(sse_fit / X.shape[0], rel=1e-3, abs=1e-9)
    # the pruned structure is prune_model's
    plain = copy.deepcopy(dense)
    prune_model(plain, sel)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_pruned_target_equals_a_brute_force_sequential_fit() -> None:
    """target='pruned': each site fits its own unpruned output on the pruned model's input.

    Reference written here: the dense model with the pruned channels' columns zeroed (equal to physical
    pruning), sites fitted one by one in model order, every activation kept, numpy lstsq."""
    dense = model_of("bert")
    sel = selection_of(dense)
    sel = Selection(sel.head, sel.neuron.clone(), None, 0.0, 1.0, 1.0, sel.layout)
    sel.neuron[48:] = True  # the last FFN keeps every neuron: target='pruned' leaves it alone
    cal = batches_of("bert", 5, seed=3)
    model = copy.deepcopy(dense)
    report = reconstruct(model, sel, cal, target="pruned", damping=0.0)
    assert [r.name for r in report.sites] == ["bert.encoder.layer.0.attention.output.dense",
                                              "bert.encoder.layer.0.output.dense",
                                              "bert.encoder.layer.1.attention.output.dense"]

    ref = copy.deepcopy(dense)
    mods = dict(ref.named_modules())
    order = ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
             "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]
    masks = {n: m for k in ("head", "neuron") for n, m in sel.by_site(k).items()}
    for name in order:
        block = sel.layout.block_size[name]
        keep_ch = masks[name].repeat_interleave(block).numpy()
        X = capture(ref, [name], cal, "input")[name]
        lin = mods[name]
        W, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
        Y = X @ W.T + b  # the site's own unpruned output on the pruned model's input
        Z = np.concatenate([X[:, keep_ch], np.ones((X.shape[0], 1))], 1)
        A = np.linalg.lstsq(Z, Y, rcond=None)[0].T
        W_new = np.zeros_like(W)
        W_new[:, keep_ch] = A[:, :-1]
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W_new))
            lin.bias.copy_(torch.from_numpy(A[:, -1]))
    prune_model(ref, sel)
    for name in order:
        w_ref, b_ref = site_weights(ref, name)
        w_got, b_got = site_weights(model, name)
        scale = max(np.abs(w_ref).max(), np.abs(b_ref).max())
        np.testing.assert_allclose(w_got, w_ref, rtol=2e-3, atol=2e-4 * scale)
        np.testing.assert_allclose(b_got, b_ref, rtol=2e-3, atol=2e-4 * scale)


# ---------------------------------------------------------------------------------------------
# Streaming, padding


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_streaming_over_batches_equals_one_big_batch(arch: str) -> None:
    dense = model_of(arch)
    sel = selection_of(dense)
    cal = batches_of(arch, 4, seed=5)
    big = {k: torch.cat([b[k] for b in cal]) for k in cal[0]}
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    ra = reconstruct(a, sel, cal, damping=0.05)
    rb = reconstruct(b, sel, [big], damping=0.05)
    assert ra.batches == 4 and rb.batches == 1
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)
    assert [r.tokens for r in ra.sites] == [r.tokens for r in rb.sites]


def _padded_and_unpadded(arch: str) -> Tuple[List[Dict[str, Tensor]], List[Dict[str, Tensor]], int]:
    """Right-padded batches, the same rows one by one without padding, and the number of real tokens."""
    g = torch.Generator().manual_seed(7)
    lengths = [12, 5, 9, 12, 3, 7, 10, 8]
    ids = torch.randint(2, 64, (len(lengths), 12), generator=g)
    att = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
    rows = [{"input_ids": ids[i:i + 1, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)}
            for i, n in enumerate(lengths)]
    full = {"input_ids": ids, "attention_mask": att}
    if arch.startswith("t5"):  # encoder-decoder: the decoder's own padding, decoder_attention_mask
        dec_lengths = [7, 2, 5, 6, 1, 4, 7, 3]
        dec = torch.randint(2, 64, (len(lengths), 7), generator=g)
        full.update(decoder_input_ids=dec,
                    decoder_attention_mask=(torch.arange(7)[None, :] < torch.tensor(dec_lengths)[:, None]).long())
        for r, i, m in zip(rows, range(len(rows)), dec_lengths):
            r.update(decoder_input_ids=dec[i:i + 1, :m], decoder_attention_mask=torch.ones(1, m, dtype=torch.long))
    padded = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    return padded, rows, sum(lengths)


@pytest.mark.parametrize("arch", ["bert", "llama"] + [a for a in ("t5",) if a in PRUNABLE])
def test_padding_tokens_do_not_enter_the_fit(arch: str) -> None:
    dense = model_of(arch)
    sel = selection_of(dense)
    padded, unpadded, n_tokens = _padded_and_unpadded(arch)
    a, b, c = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    reconstruct(a, sel, padded, damping=0.0)
    rb = reconstruct(b, sel, unpadded, damping=0.0)
    assert rb.sites[0].tokens == n_tokens
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-3, atol=1e-4, msg=k)
    # with padding counted (token_mask=None) the fit differs: the comparison above can fail
    reconstruct(c, sel, padded, damping=0.0, token_mask=None)
    diff = max(float((va - vc).abs().max()) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))
    assert diff > 1e-3
    # a callable token mask and a named field give the same as the default
    d = copy.deepcopy(dense)
    reconstruct(d, sel, [dict(p, keep=p["attention_mask"]) for p in padded], damping=0.0, token_mask="keep")
    e = copy.deepcopy(dense)
    reconstruct(e, sel, padded, damping=0.0, token_mask=lambda batch: batch["attention_mask"] > 0)
    for va, vd, ve in zip(a.state_dict().values(), d.state_dict().values(), e.state_dict().values()):
        assert torch.equal(va, vd) and torch.equal(va, ve)


# ---------------------------------------------------------------------------------------------
# Output error against the dense model


def output_error(model: nn.Module, dense: nn.Module, batches: List[Dict[str, Tensor]]) -> float:
    """Mean squared difference of the last hidden states over non-padding tokens."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            h = model(**b, output_hidden_states=True).hidden_states[-1]
            h0 = dense(**b, output_hidden_states=True).hidden_states[-1]
            m = b["attention_mask"].bool()
            tot += float(((h - h0)[m] ** 2).sum())
            n += int(m.sum())
    return tot / n


@pytest.mark.parametrize("arch,method,target", [
    ("bert", "least_squares", "dense"), ("bert", "least_squares", "pruned"), ("bert", "bias", "dense"),
    ("bert", "bias", "pruned"), ("llama", "least_squares", "dense"), ("llama", "least_squares", "pruned")])
def test_reconstruction_lowers_the_output_error_on_held_out_batches(arch: str, method: str, target: str) -> None:
    dense = model_of(arch)
    sel = selection_of(dense)
    cal = batches_of(arch, 12, seed=11, batch=8, seq=12)
    held = batches_of(arch, 4, seed=99, batch=8, seq=12)
    plain = copy.deepcopy(dense)
    prune_model(plain, sel)
    model = copy.deepcopy(dense)
    reconstruct(model, sel, cal, method=method, target=target, damping=0.01)
    e_plain, e_rec = output_error(plain, dense, held), output_error(model, dense, held)
    assert e_rec < 0.9 * e_plain, (e_rec, e_plain)
    assert output_error(model, dense, cal) < output_error(plain, dense, cal)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, the model unchanged


def _nan_hook(m: nn.Module, args: Tuple[Any, ...], out: Tensor) -> Tensor:
    return out * float("nan")


def _bad_calls(arch: str, dense_other: nn.Module, sel_all: Selection) -> List[Tuple[Dict[str, Any], type, str]]:
    cal = batches_of(arch, 2, seed=0)
    other_sel = selection_of(dense_other)
    wrong_mask = [dict(cal[0], keep=torch.ones(3, 5, dtype=torch.long))]
    nan_embeds = [{"inputs_embeds": torch.full((4, 8, 32), float("nan")), "attention_mask": cal[0]["attention_mask"]}]
    return [
        (dict(batches=[]), ValueError, "batches is empty"),
        (dict(batches=cal[0]), TypeError, "wrap a single batch"),
        (dict(batches=[{}]), ValueError, r"batches\[0\] is an empty dict"),
        (dict(batches=[1]), TypeError, r"batches\[0\] must be a dict"),
        (dict(batches=cal, selection=other_sel), ValueError, "another model"),
        (dict(batches=cal, selection=Selection(sel_all.head, sel_all.neuron, torch.arange(32) != 3, 0.0, 1.0, 1.0,
                                                sel_all.layout)), ValueError, "prunes 1 hidden dimension"),
        (dict(batches=cal, method="ridge"), ValueError, "method must be one of"),
        (dict(batches=cal, target="teacher"), ValueError, "target must be one of"),
        (dict(batches=cal, damping=-1.0), ValueError, "damping must be"),
        (dict(batches=cal, damping=float("nan")), ValueError, "damping must be"),
        (dict(batches=cal, token_mask=3), TypeError, "token_mask must be"),
        (dict(batches=cal, token_mask="keep"), ValueError, "no such field"),
        (dict(batches=wrong_mask, token_mask="keep"), ValueError, r"token mask of batches\[0\] has shape \(3, 5\)"),
        (dict(batches=[{"input_ids": cal[0]["input_ids"], "attention_mask": torch.zeros_like(cal[0]["input_ids"])}]),
         ValueError, "no calibration tokens"),
        (dict(batches=nan_embeds), ValueError, "non-finite values"),
    ]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_bad_input_raises_before_anything_changes(arch: str) -> None:
    model = model_of(arch)
    model.train()
    sel = selection_of(model)
    before = copy.deepcopy(model.state_dict())
    other = model_of("llama" if arch == "bert" else "bert")
    for kw, exc, msg in _bad_calls(arch, other, sel):
        kw = dict(kw)
        kw.setdefault("selection", sel)
        batches = kw.pop("batches")
        selection = kw.pop("selection")
        with pytest.raises(exc, match=msg):
            reconstruct(model, selection, batches, **kw)
        assert state_equal(model.state_dict(), before), kw
        assert model.training
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    if arch == "llama":
        with pytest.raises(ValueError, match="method='bias' needs a bias"):
            reconstruct(model, sel, batches_of(arch, 1, 0), method="bias")
        assert state_equal(model.state_dict(), before)


def _raise_hook(m: nn.Module, args: Tuple[Any, ...], out: Tensor) -> Tensor:
    raise RuntimeError("boom in the model")


@pytest.mark.parametrize("arch,fault", [("bert", "nan"), ("llama", "nan"), ("bert", "raise"), ("llama", "raise")])
def test_failure_at_a_late_site_leaves_the_model_unchanged(arch: str, fault: str) -> None:
    """The first sites are fitted (and run with their fits) before the last layer fails: nothing is written."""
    model = model_of(arch)
    sel = selection_of(model)
    before = copy.deepcopy(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    last = sel.layout.sites["neuron"][-1][0]
    producer = {"bert": last.replace("output.dense", "intermediate"), "llama": last.replace("down_proj", "up_proj")}[arch]
    hook = _nan_hook if fault == "nan" else _raise_hook
    h = dict(model.named_modules())[producer].register_forward_hook(hook)
    calls = {"n": 0}
    g = dict(model.named_modules())[producer].register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    if fault == "raise":
        h.remove()  # the execution-order pass and the first dense pass get through; a pass run with fits fails
        h = dict(model.named_modules())[producer].register_forward_hook(
            lambda m, a, o: _raise_hook(m, a, o) if calls["n"] > 2 else None)  # 2: the dense pass; 3: a pass with fits
    msg = f"non-finite values .* site '{last}'" if fault == "nan" else "boom in the model"
    try:
        with pytest.raises((ValueError, RuntimeError), match=msg):
            reconstruct(model, sel, batches_of(arch, 2, 0))
    finally:
        h.remove()
        g.remove()
    assert state_equal(model.state_dict(), before)
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects


def test_under_determined_fit_warns_and_stays_finite() -> None:
    model = model_of("bert")
    sel = selection_of(model)
    one = batches_of("bert", 1, seed=0, batch=2, seq=6)
    with pytest.warns(ReconstructWarning, match="under-determined"):
        r = reconstruct(model, sel, one, damping=0.0)
    assert all(np.isfinite(s.error_after) and s.error_after <= s.error_before + 1e-9 for s in r.sites)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_model_prune_model_cannot_prune_is_refused_before_any_pass() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    lay = BlockLayout.from_model(model, {"architecture": "custom", "sites": {"neurons": "2"}})
    sel = Selection(None, torch.tensor([True, False] * 3), None, 0.0, 1.0, 1.0, lay)
    before = copy.deepcopy(model.state_dict())
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match="preset architecture"):
        reconstruct(model, sel, [{"input": torch.randn(3, 4)}])
    h.remove()
    assert not calls and state_equal(model.state_dict(), before)
