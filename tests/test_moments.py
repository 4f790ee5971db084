"""Streaming moments (apt_salience.moments) against independent float64 two-pass references and scipy."""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from apt_salience.moments import (
    Moments,
    StreamingMoments,
    batch_moments,
    kurtosis_from_moments,
    merge_all,
    merge_moments,
    pool_moments,
)

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- references
def two_pass(x: torch.Tensor) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n, mean, M2, M3, M4) of each column, float64 two-pass (mean first, then central sums)."""
    a = x.detach().to(torch.float64).numpy()
    n = a.shape[0]
    mu = a.mean(axis=0)
    d = a - mu
    return n, mu, (d**2).sum(0), (d**3).sum(0), (d**4).sum(0)


def two_pass_kurtosis(x: torch.Tensor) -> np.ndarray:
    n, mu, m2, _, m4 = two_pass(x)
    out = np.zeros_like(mu)
    ok = (m2 > 0) & (n >= 2)
    out[ok] = n * m4[ok] / m2[ok] ** 2
    return out


def naive_power_sum_kurtosis(x: torch.Tensor) -> np.ndarray:
    """What the design forbids: sum x, sum x^2, sum x^3, sum x^4 (in float64), then expand."""
    a = x.to(torch.float64).numpy()
    n = a.shape[0]
    s1, s2, s3, s4 = ((a**p).sum(0) / n for p in range(1, 5))
    var = s2 - s1**2
    m4 = s4 - 4 * s1 * s3 + 6 * s1**2 * s2 - 3 * s1**4
    return m4 / var**2


def assert_moments_close(m: Moments, x: torch.Tensor, rel: float = 1e-5) -> None:
    n, mu, m2, m3, m4 = two_pass(x)
    assert float(m.n) == n
    got = [t.detach().cpu().double().numpy() for t in (m.mean, m.m2, m.m3, m.m4)]
    sigma = np.sqrt(m2 / max(n, 1))
    scale = np.abs(mu) + sigma
    # float32 data: the mean is good to float32 resolution of the values (or better)
    assert np.all(np.abs(got[0] - mu) <= 1e-6 * scale + 1e-300)
    np.testing.assert_allclose(got[1], m2, rtol=rel, atol=1e-300)
    # M3 can be ~0 by symmetry: compare on the scale n * sigma^3
    assert np.all(np.abs(got[2] - m3) <= rel * n * sigma**3 + 1e-300)
    np.testing.assert_allclose(got[3], m4, rtol=rel, atol=1e-300)


def random_tree_merge(parts: List[Moments], picks: List[Tuple[int, int, bool]]) -> Moments:
    """Merge ``parts`` in an arbitrary order: repeatedly merge two chosen parts (either way round)."""
    parts = list(parts)
    for i_raw, j_raw, swap in picks:
        if len(parts) == 1:
            break
        i = i_raw % len(parts)
        a = parts.pop(i)
        j = j_raw % len(parts)
        b = parts.pop(j)
        parts.append(merge_moments(b, a) if swap else merge_moments(a, b))
    while len(parts) > 1:
        b = parts.pop()
        a = parts.pop()
        parts.append(merge_moments(a, b))
    return parts[0]


def split(x: torch.Tensor, cuts: List[int]) -> List[torch.Tensor]:
    bounds = [0] + sorted(c % (x.shape[0] + 1) for c in cuts) + [x.shape[0]]
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------- the |mean| >> std contract
def test_naive_power_sums_fail_on_offset_data_even_in_float64(offset_data: torch.Tensor) -> None:
    """The precision test below is meaningful: the naive formula is off by far more than 1e-5."""
    ref = scipy.stats.kurtosis(offset_data.double().numpy(), axis=0, fisher=False)
    naive = naive_power_sum_kurtosis(offset_data)
    rel = np.abs(naive / ref - 1)
    assert np.nanmax(rel) > 1e-2  # (observed: order 1, i.e. 100 %, on several channels)
    assert np.sum(~(rel <= 1e-5)) >= 3  # most channels fail, not one unlucky one


@pytest.mark.parametrize(
    "sizes",
    [
        [20000],
        [1, 7, 3000, 9000, 7992],
        [5000] * 4,
        [1] * 50 + [19950],
        [0, 20000, 0],
    ],
)
def test_streaming_kurtosis_matches_float64_two_pass_on_offset_data(offset_data: torch.Tensor, sizes: List[int]) -> None:
    ref = scipy.stats.kurtosis(offset_data.double().numpy(), axis=0, fisher=False)
    np.testing.assert_allclose(two_pass_kurtosis(offset_data), ref, rtol=1e-12)  # two references agree
    acc = StreamingMoments(6)
    for part in torch.split(offset_data, sizes):
        acc.update(part)
    k = acc.kurtosis().numpy()
    assert np.all(np.isfinite(k))
    np.testing.assert_allclose(k, ref, rtol=1e-5)
    assert_moments_close(acc.moments, offset_data)


def test_offset_data_merge_of_accumulators_in_reverse_and_tree_order(offset_data: torch.Tensor) -> None:
    ref = scipy.stats.kurtosis(offset_data.double().numpy(), axis=0, fisher=False)
    chunks = torch.split(offset_data, 1333)
    accs = []
    for c in chunks:
        a = StreamingMoments(6)
        a.update(c)
        accs.append(a)
    rev = StreamingMoments(6)
    for a in reversed(accs):
        rev.merge(a)
    np.testing.assert_allclose(rev.kurtosis().numpy(), ref, rtol=1e-5)
    tree = [a.moments for a in accs]
    while len(tree) > 1:  # balanced pairwise merge
        tree = [merge_moments(tree[i], tree[i + 1]) if i + 1 < len(tree) else tree[i] for i in range(0, len(tree), 2)]
    np.testing.assert_allclose(kurtosis_from_moments(tree[0]).numpy(), ref, rtol=1e-5)


def test_batch_moments_on_offset_data_all_orders(offset_data: torch.Tensor) -> None:
    assert_moments_close(batch_moments(offset_data), offset_data, rel=1e-5)


# ----------------------------------------------------------------------------- property tests
@st.composite
def stream_case(draw: st.DrawFn) -> Tuple[torch.Tensor, List[int], List[Tuple[int, int, bool]]]:
    n = draw(st.integers(1, 300))
    c = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    log_ratio = draw(st.floats(0.0, 4.0))  # |mean| / std in [1, 1e4]
    outliers = draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(seed)
    std = 10 ** (torch.rand(c, generator=g, dtype=torch.float64) * 2 - 1)  # 0.1 .. 10
    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * std + sign * std * 10**log_ratio
    for _ in range(outliers):
        i, j = int(torch.randint(n, (1,), generator=g)), int(torch.randint(c, (1,), generator=g))
        x[i, j] += float(torch.randn((), generator=g, dtype=torch.float64)) * 50 * std[j]
    cuts = draw(st.lists(st.integers(0, n), max_size=8))
    picks = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.booleans()), max_size=10))
    return x.float(), cuts, picks


@HYP
@given(stream_case())
def test_property_any_split_any_merge_order_equals_two_pass(case) -> None:  # type: ignore[no-untyped-def]
    x, cuts, picks = case
    parts = [batch_moments(p) for p in split(x, cuts)]
    merged = random_tree_merge(parts, picks)
    assert_moments_close(merged, x)
    ref = two_pass_kurtosis(x)
    k = kurtosis_from_moments(merged).numpy()
    assert np.all(np.isfinite(k))
    np.testing.assert_allclose(k, ref, rtol=1e-5, atol=1e-9)
    if x.shape[0] >= 2:
        np.testing.assert_allclose(k, scipy.stats.kurtosis(x.double().numpy(), axis=0, fisher=False), rtol=1e-5)


@HYP
@given(stream_case(), st.integers(1, 4))
def test_property_pooling_equals_pooling_the_raw_data(case, group) -> None:  # type: ignore[no-untyped-def]
    x, cuts, picks = case
    n, c = x.shape
    wide = torch.cat([x * (1.0 + 0.5 * k) + 3.0 * k for k in range(group)], dim=1)  # [n, c*group], varied columns
    wide = wide[:, torch.randperm(wide.shape[1], generator=torch.Generator().manual_seed(c))]
    blocks = wide.shape[1] // group
    # raw pooling: block b's values are all n x group entries of columns b*group .. (b+1)*group-1
    raw = wide.reshape(n, blocks, group).permute(0, 2, 1).reshape(n * group, blocks)
    parts = [batch_moments(p) for p in split(wide, cuts)]
    merged_then_pooled = pool_moments(random_tree_merge(parts, picks), group)
    assert_moments_close(merged_then_pooled, raw)
    pooled_then_merged = random_tree_merge([pool_moments(p, group) for p in parts], list(reversed(picks)))
    assert_moments_close(pooled_then_merged, raw)
    k = kurtosis_from_moments(merged_then_pooled).numpy()
    np.testing.assert_allclose(k, two_pass_kurtosis(raw), rtol=1e-5, atol=1e-9)


@HYP
@given(stream_case(), st.integers(0, 300))
def test_property_state_dict_resume_equals_uninterrupted(case, at) -> None:  # type: ignore[no-untyped-def]
    x, cuts, _ = case
    pieces = split(x, cuts)
    at = at % (len(pieces) + 1)
    full = StreamingMoments(x.shape[1])
    for p in pieces:
        full.update(p)
    first = StreamingMoments(x.shape[1])
    for p in pieces[:at]:
        first.update(p)
    resumed = StreamingMoments(x.shape[1])
    resumed.load_state_dict(first.state_dict())
    for p in pieces[at:]:
        resumed.update(p)
    for a, b in zip(full.moments, resumed.moments):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- class behaviour
def test_pooled_accumulator_matches_scipy_on_group_values() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 12, generator=g) * torch.linspace(0.5, 4, 12) + torch.linspace(-3, 3, 12)
    x[:, 4:8] = x[:, 4:8] ** 3  # a heavy-tailed head
    acc = StreamingMoments(12)
    acc.update(x[:150])
    acc.update(x[150:])
    pooled = acc.pooled(4)
    assert pooled.num_channels == 3 and pooled.count == 1600.0
    ref = [scipy.stats.kurtosis(x[:, 4 * h : 4 * h + 4].double().reshape(-1).numpy(), fisher=False) for h in range(3)]
    np.testing.assert_allclose(pooled.kurtosis().numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(pooled.kurtosis(excess=True).numpy(), np.maximum(np.array(ref) - 3, 0), rtol=1e-6, atol=1e-9)
    assert acc.num_channels == 12  # pooling does not alter the source


@pytest.mark.parametrize("channel_dim", [0, 1, 2, -1, -2])
def test_update_channel_dim(channel_dim: int, gen: torch.Generator) -> None:
    x = torch.randn(3, 4, 5, generator=gen) * 2 + 1
    c = x.shape[channel_dim]
    acc = StreamingMoments(c)
    acc.update(x, channel_dim=channel_dim)
    flat = x.movedim(channel_dim, -1).reshape(-1, c)
    assert_moments_close(acc.moments, flat)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32_or_better(dtype: torch.dtype, gen: torch.Generator) -> None:
    # 8192 values around 3 +- 1: a half-precision accumulator would be off by far more than 1e-5
    x = (torch.randn(8192, 3, generator=gen) + 3).to(dtype)
    assert x.sum(0, dtype=dtype).double().sub(x.double().sum(0)).abs().max() > 1  # half sums really are bad
    acc = StreamingMoments(3)
    for part in torch.split(x, 1000):
        acc.update(part)
    assert acc.mean.dtype == torch.float64
    assert_moments_close(acc.moments, x.double(), rel=1e-5)
    np.testing.assert_allclose(
        acc.kurtosis().numpy(), scipy.stats.kurtosis(x.double().numpy(), axis=0, fisher=False), rtol=1e-5
    )


@pytest.mark.parametrize("ratio", [1e2, 1e5, 1e6, 1e7])
def test_float32_data_far_from_zero_keeps_its_kurtosis(ratio: float) -> None:
    """|mean| / std up to 1e7 (values quantised to ~1 std): still the kurtosis of those float32 values."""
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(3000, 3, generator=g, dtype=torch.float64)
    x64[:, 1] = x64[:, 1] ** 3  # heavy tails
    x = (x64 + ratio * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)).float()
    x[:, 2] = x[0, 2]  # a constant channel at the same magnitude
    ref = scipy.stats.kurtosis(x.double().numpy(), axis=0, fisher=False)
    acc = StreamingMoments(3)
    for part in torch.split(x, 700):
        acc.update(part)
    k = acc.kurtosis().numpy()
    np.testing.assert_allclose(k[:2], ref[:2], rtol=1e-5)
    assert k[2] == 0.0


def test_float64_input_is_reduced_in_float64() -> None:
    g = torch.Generator().manual_seed(5)
    # |mean| / std = 1e7: a float32 reduction could not even resolve the values (ulp ~ 0.6 std)
    x = torch.randn(5000, 2, generator=g, dtype=torch.float64) * 1e-3 + 1e4
    m = batch_moments(x)
    assert_moments_close(m, x, rel=1e-6)
    np.testing.assert_allclose(
        kurtosis_from_moments(m).numpy(), scipy.stats.kurtosis(x.numpy(), axis=0, fisher=False), rtol=1e-6
    )


def test_degenerate_channels_give_zero_never_nan() -> None:
    x = torch.stack(
        [
            torch.full((64,), 12345.678),  # constant with a large mean (float32 rounding noise)
            torch.zeros(64),  # constant zero
            torch.linspace(-1, 1, 64),  # a normal channel
        ],
        dim=1,
    )
    acc = StreamingMoments(3)
    for part in torch.split(x, 10):
        acc.update(part)
    for excess in (False, True):
        k = acc.kurtosis(excess=excess)
        assert torch.isfinite(k).all()
        assert k[0] == 0 and k[1] == 0
    ref = scipy.stats.kurtosis(x[:, 2].double().numpy(), fisher=False)
    assert abs(float(acc.kurtosis()[2]) - ref) < 1e-6 * ref
    # fewer than two values, and an empty accumulator
    one = StreamingMoments(2)
    one.update(torch.tensor([[1.0, -5.0]]))
    assert one.kurtosis().tolist() == [0.0, 0.0]
    assert StreamingMoments(2).kurtosis().tolist() == [0.0, 0.0]


def test_kurtosis_excess_clamps_at_zero() -> None:
    x = torch.zeros(20, 2)
    x[:, 0] = torch.tensor([-1.0, 1.0]).repeat(10)  # kurtosis 1
    x[0, 1] = 10.0  # one spike among zeros: kurtosis 18.05
    acc = StreamingMoments(2)
    acc.update(x)
    ref = scipy.stats.kurtosis(x.double().numpy(), axis=0, fisher=False)
    assert ref[0] < 3 < ref[1]
    np.testing.assert_allclose(acc.kurtosis().numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(acc.kurtosis(excess=True).numpy(), [0.0, ref[1] - 3], rtol=1e-12, atol=0)


def test_empty_batches_and_empty_merges_are_identities(gen: torch.Generator) -> None:
    x = torch.randn(50, 3, generator=gen)
    acc = StreamingMoments(3)
    acc.update(torch.empty(0, 3))
    acc.update(x)
    acc.update(torch.empty(0, 3))
    acc.merge(StreamingMoments(3))
    assert_moments_close(acc.moments, x, rel=1e-6)
    other = StreamingMoments(3)
    other.merge(acc)
    for a, b in zip(other.moments, acc.moments):
        torch.testing.assert_close(a, b)


def test_merge_all_and_doc_example() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [-1.0, 0.5]])
    m = merge_all(batch_moments(x[i : i + 1]) for i in range(4))
    assert_moments_close(m, x, rel=1e-12)


def test_state_dict_is_a_copy_and_reset_clears(gen: torch.Generator) -> None:
    acc = StreamingMoments(2)
    acc.update(torch.randn(10, 2, generator=gen))
    sd = acc.state_dict()
    assert set(sd) == {"n", "mean", "m2", "m3", "m4"}
    sd["mean"].add_(100.0)
    assert float(acc.mean.abs().max()) < 10
    acc.reset()
    assert acc.count == 0 and all(float(t.abs().sum()) == 0 for t in acc.moments)


# ----------------------------------------------------------------------------- cost: no loop over channels
class _OpCounter(TorchDispatchMode):
    """Counts dispatched tensor ops and the elements they read (the largest tensor argument of each op)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        if not func.is_view:  # views (slices of the batch) read nothing
            tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            self.elements += max((t.numel() for t in tensors), default=0)
        return func(*args, **(kwargs or {}))


def _count_update(rows: int, channels: int) -> Tuple[int, float]:
    """(ops, passes over the batch) of one StreamingMoments.update on a [rows, channels] batch."""
    x = torch.randn(rows, channels)
    acc = StreamingMoments(channels)
    acc.update(torch.randn(8, channels))
    counter = _OpCounter()
    with counter:
        acc.update(x)
    return counter.ops, counter.elements / x.numel()


def test_update_cost_does_not_grow_with_channels_and_is_a_few_passes() -> None:
    # the same batch size in elements, very different channel counts: no per-channel Python work
    ops_narrow, passes_narrow = _count_update(8192, 4)
    ops_wide, passes_wide = _count_update(32, 1024)
    assert ops_narrow == ops_wide
    assert _count_update(32, 4)[0] == ops_wide  # more channels at the same number of rows: the same ops
    # a few passes over the [tokens, channels] batch (elements read / batch elements), large batches included
    assert passes_narrow <= 12
    assert _count_update(100_000, 64)[1] <= 12


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_problem(gen: torch.Generator) -> None:
    acc = StreamingMoments(3)
    with pytest.raises(ValueError, match=r"batch has 4 channels, accumulator has 3"):
        acc.update(torch.randn(5, 4, generator=gen))
    with pytest.raises(ValueError, match=r"channel_dim=3 is out of range .* 2 dimensions"):
        acc.update(torch.randn(5, 3, generator=gen), channel_dim=3)
    with pytest.raises(ValueError, match="at least a 1-D tensor"):
        acc.update(torch.tensor(1.0))
    with pytest.raises(TypeError, match="needs a torch.Tensor, got list"):
        acc.update([[1.0, 2.0, 3.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cannot merge 2 channels into 3"):
        acc.merge(StreamingMoments(2))
    with pytest.raises(ValueError, match=r"cannot pool 3 channels into groups of 2"):
        acc.pooled(2)
    with pytest.raises(ValueError, match=r"group_size must be a positive integer, got 0"):
        acc.pooled(0)
    with pytest.raises(ValueError, match=r"2-D \[tokens, channels\] tensor, got shape \(2, 3, 4\)"):
        batch_moments(torch.zeros(2, 3, 4))
    with pytest.raises(KeyError, match=r"lacks \['m3', 'm4'\]"):
        acc.load_state_dict({k: v for k, v in acc.state_dict().items() if k not in ("m3", "m4")})
    with pytest.raises(ValueError, match=r"'mean' has shape \(4,\), this accumulator needs \(3,\)"):
        acc.load_state_dict(StreamingMoments(4).state_dict())


def test_module_doctest_values_are_independent_of_code() -> None:
    """The class docstring's numbers, checked by hand: means of [1, 3, 5] and [2, 4, 6]."""
    a, b = StreamingMoments(2), StreamingMoments(2)
    a.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    b.update(torch.tensor([[5.0, 6.0]]))
    a.merge(b)
    assert a.mean.tolist() == [3.0, 4.0] and a.count == 3.0
    # M2 = 4 + 0 + 4 = 8, M4 = 16 + 0 + 16 = 32 per column; kurtosis = 3 * 32 / 64 = 1.5
    assert a.moments.m2.tolist() == [8.0, 8.0] and a.moments.m4.tolist() == [32.0, 32.0]
    assert a.kurtosis().tolist() == [1.5, 1.5]
    assert math.isclose(float(a.moments.m3.abs().max()), 0.0, abs_tol=1e-12)


# ----------------------------------------------------------------------------- power sums about a centre

def _two_pass(x: torch.Tensor) -> Tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 two-pass central moments of the columns (the oracle)."""
    x = x.double()
    mean = x.mean(0)
    d = x - mean
    return float(x.shape[0]), mean, (d ** 2).sum(0), (d ** 3).sum(0), (d ** 4).sum(0)


@pytest.mark.parametrize("path", ["chunked", "whole", "whole-expanded"])  # expanded: the compiled graphs' recentring
@pytest.mark.parametrize("rows", ["all", "index", "keep"])
@pytest.mark.parametrize("n", [300, 20000])  # one cache-sized chunk, and many
def test_power_sums_about_a_centre_recover_the_central_moments(offset_data: torch.Tensor, path: str, rows: str,
                                                                n: int) -> None:
    from apt_salience.moments import _power_sums_chunked, _power_sums_whole, central_from_power_sums

    x = offset_data[:n]
    keep = torch.arange(n) % 3 != 1
    index = keep.nonzero().squeeze(1)
    sel = x if rows == "all" else x[keep]
    # a centre a few standard deviations away from the mean, as a previous window's mean may be
    centre = (sel.double().mean(0) + 3 * sel.double().std(0)).float().double()
    kw_index = index if rows == "index" else None
    kw_keep = keep if rows == "keep" else None
    if path != "chunked":
        a, p, _ = _power_sums_whole(x, centre, 4, kw_index, kw_keep, True, expanded=path == "whole-expanded")
    else:
        a, p = _power_sums_chunked(x, centre, 4, index if rows != "all" else None, True)
    assert p is not None and a is not None
    m = central_from_power_sums(p, centre)
    n_ref, mean, m2, m3, m4 = _two_pass(sel)
    assert float(m.n[0]) == n_ref
    torch.testing.assert_close(m.mean, mean, rtol=1e-9, atol=1e-6 * float(sel.double().std(0).min()))
    for got, ref in ((m.m2, m2), (m.m4, m4)):
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(a.double(), sel.double().abs().sum(0), rtol=1e-6, atol=0)
    ref_k = torch.tensor(scipy.stats.kurtosis(sel.double().numpy(), axis=0, fisher=False))
    torch.testing.assert_close(kurtosis_from_moments(m), ref_k, rtol=1e-4, atol=0)


def test_power_sums_add_up_over_batches_and_the_first_centre_is_the_batch_mean() -> None:
    from apt_salience.moments import central_from_power_sums, power_sums, power_sums_first_centre

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 4, generator=gen) * 2 + 7
    centre = torch.full((4,), 6.5, dtype=torch.float64)
    _, p1 = power_sums(x[:200], centre, 4)
    _, p2 = power_sums(x[200:], centre, 4)
    _, p = power_sums(x, centre, 4)
    assert p1 is not None and p2 is not None and p is not None
    torch.testing.assert_close(p1 + p2, p, rtol=1e-6, atol=1e-9)  # sums about one centre merge by addition (float32 powers)
    n, mean, m2, _, m4 = _two_pass(x)
    m = central_from_power_sums(p1 + p2, centre)
    torch.testing.assert_close(m.m4, m4, rtol=1e-6, atol=0)
    # an unset centre is replaced by the batch's float32 mean; a set one is kept
    for is_set, expected in ((False, x.double().mean(0).float()), (True, torch.zeros(4))):
        _, sums, used = power_sums_first_centre(x, torch.zeros(4), torch.tensor(is_set), 4)
        torch.testing.assert_close(used, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(central_from_power_sums(sums, used.double()).m2, m2, rtol=1e-5, atol=0)
