"""The seed's pure functions (apt_salience.salience) against independent float64 references."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from apt_salience import compute_activation_gradient_product, compute_kurtosis, normalize_scores
from apt_salience.moments import batch_moments, merge_moments
from apt_salience.salience import (compressed_salience, head_param_count, hidden_param_count, kurtosis_of_moments,
                                   neuron_param_count)


# ----------------------------------------------------------------------------- references
def ref_product(h: torch.Tensor, g: torch.Tensor, channel_dim: int, mask: Optional[torch.Tensor] = None) -> np.ndarray:
    """Brute force in float64 numpy: for each channel, sum |H| and sum |G| over the kept positions."""
    hn = np.moveaxis(h.double().numpy(), channel_dim, -1)
    gn = np.moveaxis(g.double().numpy(), channel_dim, -1)
    keep = np.ones(hn.shape[:-1], dtype=bool) if mask is None else mask.numpy().astype(bool)
    out = np.zeros(hn.shape[-1])
    for c in range(hn.shape[-1]):
        out[c] = np.abs(hn[..., c][keep]).sum() * np.abs(gn[..., c][keep]).sum()
    return out


def ref_kurtosis(x: torch.Tensor, channel_dim: int = -1, group: int = 1, mask: Optional[torch.Tensor] = None) -> np.ndarray:
    """scipy (Pearson, biased) per channel or per contiguous group of channels; 0 where the variance is 0."""
    xn = np.moveaxis(x.double().numpy(), channel_dim, -1)
    keep = np.ones(xn.shape[:-1], dtype=bool) if mask is None else mask.numpy().astype(bool)
    out = []
    for b in range(xn.shape[-1] // group):
        vals = xn[..., b * group : (b + 1) * group][keep].reshape(-1)
        out.append(0.0 if vals.size < 2 or np.ptp(vals) == 0 else scipy.stats.kurtosis(vals, fisher=False))
    return np.array(out)


# ----------------------------------------------------------------------------- activation x gradient
@pytest.mark.parametrize("shape,channel_dim", [((7, 5), -1), ((3, 4, 6), -1), ((3, 4, 6), 1), ((3, 4, 6), 0), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), -3)])
def test_product_matches_brute_force(shape, channel_dim, gen: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    h = torch.randn(*shape, generator=gen) * 3 - 1
    g = torch.randn(*shape, generator=gen) * 1e-3
    got = compute_activation_gradient_product(h, g, channel_dim=channel_dim)
    assert got.dtype == torch.float32 and got.shape == (shape[channel_dim],)
    np.testing.assert_allclose(got.numpy(), ref_product(h, g, channel_dim), rtol=1e-5)


def test_product_from_real_autograd_activations_and_gradients(gen: torch.Generator) -> None:
    """H is a Linear's input inside a small network; G = dL/dH captured with retain_grad."""
    torch.manual_seed(0)
    net_in, site = nn.Linear(6, 8), nn.Linear(8, 3)
    x = torch.randn(4, 5, 6, generator=gen)
    h = torch.relu(net_in(x))
    h.retain_grad()
    loss = site(h).pow(2).mean()
    loss.backward()
    assert h.grad is not None
    got = compute_activation_gradient_product(h.detach(), h.grad)
    np.testing.assert_allclose(got.numpy(), ref_product(h.detach(), h.grad, -1), rtol=1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_product_mask_excludes_padding(mask_dtype: torch.dtype, gen: torch.Generator) -> None:
    h = torch.randn(3, 5, 4, generator=gen)
    g = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).to(mask_dtype)
    got = compute_activation_gradient_product(h, g, mask=mask)
    np.testing.assert_allclose(got.numpy(), ref_product(h, g, -1, mask), rtol=1e-5)
    # padding values do not matter at all
    h2, g2 = h.clone(), g.clone()
    h2[0, 3:] = 1e6
    g2[2, 1:] = float("nan")
    torch.testing.assert_close(compute_activation_gradient_product(h2, g2, mask=mask), got)
    # channels first, mask over the remaining (batch, seq) dims
    got_cf = compute_activation_gradient_product(h.movedim(-1, 0), g.movedim(-1, 0), channel_dim=0, mask=mask)
    torch.testing.assert_close(got_cf, got)


def test_product_all_masked_is_zero(gen: torch.Generator) -> None:
    h = torch.randn(2, 3, 4, generator=gen)
    out = compute_activation_gradient_product(h, h, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert out.tolist() == [0.0] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_product_half_inputs_accumulate_in_float32(dtype: torch.dtype, gen: torch.Generator) -> None:
    # 40000 tokens of |H| ~ 2: sum |H| ~ 6e4 and the product ~ 1e9 overflow float16 and lose all
    # precision in bfloat16; a float32 accumulator keeps 1e-5.
    h = (torch.randn(200, 200, 3, generator=gen) + 2).to(dtype)
    g = (torch.randn(200, 200, 3, generator=gen) * 0.5).to(dtype)
    half_sum = h.abs().sum(dim=(0, 1), dtype=dtype).double()
    ref = ref_product(h.float(), g.float(), -1)  # float64 reference on the same half values
    assert np.abs(half_sum.numpy() - np.abs(h.double().numpy()).sum((0, 1))).max() > 10 or not torch.isfinite(half_sum).all()
    got = compute_activation_gradient_product(h, g)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    # mixed precision inputs, float64 wins
    got64 = compute_activation_gradient_product(h.double(), g)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), ref, rtol=1e-12)


def test_product_doc_example_by_hand() -> None:
    h = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    g = torch.tensor([[0.5, 1.0], [-0.5, 0.0]])
    # channel 0: (1 + 3) * (0.5 + 0.5) = 4; channel 1: (2 + 4) * (1 + 0) = 6
    assert compute_activation_gradient_product(h, g).tolist() == [4.0, 6.0]


def test_product_errors_name_argument_and_value(gen: torch.Generator) -> None:
    h = torch.randn(2, 3, 4, generator=gen)
    with pytest.raises(ValueError, match=r"activations shape \(2, 3, 4\) and gradients shape \(2, 3, 5\) differ"):
        compute_activation_gradient_product(h, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"activations is empty \(shape \(0, 4\)\)"):
        compute_activation_gradient_product(torch.empty(0, 4), torch.empty(0, 4))
    with pytest.raises(ValueError, match=r"channel_dim=3 is out of range for activations with 3 dimensions \(allowed: -3 <= channel_dim < 3\)"):
        compute_activation_gradient_product(h, h, channel_dim=3)
    with pytest.raises(ValueError, match=r"channel_dim=-4 is out of range"):
        compute_activation_gradient_product(h, h, channel_dim=-4)
    with pytest.raises(TypeError, match=r"channel_dim must be an int, got 1.0"):
        compute_activation_gradient_product(h, h, channel_dim=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"activations must have at least one dimension"):
        compute_activation_gradient_product(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"activations must be a floating-point tensor, got torch.int64"):
        compute_activation_gradient_product(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"gradients must be a torch.Tensor, got list"):
        compute_activation_gradient_product(h, [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mask shape \(3, 2\) does not match the token dimensions \(2, 3\) of activations"):
        compute_activation_gradient_product(h, h, mask=torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor or None, got list"):
        compute_activation_gradient_product(h, h, mask=[[1, 1, 1], [1, 1, 1]])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- kurtosis
def _mixed_channels(gen: torch.Generator, n: int = 600) -> torch.Tensor:
    """Channels of kurtosis ~1.8 (uniform), ~3 (normal), ~6 (Laplace), heavy (cube of normal), offset normal."""
    u = torch.rand(n, generator=gen) * 2 - 1
    z = torch.randn(n, generator=gen)
    lap = torch.distributions.Laplace(0.0, 1.0).icdf(torch.rand(n, generator=gen).clamp(1e-6, 1 - 1e-6))
    heavy = torch.randn(n, generator=gen) ** 3
    off = torch.randn(n, generator=gen) * 0.1 + 50
    return torch.stack([u, z, lap, heavy, off], dim=1)


def test_kurtosis_matches_scipy_sqrt_raw_and_excess(gen: torch.Generator) -> None:
    x = _mixed_channels(gen)
    ref = ref_kurtosis(x)
    assert ref[0] < 3 < ref[2]  # the excess clamp is exercised
    np.testing.assert_allclose(compute_kurtosis(x, sqrt=False).numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(compute_kurtosis(x).numpy(), np.sqrt(ref), rtol=1e-5)
    np.testing.assert_allclose(compute_kurtosis(x, sqrt=False, excess=True).numpy(), np.maximum(ref - 3, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(compute_kurtosis(x, excess=True).numpy(), np.sqrt(np.maximum(ref - 3, 0)), rtol=1e-5, atol=1e-7)
    assert compute_kurtosis(x).dtype in (torch.float32, torch.float64)


@pytest.mark.parametrize("channel_dim", [0, 1, -1])
def test_kurtosis_channel_dim_and_groups(channel_dim: int, gen: torch.Generator) -> None:
    x = torch.randn(4, 6, 8, generator=gen) * torch.linspace(0.5, 3, 8) + torch.linspace(-2, 2, 8)
    x[..., 2:4] = x[..., 2:4] ** 3
    x = x.movedim(-1, channel_dim) if channel_dim != -1 else x
    c = x.shape[channel_dim]
    for group in (1, 2, 4, 8) if c == 8 else (1,):
        got = compute_kurtosis(x, channel_dim=channel_dim, group_size=group, sqrt=False)
        assert got.shape == (c // group,)
        np.testing.assert_allclose(got.numpy(), ref_kurtosis(x, channel_dim, group), rtol=1e-5)


def test_kurtosis_of_head_pools_its_channels(gen: torch.Generator) -> None:
    """A head of d_head=3 channels: one distribution of tokens x 3 values (not a mean of per-channel kurtoses)."""
    x = torch.randn(500, 6, generator=gen)
    x[:, 3:] = x[:, 3:] * torch.tensor([1.0, 5.0, 0.2])  # very different scales inside head 1
    got = compute_kurtosis(x, group_size=3, sqrt=False)
    head1 = scipy.stats.kurtosis(x[:, 3:].double().reshape(-1).numpy(), fisher=False)
    per_channel_mean = scipy.stats.kurtosis(x[:, 3:].double().numpy(), axis=0, fisher=False).mean()
    assert abs(head1 - per_channel_mean) > 1  # the two readings really differ
    np.testing.assert_allclose(got[1].item(), head1, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_kurtosis_of_streamed_moments_is_the_kurtosis_of_the_whole_stream(group: int, gen: torch.Generator) -> None:
    """The tracker publishes kurtosis_of_moments of merged per-batch moments: scipy over all the rows pooled."""
    x = _mixed_channels(gen)[:, :4] * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 20.0
    parts = [batch_moments(p) for p in torch.split(x, [350, 1, 249])]
    merged = merge_moments(merge_moments(parts[0], parts[1]), parts[2])
    got = kurtosis_of_moments(merged, group_size=group)
    ref = [scipy.stats.kurtosis(x[:, i:i + group].double().reshape(-1).numpy(), fisher=False) for i in range(0, 4, group)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(kurtosis_of_moments(merged, group_size=group, sqrt=True, excess=True).numpy(),
                               np.sqrt(np.maximum(np.array(ref) - 3, 0)), rtol=1e-6, atol=1e-7)
    assert torch.equal(compute_kurtosis(x, group_size=group, sqrt=False), kurtosis_of_moments(batch_moments(x),
                                                                                               group_size=group))


def test_compressed_salience_of_streamed_sums_is_the_product_of_the_whole_step(gen: torch.Generator) -> None:
    """sum|H| and sum|G| add up over micro-batches; their product is taken once per step."""
    h, g = torch.randn(2, 5, 6, 3, generator=gen).double().unbind(0)
    a = sum(p.abs().sum(dim=(0, 1)) for p in h.split(2))
    b = sum(p.abs().sum(dim=(0, 1)) for p in g.split(2))
    brute = np.abs(h.numpy()).sum(axis=(0, 1)) * np.abs(g.numpy()).sum(axis=(0, 1))
    np.testing.assert_allclose(compressed_salience(a, b).numpy(), brute, rtol=1e-12)
    np.testing.assert_allclose(compute_activation_gradient_product(h, g).numpy(), brute, rtol=1e-12)


def test_kurtosis_mask(gen: torch.Generator) -> None:
    x = torch.randn(3, 10, 4, generator=gen)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :7] = True
    mask[1, :] = True
    mask[2, :2] = True
    x_pad = x.clone()
    x_pad[~mask] = 1e4  # padding outliers would dominate the kurtosis if counted
    got = compute_kurtosis(x_pad, mask=mask, sqrt=False)
    np.testing.assert_allclose(got.numpy(), ref_kurtosis(x, mask=mask), rtol=1e-5)
    assert compute_kurtosis(x_pad, mask=torch.zeros(3, 10)).tolist() == [0.0] * 4  # nothing kept


def test_kurtosis_offset_data_1e4_mean_over_std(offset_data: torch.Tensor) -> None:
    ref = scipy.stats.kurtosis(offset_data.double().numpy(), axis=0, fisher=False)
    np.testing.assert_allclose(compute_kurtosis(offset_data, sqrt=False).numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kurtosis_half_inputs(dtype: torch.dtype, gen: torch.Generator) -> None:
    x = _mixed_channels(gen, n=4096)
    x[:, 4] = torch.randn(4096, generator=gen) + 3.0  # keep the offset channel resolvable in half precision
    xh = x.to(dtype)
    ref = ref_kurtosis(xh.float())  # float64 reference on the same half values
    got = compute_kurtosis(xh, sqrt=False)
    assert got.dtype in (torch.float32, torch.float64)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_kurtosis_zero_variance_and_tiny_inputs_give_zero_never_nan() -> None:
    x = torch.stack([torch.zeros(50), torch.full((50,), 777.125), torch.full((50,), -3.3e4), torch.arange(50.0)], 1)
    for kw in ({}, {"sqrt": False}, {"excess": True}, {"sqrt": False, "excess": True}):
        k = compute_kurtosis(x, **kw)  # type: ignore[arg-type]
        assert torch.isfinite(k).all()
        assert k[:3].tolist() == [0.0, 0.0, 0.0]
    # discrete uniform on 50 points: Pearson kurtosis 9/5 - 12/(5 (n^2 - 1)) = 1.79904 (and scipy agrees)
    hand = 9 / 5 - 12 / (5 * (50**2 - 1))
    assert abs(scipy.stats.kurtosis(np.arange(50.0), fisher=False) - hand) < 1e-12
    assert abs(float(compute_kurtosis(x, sqrt=False)[3]) - hand) < 1e-5
    assert compute_kurtosis(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [0.0, 0.0, 0.0]  # one token
    # a head made of constant channels at different values is NOT constant
    two = torch.stack([torch.zeros(10), torch.ones(10)], 1)
    assert compute_kurtosis(two, group_size=2, sqrt=False).tolist() == [1.0]


def test_kurtosis_doc_example_by_hand() -> None:
    x = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0], [0.0, -1.0]])
    # channel 1: values +-1, E[x^4] / E[x^2]^2 = 1
    assert compute_kurtosis(x, sqrt=False).tolist() == [0.0, 1.0]


def test_kurtosis_errors(gen: torch.Generator) -> None:
    x = torch.randn(5, 6, generator=gen)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=rf"group_size must be a positive integer, got {bad!r}"):
            compute_kurtosis(x, group_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"group_size=4 does not divide the 6 channels"):
        compute_kurtosis(x, group_size=4)
    with pytest.raises(ValueError, match=r"channel_dim=2 is out of range for activations with 2 dimensions"):
        compute_kurtosis(x, channel_dim=2)
    with pytest.raises(ValueError, match=r"activations is empty \(shape \(0, 6\)\)"):
        compute_kurtosis(torch.empty(0, 6))
    with pytest.raises(ValueError, match=r"mask shape \(4,\) does not match the token dimensions \(5,\)"):
        compute_kurtosis(x, mask=torch.ones(4))


# ----------------------------------------------------------------------------- density and parameter counts
def test_normalize_scores_elementwise_and_broadcast() -> None:
    s = torch.tensor([6.0, 9.0, 1.0])
    assert normalize_scores(s, torch.tensor([2.0, 3.0, 4.0])).tolist() == [3.0, 3.0, 0.25]
    assert normalize_scores(s, [2.0, 3.0, 4.0]).tolist() == [3.0, 3.0, 0.25]
    assert normalize_scores(s, 2).tolist() == [3.0, 4.5, 0.5]
    s2 = torch.tensor([[4.0, 8.0], [6.0, 12.0]])
    assert normalize_scores(s2, torch.tensor([2.0, 4.0])).tolist() == [[2.0, 2.0], [3.0, 3.0]]
    d64 = normalize_scores(torch.tensor([1.0, 2.0], dtype=torch.float64), [3.0, 3.0])
    assert d64.dtype == torch.float64 and d64.tolist() == [1.0 / 3.0, 2.0 / 3.0]


@pytest.mark.parametrize("bad,shown", [(0.0, "0.0"), (-5.0, "-5.0"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_normalize_scores_rejects_non_positive_counts(bad: float, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"param_counts must be positive and finite; entry 1 is {shown}"):
        normalize_scores(torch.ones(3), [2.0, bad, 3.0])


def test_normalize_scores_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"scores shape \(3,\) and param_counts shape \(2,\) do not broadcast"):
        normalize_scores(torch.ones(3), [1.0, 2.0])
    with pytest.raises(ValueError, match=r"param_counts shape \(3, 1\) would broadcast scores shape \(3,\) to \(3, 3\)"):
        normalize_scores(torch.ones(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match="param_counts is empty"):
        normalize_scores(torch.ones(3), [])
    with pytest.raises(TypeError, match="scores must be a torch.Tensor, got list"):
        normalize_scores([1.0, 2.0], [1.0, 1.0])  # type: ignore[arg-type]


def _weights(*mods: nn.Module) -> int:
    return sum(m.weight.numel() for m in mods)  # type: ignore[misc]


@pytest.mark.parametrize("d_model,n_h,n_kv", [(32, 4, 4), (64, 8, 2), (48, 6, 1), (32, 4, None)])
def test_head_param_count_equals_counted_weights(d_model: int, n_h: int, n_kv: Optional[int]) -> None:
    """Build q/k/v/o projections and count their weights: GQA shares k/v among n_h / n_kv query heads."""
    d_head = d_model // n_h
    kv = n_h if n_kv is None else n_kv
    q, k, v = nn.Linear(d_model, n_h * d_head), nn.Linear(d_model, kv * d_head), nn.Linear(d_model, kv * d_head)
    o = nn.Linear(n_h * d_head, d_model)
    per_head = _weights(q, k, v, o) / n_h
    assert head_param_count(d_model, d_head, n_h, n_kv) == per_head


def test_head_param_count_paper_values() -> None:
    assert head_param_count(768, 64, 12) == 4 * 768 * 768 / 12  # the paper's 4 d_m d_m / n_h
    assert head_param_count(4096, 128, 32, num_kv_heads=8) == (2 + 2 * 8 / 32) * 128 * 4096


@pytest.mark.parametrize("gated", [False, True])
def test_neuron_param_count_equals_counted_weights(gated: bool) -> None:
    d_model, d_ff = 24, 40
    mods = [nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)] + ([nn.Linear(d_model, d_ff)] if gated else [])
    assert neuron_param_count(d_model, gated=gated) == _weights(*mods) / d_ff


def test_hidden_param_count_equals_counted_weights() -> None:
    """Two GQA decoder layers (gated FFN) and one T5-like layer with cross-attention (no FFN entry)."""
    d_model = 32
    layers = [(4, 2, 8, 64, True), (4, 2, 8, 64, True), (4, 4, 8, 0, False), (4, 4, 8, 48, False)]
    mods = []
    for n_h, n_kv, d_head, d_ff, gated in layers:
        mods += [nn.Linear(d_model, n_h * d_head), nn.Linear(d_model, n_kv * d_head), nn.Linear(d_model, n_kv * d_head),
                 nn.Linear(n_h * d_head, d_model)]
        if d_ff:
            mods += [nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)] + ([nn.Linear(d_model, d_ff)] if gated else [])
    assert hidden_param_count(layers) == _weights(*mods) / d_model
    # the paper's n_L (4 d_m + 2 n_f) for BERT-base
    assert hidden_param_count([(12, 12, 64, 3072, False)] * 12) == 12 * (4 * 768 + 2 * 3072)


def test_param_count_errors() -> None:
    with pytest.raises(ValueError, match=r"d_model must be a positive number, got 0"):
        head_param_count(0, 8, 4)
    with pytest.raises(ValueError, match=r"num_heads must be a positive number, got -1"):
        head_param_count(32, 8, -1)
    with pytest.raises(ValueError, match=r"num_kv_heads must be a positive number, got 0"):
        head_param_count(32, 8, 4, num_kv_heads=0)
    with pytest.raises(ValueError, match=r"head_dim must be a positive number, got True"):
        head_param_count(32, True, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"d_model must be a positive number, got -3"):
        neuron_param_count(-3)
    with pytest.raises(ValueError, match="hold no heads and no neurons"):
        hidden_param_count([])
    with pytest.raises(ValueError, match=r"layer 1 has d_ff=-64; must be a number >= 0"):
        hidden_param_count([(4, 4, 8, 64, False), (4, 4, 8, -64, False)])


def test_normalize_scores_with_counts_gives_density_ranking() -> None:
    """Density divides out the block size: a head with 4x the salience of a neuron can rank below it."""
    d_model = 16
    scores = torch.tensor([4.0 * neuron_param_count(d_model) * 3, 1.0 * neuron_param_count(d_model)])
    counts = torch.tensor([head_param_count(d_model, 4, 4), neuron_param_count(d_model)])
    dens = normalize_scores(scores, counts)
    # by hand: head count 4 * 4 * 16 = 256, neuron 32; densities 384 / 256 = 1.5 and 32 / 32 = 1
    assert counts.tolist() == [256.0, 32.0]
    assert dens.tolist() == [1.5, 1.0]
