"""What the tracker records for each probed tensor, as pure functions (no state, no hooks).

A *probe* is one observed tensor stream of a site: its input (``in``: the head / neuron /
adapter-rank channels) or, for head and neuron sites, its output (``out``: what the sub-layer
writes to the residual stream, the hidden dimensions). For every forward of a probe, with H
the ``[tokens, C]`` tensor (padding rows left out) and G = dL/dH:

* the forward part is computed at once from H (nothing of H is kept): the sums the salience
  mode needs (``sum |H|`` for ``compressed``) and, for kurtosis, the power sums of H about
  the probe's centre (see :func:`apt_salience.moments.power_sums`);
* the backward part is computed when G arrives: ``sum |G|`` (``compressed``) or
  ``sum H * G`` (``taylor`` / ``fisher``, the only modes that keep H, as a view, until then).

Both parts of one forward are emitted together into the probe's pending sums, with a count of
1, only when G arrives, so a forward whose gradient never comes is never counted. All parts
add up over micro-batches, which is what lets a compiled graph hand them to autograd as plain
gradients. At the end of an optimizer step a :class:`Recipe` turns the step's sums into one
value per channel (``A * B`` for ``compressed``) and the per-block sums into block salience.

To add a salience statistic, add a :class:`Recipe` here (and its name to ``salience.mode`` in
``config.py``); the hooks, the accumulation, the distributed merge and the publication are
generic over recipes.

Example:
    >>> import torch
    >>> r = RECIPES["compressed"]
    >>> r.streams, r.width(3)
    (('abs_in', 'abs_grad'), 7)
    >>> r.channel_value(torch.tensor([[1., 2.], [3., 4.]])).tolist()
    [3.0, 8.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..salience import compressed_salience  # the pure function of APT Eq. 5
from ..moments import abs_sum_rows, power_sums, prod_sum_rows
from .kernels import grad_abs_sum, grad_prod_sum

__all__ = ["Recipe", "RECIPES", "forward_part", "backward_part"]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Recipe:
    """One salience mode: which sums it records and how they become block salience.

    ``streams`` names the per-channel sums in their layout order: first those of the forward
    part (``forward_abs``), then those of the backward part. ``channel_value`` maps the
    step's sums ``[len(streams), C]`` to one value per channel; ``finish`` maps per-block
    sums of those values to block salience (``taylor``: ``|.|``, ``fisher``: ``(.)^2``).
    """

    name: str
    forward_abs: bool
    grad_abs: bool
    grad_prod: bool
    streams: Tuple[str, ...]
    channel_value: Callable[[Tensor], Tensor]
    finish: Callable[[Tensor], Tensor]

    def width(self, channels: int) -> int:
        """Length of one probe's pending sum vector: the streams, then one count."""
        return len(self.streams) * channels + 1

    @property
    def keeps_activation(self) -> bool:
        """Whether H must stay alive (as a view) until its gradient arrives."""
        return self.grad_prod


RECIPES: Dict[str, Recipe] = {
    # APT Eq. 5: sum|H| * sum|dL/dH| per channel and step (the pure function of apt_salience.salience)
    "compressed": Recipe("compressed", True, True, False, ("abs_in", "abs_grad"), lambda s: compressed_salience(s[0], s[1]),
                         _identity),
    # first-order Taylor |sum H * dL/dH| of the block (signed sums over tokens and the block's channels)
    "taylor": Recipe("taylor", False, False, True, ("prod",), lambda s: s[0], torch.abs),
    # Fisher information (sum H * dL/dH)^2 of the block
    "fisher": Recipe("fisher", False, False, True, ("prod",), lambda s: s[0], torch.square),
}


def forward_part(recipe: Recipe, x2: Tensor, centre: Optional[Tensor], order: int, *,
                 index: Optional[Tensor] = None, keep: Optional[Tensor] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The forward sums of one probe: (``sum |H|`` float32 ``[C]`` or None, power sums float64 or None)."""
    return power_sums(x2, centre, order, index=index, keep=keep, abs_sum=recipe.forward_abs)


def backward_part(recipe: Recipe, g2: Tensor, x2: Optional[Tensor], *, index: Optional[Tensor] = None,
                  keep: Optional[Tensor] = None, inv_scale: Optional[Tensor] = None, compiled: bool = False) -> Tensor:
    """The backward sums of one probe, float32 ``[streams of the backward part, C]``.

    ``inv_scale`` (a GradScaler's ``1 / scale``) is divided out here, in the backward pass,
    so the value in force when the gradient was computed is the one removed. ``compiled``:
    called from a compiled graph (the reductions go through :mod:`.kernels`).
    """
    parts = []
    if recipe.grad_abs:
        parts.append(grad_abs_sum(g2, keep) if compiled else abs_sum_rows(g2, index=index, keep=keep))
    if recipe.grad_prod:
        assert x2 is not None, "the recipe keeps H until backward"
        parts.append(grad_prod_sum(x2, g2, keep) if compiled else prod_sum_rows(x2, g2, index=index, keep=keep))
    out = torch.stack(parts)
    if inv_scale is not None:
        out = out * inv_scale
    return out
