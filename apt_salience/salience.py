"""Pure tensor functions of APT's salience (the seed's three public functions) and parameter counts.

Nothing here keeps state; :class:`~apt_salience.SalienceTracker` streams the same
quantities during training.

Example:
    >>> import torch
    >>> from apt_salience import compute_activation_gradient_product, compute_kurtosis, normalize_scores
    >>> h = torch.tensor([[1., -2.], [3., 4.]]); g = torch.tensor([[0.5, 1.], [-0.5, 0.]])
    >>> compute_activation_gradient_product(h, g).tolist()   # [4*1, 6*1]
    [4.0, 6.0]
    >>> normalize_scores(torch.tensor([4., 6.]), torch.tensor([2., 3.])).tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .moments import Moments, batch_moments, kurtosis_from_moments, pool_moments

__all__ = [
    "compute_activation_gradient_product",
    "compute_kurtosis",
    "normalize_scores",
    "compressed_salience",
    "kurtosis_of_moments",
    "head_param_count",
    "neuron_param_count",
    "hidden_param_count",
    "outlier_aware_salience",
    "ema_update",
]


def _flatten_tokens(x: Tensor, channel_dim: int, mask: Optional[Tensor], name: str) -> Tensor:
    """[..., C, ...] -> [kept tokens, C] (float32 or float64)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the channels), got a scalar")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for {name} with {x.dim()} dimensions "
            f"(allowed: {-x.dim()} <= channel_dim < {x.dim()})"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    xc = x.movedim(channel_dim, -1)
    tokens_shape = xc.shape[:-1]
    x2 = xc.reshape(-1, xc.shape[-1])
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(tokens_shape):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the token dimensions {tuple(tokens_shape)} of {name} "
                f"(shape {tuple(x.shape)} with channel_dim={channel_dim})"
            )
        x2 = x2[mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
    return x2


def compute_activation_gradient_product(
    activations: Tensor,
    gradients: Tensor,
    *,
    channel_dim: int = -1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """APT's compressed salience per channel: ``sum|H[:, c]| * sum|G[:, c]|`` over every other dimension.

    Args:
        activations: H, any layout; ``channel_dim`` names its channel axis.
        gradients: dL/dH, same shape as ``activations``.
        channel_dim: the channel axis (default last).
        mask: optional boolean/0-1 tensor over the non-channel dimensions; zeros are excluded (padding).

    Returns:
        A 1-D tensor of length C, float32 (float64 for float64 inputs); half-precision
        inputs are accumulated in float32.

    Example:
        >>> h = torch.ones(2, 3, 4); g = torch.full((2, 3, 4), 0.5)
        >>> compute_activation_gradient_product(h, g, mask=torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist()
        [4.5, 4.5, 4.5, 4.5]
    """
    if isinstance(activations, Tensor) and isinstance(gradients, Tensor) and activations.shape != gradients.shape:
        raise ValueError(
            f"activations shape {tuple(activations.shape)} and gradients shape {tuple(gradients.shape)} differ"
        )
    h = _flatten_tokens(activations, channel_dim, mask, "activations")
    g = _flatten_tokens(gradients, channel_dim, mask, "gradients")
    acc = torch.float64 if torch.float64 in (h.dtype, g.dtype) else torch.float32
    a = torch.linalg.vector_norm(h, ord=1, dim=0, dtype=acc)
    b = torch.linalg.vector_norm(g, ord=1, dim=0, dtype=acc)
    return compressed_salience(a, b)


def compressed_salience(abs_activation_sum: Tensor, abs_gradient_sum: Tensor) -> Tensor:
    """APT's compressed per-channel salience from the token sums: ``A[c] * B[c]`` (Eq. 5, Algorithm 1).

    ``A[c] = sum_tokens |H[:, c]|`` and ``B[c] = sum_tokens |G[:, c]|`` of one optimizer step: the
    tracker streams these two sums and calls this function once per step (the product is taken
    per step, never across steps); :func:`compute_activation_gradient_product` computes them
    from whole tensors and calls it too.

    Args:
        abs_activation_sum: ``A``, 1-D (or any shape; element-wise).
        abs_gradient_sum: ``B``, the same shape.

    Example:
        >>> compressed_salience(torch.tensor([4.0, 6.0]), torch.tensor([1.0, 0.5])).tolist()
        [4.0, 3.0]
    """
    return abs_activation_sum * abs_gradient_sum


def compute_kurtosis(
    activations: Tensor,
    *,
    channel_dim: int = -1,
    group_size: int = 1,
    mask: Optional[Tensor] = None,
    sqrt: bool = True,
    excess: bool = False,
) -> Tensor:
    """Per-channel (or per group of ``group_size`` contiguous channels) kurtosis, as APT's outlier term.

    Pearson ``Kurt = E[(X-mu)^4] / (E[(X-mu)^2])^2`` over all tokens; a group (e.g. the
    ``d_head`` channels of an attention head) pools its channels into one distribution.
    Returns ``sqrt(Kurt)`` by default (the term added to the salience); ``sqrt=False``
    returns the kurtosis itself; ``excess=True`` uses ``max(Kurt - 3, 0)``. Channels with
    zero variance or fewer than two values give 0, never NaN. Computed in float64 from
    mean-shifted float32 power sums (stable when |mean| >> std).

    Args:
        activations: X, any layout; ``channel_dim`` names its channel axis.
        channel_dim: the channel axis (default last).
        group_size: channels pooled into one distribution (``d_head`` for a head).
        mask: optional boolean/0-1 tensor over the non-channel dimensions; zeros are excluded.
        sqrt: return ``sqrt(Kurt)``.
        excess: use ``max(Kurt - 3, 0)``.

    Example:
        >>> x = torch.tensor([[0., 1.], [0., -1.], [0., 1.], [0., -1.]])
        >>> compute_kurtosis(x, sqrt=False).tolist()
        [0.0, 1.0]
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    h = _flatten_tokens(activations, channel_dim, mask, "activations")
    if h.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {h.shape[1]} channels")
    return kurtosis_of_moments(batch_moments(h), group_size=group_size, excess=excess, sqrt=sqrt)


def kurtosis_of_moments(moments: Moments, *, group_size: int = 1, excess: bool = False, sqrt: bool = False) -> Tensor:
    """Per-channel (or per group of ``group_size`` contiguous channels) Pearson kurtosis from central moments.

    ``Kurt = n * M4 / M2^2``; a group pools its channels' moments into one distribution (exact
    shift to the pooled mean) first. ``excess`` gives ``max(Kurt - 3, 0)``; ``sqrt`` returns
    ``sqrt(Kurt)``. Fewer than two values or zero variance give 0, never NaN. This is the kurtosis
    :func:`compute_kurtosis` returns for whole tensors and the one the tracker publishes from the
    window's streamed moments.

    Args:
        moments: per-channel ``(n, mean, M2, M3, M4)`` (:class:`~apt_salience.moments.Moments`).
        group_size: channels per block (``d_head`` for heads).
        excess: subtract 3 and clamp at 0.
        sqrt: return the square root.

    Example:
        >>> from apt_salience.moments import batch_moments
        >>> x = torch.tensor([[0., 1.], [0., -1.], [0., 1.], [0., -1.]])
        >>> kurtosis_of_moments(batch_moments(x)).tolist(), kurtosis_of_moments(batch_moments(x), group_size=2).tolist()
        ([0.0, 1.0], [2.0])
    """
    k = kurtosis_from_moments(pool_moments(moments, group_size), excess=excess)
    return k.sqrt() if sqrt else k


def normalize_scores(scores: Tensor, param_counts: Union[Tensor, Sequence[float], float]) -> Tensor:
    """Salience density: ``scores / param_counts`` (element-wise, broadcasting).

    Raises ``ValueError`` for a non-positive or non-finite parameter count.

    Args:
        scores: per-block scores.
        param_counts: per-block parameter counts (a tensor, a sequence or one number; broadcast to ``scores``).

    Example:
        >>> normalize_scores(torch.tensor([6.0, 9.0]), head_param_count(d_model=4, head_dim=2, num_heads=2))
        tensor([0.1875, 0.2812])
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    counts = torch.as_tensor(param_counts, dtype=torch.float64 if scores.dtype == torch.float64 else torch.float32)
    counts = counts.to(scores.device)
    if counts.numel() == 0 and scores.numel() != 0:
        raise ValueError("param_counts is empty")
    bad = ~torch.isfinite(counts) | (counts <= 0)
    if bool(bad.any()):
        idx = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(
            f"param_counts must be positive and finite; entry {idx} is {counts.reshape(-1)[idx].item()}"
        )
    try:
        shape = torch.broadcast_shapes(scores.shape, counts.shape)
    except RuntimeError as exc:
        raise ValueError(
            f"scores shape {tuple(scores.shape)} and param_counts shape {tuple(counts.shape)} do not broadcast"
        ) from exc
    if shape != scores.shape:
        raise ValueError(
            f"param_counts shape {tuple(counts.shape)} would broadcast scores shape {tuple(scores.shape)} to "
            f"{tuple(shape)}; param_counts must be a scalar or broadcast to the shape of scores"
        )
    return scores / counts


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def head_param_count(d_model: int, head_dim: int, num_heads: int, num_kv_heads: Optional[int] = None) -> float:
    """Parameters of one attention head: ``(2 + 2 * n_kv / n_heads) * d_head * d_model``.

    Without grouped-query attention (``num_kv_heads`` None or equal to ``num_heads``) this is
    ``4 * d_head * d_model``, the paper's ``4 d_m d_m / n_h``. Biases are left out.

    Args:
        d_model: the hidden size.
        head_dim: channels per head.
        num_heads: query heads of the attention.
        num_kv_heads: key / value heads (grouped-query attention); None: ``num_heads``.

    Example:
        >>> head_param_count(768, 64, 12), head_param_count(4096, 128, 32, num_kv_heads=8)
        (196608.0, 1310720.0)
    """
    for name, v in (("d_model", d_model), ("head_dim", head_dim), ("num_heads", num_heads)):
        _positive(name, v)
    kv = num_heads if num_kv_heads is None else num_kv_heads
    _positive("num_kv_heads", kv)
    return float((2.0 + 2.0 * kv / num_heads) * head_dim * d_model)


def neuron_param_count(d_model: int, gated: bool = False) -> float:
    """Parameters of one FFN neuron: ``2 * d_model`` (``3 * d_model`` for gated FFNs such as LLaMA's).

    Args:
        d_model: the hidden size.
        gated: the FFN has a gate projection (three matrices).

    Example:
        >>> neuron_param_count(768), neuron_param_count(4096, gated=True)
        (1536.0, 12288.0)
    """
    _positive("d_model", d_model)
    return float((3 if gated else 2) * d_model)


def hidden_param_count(layers: Iterable[Tuple[int, int, int, int, bool]]) -> float:
    """Parameters of one hidden dimension: ``sum_layers (2 n_h + 2 n_kv) * d_head + (2|3) * d_ff``.

    ``layers`` yields ``(num_heads, num_kv_heads, head_dim, d_ff, gated)`` per attention/FFN
    block pair; pass ``d_ff=0`` or ``num_heads=0`` for a layer that lacks one of them (e.g. a
    T5 cross-attention block). The paper's ``n_L (4 d_m + 2 n_f)`` without GQA.

    Args:
        layers: per attention / FFN block pair, ``(num_heads, num_kv_heads, head_dim, d_ff, gated)``.

    Example:
        >>> hidden_param_count([(12, 12, 64, 3072, False)] * 12) == 12 * (4 * 768 + 2 * 3072)
        True
    """
    total = 0.0
    for i, (n_h, n_kv, d_head, d_ff, gated) in enumerate(layers):
        for name, v in (("num_heads", n_h), ("num_kv_heads", n_kv), ("head_dim", d_head), ("d_ff", d_ff)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"hidden_param_count: layer {i} has {name}={v!r}; must be a number >= 0")
        total += (2 * n_h + 2 * n_kv) * d_head + (3 if gated else 2) * d_ff
    if total <= 0:
        raise ValueError("hidden_param_count: the layers hold no heads and no neurons")
    return float(total)


def outlier_aware_salience(salience: Tensor, sqrt_kurtosis: Tensor, *, combine: str = "add",
                           sites: Optional[Sequence[Tuple[str, int]]] = None) -> Tensor:
    """APT's outlier-aware salience ``S + sqrt(Kurt)`` (``combine='add'``, the paper's Eq. 8).

    ``combine='scaled'`` makes the outlier term scale-free within each site: the block's
    ``sqrt(Kurt)`` relative to the site's mean ``sqrt(Kurt)``, times the site's mean salience,
    so scaling the loss, the batch or the gradients scales every score alike. ``sites`` lists
    ``(name, number of blocks)`` in order (needed for ``scaled``; a site whose kurtosis is all
    zero gets no outlier term).

    Args:
        salience: per-block salience (1-D).
        sqrt_kurtosis: per-block ``sqrt(Kurt)``, same length.
        combine: ``'add'`` or ``'scaled'``.
        sites: the per-site slices, for ``'scaled'``.

    Example:
        >>> s, k = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])
        >>> outlier_aware_salience(s, k).tolist()
        [2.0, 5.0]
        >>> [round(v, 4) for v in outlier_aware_salience(s, k, combine="scaled", sites=[("a", 2)]).tolist()]
        [2.3333, 5.6667]
    """
    if combine == "add":
        return salience + sqrt_kurtosis
    if combine != "scaled":
        raise ValueError(f"combine must be 'add' or 'scaled', got {combine!r}")
    if sites is None:
        raise ValueError("combine='scaled' needs sites=[(name, num_blocks), ...]")
    term = torch.zeros_like(salience)
    start = 0
    for _, n in sites:
        sl = slice(start, start + n)
        mk = sqrt_kurtosis[sl].mean()
        if float(mk) > 0:
            term[sl] = salience[sl].mean() * sqrt_kurtosis[sl] / mk
        start += n
    return salience + term


def ema_update(previous: Tensor, value: Tensor, beta: float) -> Tensor:
    """One step of APT's smoothing, ``beta * previous + (1 - beta) * value`` (a new tensor).

    Args:
        previous: ``S_bar`` so far.
        value: this window's value.
        beta: the smoothing, in [0, 1).

    Example:
        >>> ema_update(torch.tensor([0.0]), torch.tensor([2.0]), 0.75).tolist()
        [0.5]
    """
    return beta * previous + (1 - beta) * value
