"""Shared pytest fixtures (keep small; other test files may add theirs)."""

from __future__ import annotations

import pytest
import torch

# Tiny models: one intra-op thread is fastest and keeps parallel CI jobs from oversubscribing the cores.
torch.set_num_threads(1)


def make_offset_data(n: int = 20000, seed: int = 0) -> torch.Tensor:
    """float32 [n, 6] data whose |mean| is 1e4 times its std, with a few large outliers.

    Channel stds differ (1e-3 .. 3), means alternate in sign; columns 0, 2, 3 get outliers
    of +40, -30 and +60 standard deviations. This is the data on which naive power sums fail.
    """
    gen = torch.Generator().manual_seed(seed)
    std = torch.tensor([1.0, 0.5, 2.0, 1e-3, 3.0, 1.0], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64) * std + 1e4 * std * sign
    x[5, 0] += 40 * std[0]
    x[n // 2, 2] -= 30 * std[2]
    x[7, 3] += 60 * std[3]
    x[n - 3, 3] += 45 * std[3]
    return x.float()


@pytest.fixture
def offset_data() -> torch.Tensor:
    """See :func:`make_offset_data`."""
    return make_offset_data()


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, fresh for each test."""
    return torch.Generator().manual_seed(1234)
