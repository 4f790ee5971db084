"""Baseline block criteria: weight magnitude, random, Wanda-style, weight-gradient Taylor.

Every criterion here scores the attention heads and FFN neurons of a model with one contract:

* **arguments**: the model first (what is scored), then what the criterion measured (Wanda: the
  activation norms), then keyword-only ``config`` (a tracker config, as :func:`apt_salience.attach`
  takes it; it decides which modules are the head and neuron sites) and ``kinds`` (a non-empty
  subset of ``("head", "neuron")``);
* **result**: ``{kind: 1-D float64 CPU tensor}``, one non-negative value per block, in the tracker's
  block order (site after site as ``model.named_modules()`` lists them, blocks in channel order),
  i.e. aligned with ``BlockLayout.from_model(model, config)`` and with a tracker reading taken under
  the same config. Pass it as ``select_blocks(reading, score=...)``; higher means more important.

The criteria:

* :func:`magnitude_scores`: ``sum |w|`` over the block's weights;
* :func:`random_scores`: a seeded random score scaled by each block's parameter count (a uniformly
  random density: a global random sort);
* :func:`wanda_scores`: Wanda-style ``sum_{c in block} (sum_o |W[o, c]|) * ||X_c||_2`` over the
  site's input columns, ``X`` the site input on calibration tokens collected by
  :class:`ActivationNorms` (padding excluded with its ``token_mask``);
* :func:`weight_taylor_scores` (from the current ``.grad``) and :class:`WeightTaylor` (streamed
  during training, EMA-smoothed like the tracker): weight-gradient first-order Taylor
  ``|sum_{w in block} w * dL/dw|``. Needs ``.grad`` on those weights (full fine-tuning).

A block's weights (magnitude, Taylor) are its input columns of the site (attention output / FFN
down projection) plus the matching output rows of the linears that produce the site's input (Q, K,
V for a head; up and gate for a neuron), as LLM-Pruner's group criteria (:func:`block_groups`).
Restricted to the site's columns the Taylor score would equal the tracker's ``salience.mode:
taylor`` exactly (``sum_o W[o, c] dW[o, c] = sum_t H[t, c] dL/dH[t, c]``); the producer rows make
it a different criterion. A producer is found when its output width equals the site's input width
(a fused QKV projection, as GPT-2's, or grouped-query K/V projections are left out).

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from apt_salience import attach, select_blocks
    >>> from apt_salience.criteria import magnitude_scores
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
    >>> tracker = attach(m)
    >>> m(input_ids=torch.randint(0, 100, (2, 7)), labels=torch.tensor([0, 1])).loss.backward()
    >>> _ = tracker.step(); reading = tracker.scores(); tracker.remove()
    >>> s = magnitude_scores(m)
    >>> s["head"].shape, s["neuron"].shape, s["head"].dtype
    (torch.Size([8]), torch.Size([128]), torch.float64)
    >>> select_blocks(reading, keep_ratio=0.5, kinds=("head", "neuron"), score=s).num_kept()["head"] <= 8
    True
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .architectures import Site, find_sites, linear_dims, linear_weight
from .config import ConfigLike, load_config
from .layout import BlockKind, BlockLayout
from .scores import SalienceScores

__all__ = [
    "CRITERION_KINDS",
    "magnitude_scores",
    "random_scores",
    "wanda_scores",
    "ActivationNorms",
    "weight_taylor_scores",
    "WeightTaylor",
    "block_groups",
]

#: The kinds the criteria score (blocks with weights of their own in a site and its producers).
CRITERION_KINDS: Tuple[BlockKind, ...] = ("head", "neuron")

KindsLike = Union[BlockKind, Sequence[BlockKind]]


def _check_kinds(kinds: KindsLike) -> Tuple[BlockKind, ...]:
    ks: Tuple[Any, ...] = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in ks if k not in CRITERION_KINDS]
    if bad or not ks:
        raise ValueError(f"kinds must be a non-empty subset of {CRITERION_KINDS}, got {kinds!r}")
    return ks


def _sites(model: nn.Module, config: ConfigLike, kinds: Tuple[BlockKind, ...]) -> List[Site]:
    sites, _ = find_sites(model, load_config(config))
    return [s for s in sites if s.kind in kinds]


def _collect(per_kind: Dict[str, List[Tensor]]) -> Dict[str, Tensor]:
    return {k: torch.cat(v) for k, v in per_kind.items() if v}


def _base_weight(module: nn.Module) -> Tensor:
    """The weight parameter itself (a LoRA wrapper's base layer's), in the parameter's own layout."""
    m = module
    while hasattr(m, "base_layer") and hasattr(m, "lora_A"):
        m = m.base_layer  # type: ignore[assignment]
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(m).__name__} has no weight tensor")
    return w


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D keeps its weight as [in, out]."""
    m = module
    while hasattr(m, "base_layer") and hasattr(m, "lora_A"):
        m = m.base_layer  # type: ignore[assignment]
    return type(m).__name__ == "Conv1D"


def _producers(modules: Mapping[str, nn.Module], site: Site, site_modules: Sequence[nn.Module]) -> List[nn.Module]:
    """Linears that write the site's input (Q/K/V for a head site, up/gate for a neuron site).

    Walks up from the site's parent to its layer and stops at the first ancestor that holds
    linears whose output width equals the site's input width. Sites (``site_modules``), LoRA
    adapters and the base layers inside LoRA wrappers (the wrapper stands for its weight) are
    never producers.
    """
    parts = site.name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if len(prefix) < len(site.layer.rstrip(".")):
            break
        found = []
        for name, mod in modules.items():
            if not name.startswith(prefix + ".") or ".lora_" in name or name.endswith(".base_layer"):
                continue
            if any(mod is s for s in site_modules):
                continue
            dims = linear_dims(mod)
            if dims is not None and dims[1] == site.in_features:
                found.append(mod)
        if found:
            return found
    return []


def block_groups(model: nn.Module, *, config: ConfigLike = None,
                 kinds: KindsLike = CRITERION_KINDS) -> List[Tuple[Site, List[nn.Module]]]:
    """``[(site, producers)]`` in model order: each head / neuron site and the linears writing its input.

    Args:
        model: the model.
        config: the tracker config that decides the sites (None: the defaults, architecture ``auto``).
        kinds: ``"head"`` and / or ``"neuron"``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...     intermediate_size=64, vocab_size=100))
        >>> [(s.kind, len(p)) for s, p in block_groups(m)]
        [('head', 3), ('neuron', 1)]
    """
    ks = _check_kinds(kinds)
    sites, _ = find_sites(model, load_config(config))
    modules = dict(model.named_modules())
    site_modules = [s.module for s in sites]
    return [(s, _producers(modules, s, site_modules)) for s in sites if s.kind in ks]


# ------------------------------------------------------------------------------------------------
# Weight magnitude and random


def magnitude_scores(model: nn.Module, *, config: ConfigLike = None,
                     kinds: KindsLike = CRITERION_KINDS) -> Dict[str, Tensor]:
    """Weight-magnitude score of every head / neuron block: ``sum |w|`` over the block's weights.

    The block's weights: its input columns of the site plus the matching output rows of the
    producers (:func:`block_groups`).

    Args:
        model: the model (read only).
        config: the tracker config that decides the sites (None: the defaults).
        kinds: ``"head"`` and / or ``"neuron"``.

    Returns:
        ``{kind: float64 CPU tensor [num_blocks]}`` in the tracker's block order.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)))  # up "0.0", down "0.1"
        >>> s = magnitude_scores(m, config={"architecture": "custom", "sites": {"neurons": r"0[.]1"}})
        >>> bool(torch.allclose(s["neuron"], (m[0][1].weight.abs().sum(0) + m[0][0].weight.abs().sum(1)).double()))
        True
    """
    out: Dict[str, List[Tensor]] = {}
    with torch.no_grad():
        for site, prods in block_groups(model, config=config, kinds=kinds):
            per_ch = linear_weight(site.module).detach().double().abs().sum(0).cpu()  # [in]
            for p in prods:
                per_ch += linear_weight(p).detach().double().abs().sum(1).cpu()
            out.setdefault(site.kind, []).append(per_ch.view(-1, site.block_size).sum(1))
    return _collect(out)


def random_scores(model: Union[nn.Module, SalienceScores, BlockLayout], *, seed: int = 0, config: ConfigLike = None,
                  kinds: KindsLike = CRITERION_KINDS) -> Dict[str, Tensor]:
    """Random baseline: ``U(0, 1) * param_count`` per block, from ``seed``.

    Scaled by each block's parameter count so that the density that
    :func:`~apt_salience.selection.select_blocks` ranks by (score / parameters) is uniform random
    whatever the kind: a global random sort. The same seed and layout give the same scores.

    Args:
        model: the model, or (no model needed) a tracker reading or a
            :class:`~apt_salience.selection.BlockLayout`: where the blocks and their parameter counts come from.
        seed: the seed of the generator.
        config: the tracker config that decides the sites, when ``model`` is a model.
        kinds: ``"head"`` and / or ``"neuron"``.

    Returns:
        ``{kind: float64 CPU tensor [num_blocks]}`` in the tracker's block order.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
        >>> r = random_scores(m, seed=0, config={"architecture": "custom", "sites": {"neurons": "1"}})
        >>> r["neuron"].shape, bool(((r["neuron"] >= 0) & (r["neuron"] <= 4)).all())  # a neuron: 2 x 2 weights
        (torch.Size([3]), True)
    """
    ks = _check_kinds(kinds)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(model, BlockLayout):
        layout = model
    elif isinstance(model, SalienceScores):
        layout = BlockLayout.from_scores(model)
    elif isinstance(model, nn.Module):
        layout = BlockLayout.from_model(model, config)
    else:
        raise TypeError(f"model must be an nn.Module, a SalienceScores or a BlockLayout, got {type(model).__name__}")
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, Tensor] = {}
    for k in ks:
        pc = layout.param_count.get(k)
        if pc is not None:
            u = torch.rand(pc.numel(), generator=g, dtype=torch.float64)
            out[k] = u * pc.detach().to("cpu", torch.float64).reshape(-1)
    return out


# ------------------------------------------------------------------------------------------------
# Collectors: objects that own hooks on the model


_Owner = TypeVar("_Owner", bound="_HookOwner")


class _HookOwner:
    """Owns hook handles: :meth:`remove` takes them all off (idempotent; ``detach`` is the same); a ``with``
    block removes them on exit."""

    _handles: List[RemovableHandle]

    def _register(self, attach: Callable[[], None]) -> None:
        """Run ``attach`` (which appends to ``self._handles``); on any error remove what it attached."""
        self._handles = []
        try:
            attach()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove the hooks (idempotent); what was collected stays readable."""
        while self._handles:
            self._handles.pop().remove()

    detach = remove

    def __enter__(self: _Owner) -> _Owner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# ------------------------------------------------------------------------------------------------
# Wanda: |W| x activation norms


class ActivationNorms(_HookOwner):
    """Per-input-channel ``||X_c||_2`` at every head / neuron site over the forwards it sees (Wanda's ``||X||``).

    Registers forward pre-hooks on the site modules (the model's weights and outputs are not
    changed); :meth:`detach` (or leaving the ``with`` block) removes them. Works with or without
    gradients; :meth:`token_mask` excludes padding.

    Args:
        model: the model.
        config: the tracker config that decides the sites (None: the defaults).
        kinds: ``"head"`` and / or ``"neuron"``.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
        >>> with ActivationNorms(m, config={"architecture": "custom", "sites": {"neurons": "1"}}) as norms:
        ...     _ = m(torch.ones(4, 2))
        >>> bool(torch.allclose(norms.norms()["1"], (m[0](torch.ones(4, 2)) ** 2).sum(0).sqrt().double()))
        True
    """

    def __init__(self, model: nn.Module, *, config: ConfigLike = None, kinds: KindsLike = CRITERION_KINDS):
        self.sites = _sites(model, config, _check_kinds(kinds))
        self._sq = {s.name: torch.zeros(s.in_features, dtype=torch.float64) for s in self.sites}
        self._mask: Optional[Tensor] = None
        self._register(lambda: self._handles.extend(s.module.register_forward_pre_hook(self._make_hook(s))
                                                    for s in self.sites))

    def _make_hook(self, site: Site) -> Callable[..., None]:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            x = next((a for a in args if isinstance(a, Tensor)), None)
            if x is None:
                return
            with torch.no_grad():
                x2 = x.detach().reshape(-1, site.in_features).double()
                if self._mask is not None:
                    if self._mask.numel() != x2.shape[0]:
                        raise ValueError(
                            f"token_mask has {self._mask.numel()} tokens but site '{site.name}' sees {x2.shape[0]}"
                        )
                    x2 = x2[self._mask.to(x2.device)]
                self._sq[site.name] += (x2 * x2).sum(0).cpu()

        return hook

    @contextlib.contextmanager
    def token_mask(self, mask: Tensor) -> Iterator["ActivationNorms"]:
        """Count only the tokens where ``mask`` is non-zero, inside the ``with`` block.

        Args:
            mask: ``[batch, sequence]`` (e.g. the tokenizer's ``attention_mask``).
        """
        prev = self._mask
        self._mask = mask.detach().reshape(-1) != 0
        try:
            yield self
        finally:
            self._mask = prev

    def norms(self) -> Dict[str, Tensor]:
        """``{site name: ||X_c||_2 per input channel}`` (float64 CPU), the input of :func:`wanda_scores`."""
        return {k: v.sqrt() for k, v in self._sq.items()}


def wanda_scores(model: nn.Module, norms: Mapping[str, Tensor], *, config: ConfigLike = None,
                 kinds: KindsLike = CRITERION_KINDS) -> Dict[str, Tensor]:
    """Wanda-style block score ``sum_{c in block} (sum_o |W[o, c]|) * ||X_c||_2`` over the site's input columns.

    Args:
        model: the model (read only).
        norms: ``{site name: ||X_c||_2 per input channel}``, as :meth:`ActivationNorms.norms` returns.
        config: the tracker config that decides the sites (None: the defaults).
        kinds: ``"head"`` and / or ``"neuron"``.

    Returns:
        ``{kind: float64 CPU tensor [num_blocks]}`` in the tracker's block order.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
        >>> cfg = {"architecture": "custom", "sites": {"neurons": "1"}}
        >>> s = wanda_scores(m, {"1": torch.tensor([1.0, 0.0, 2.0])}, config=cfg)["neuron"]
        >>> bool(torch.allclose(s, (m[1].weight.abs().sum(0) * torch.tensor([1.0, 0.0, 2.0])).double()))
        True
    """
    out: Dict[str, List[Tensor]] = {}
    for s in _sites(model, config, _check_kinds(kinds)):
        if s.name not in norms:
            raise ValueError(f"norms has no entry for site '{s.name}' (has: {sorted(norms)[:4]}...); "
                             "collect them with ActivationNorms on the same model and config")
        n = torch.as_tensor(norms[s.name]).detach().double().cpu().reshape(-1)
        if n.numel() != s.in_features:
            raise ValueError(f"norms['{s.name}'] has {n.numel()} channels, the site has {s.in_features}")
        col = linear_weight(s.module).detach().double().abs().sum(0).cpu()
        out.setdefault(s.kind, []).append((col * n).view(-1, s.block_size).sum(1))
    return _collect(out)


# ------------------------------------------------------------------------------------------------
# Weight-gradient Taylor


def _column_products(module: nn.Module, grad: Tensor) -> Tensor:
    """``sum_o W[o, c] * G[o, c]`` per input column c (float64), G in the parameter's own layout."""
    prod = _base_weight(module).detach().double() * grad.detach().double()
    return prod.sum(1) if _is_conv1d(module) else prod.sum(0)


def _row_products(module: nn.Module, grad: Tensor) -> Tensor:
    """``sum_i W[r, i] * G[r, i]`` per output row r (float64)."""
    prod = _base_weight(module).detach().double() * grad.detach().double()
    return prod.sum(0) if _is_conv1d(module) else prod.sum(1)


def weight_taylor_scores(model: nn.Module, *, config: ConfigLike = None,
                         kinds: KindsLike = CRITERION_KINDS) -> Dict[str, Tensor]:
    """``|sum over the block's weights of w * w.grad|`` per head / neuron block, from the current ``.grad``.

    The block's weights: its input columns of the site and the matching output rows of the
    producers (:func:`block_groups`). A weight without ``.grad`` contributes nothing.

    Args:
        model: the model, after a backward pass (read only).
        config: the tracker config that decides the sites (None: the defaults).
        kinds: ``"head"`` and / or ``"neuron"``.

    Returns:
        ``{kind: float64 CPU tensor [num_blocks]}`` in the tracker's block order.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)))  # up "0.0", down "0.1"
        >>> m(torch.ones(1, 2)).sum().backward()
        >>> s = weight_taylor_scores(m, config={"architecture": "custom", "sites": {"neurons": r"0[.]1"}})["neuron"]
        >>> w0, w1 = m[0][0].weight, m[0][1].weight
        >>> ref = ((w1 * w1.grad).sum(0) + (w0 * w0.grad).sum(1)).abs()
        >>> bool(torch.allclose(s, ref.double()))
        True
    """
    out: Dict[str, List[Tensor]] = {}
    for site, prods in block_groups(model, config=config, kinds=kinds):
        per_ch = torch.zeros(site.in_features, dtype=torch.float64)
        g = _base_weight(site.module).grad
        if g is not None:
            per_ch += _column_products(site.module, g).cpu()
        for p in prods:
            gp = _base_weight(p).grad
            if gp is not None:
                per_ch += _row_products(p, gp).cpu()
        out.setdefault(site.kind, []).append(per_ch.view(-1, site.block_size).sum(1).abs())
    return _collect(out)


class WeightTaylor(_HookOwner):
    """Streams weight-gradient Taylor scores during training, aggregated like the tracker.

    Per optimizer step: the signed ``sum w * dL/dw`` over each block's weights (all backward
    passes of the step, read by tensor hooks on the weights, so before clipping or
    ``zero_grad``), then its absolute value; folded into an EMA with ``ema_beta`` at every
    :meth:`step` (0.85: the tracker's default, ``update_frequency`` 1). Registers gradient hooks
    on the weights (the model itself is not changed; :meth:`detach` removes them). Has the parts of
    a tracker that a training loop calls (``token_mask``, ``step``).

    Args:
        model: the model (full fine-tuning: the weights need gradients).
        config: the tracker config that decides the sites (None: the defaults).
        ema_beta: smoothing across steps, ``0 <= ema_beta < 1`` (0: the last step alone).
        kinds: ``"head"`` and / or ``"neuron"``.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
        >>> cfg = {"architecture": "custom", "sites": {"neurons": "1"}}
        >>> with WeightTaylor(m, config=cfg, ema_beta=0.0) as wt:
        ...     m(torch.ones(1, 2)).sum().backward(); wt.step()
        True
        >>> bool(torch.allclose(wt.scores()["neuron"], weight_taylor_scores(m, config=cfg)["neuron"]))
        True
    """

    def __init__(self, model: nn.Module, *, config: ConfigLike = None, ema_beta: float = 0.85,
                 kinds: KindsLike = CRITERION_KINDS):
        if isinstance(ema_beta, bool) or not isinstance(ema_beta, (int, float)) or not 0 <= ema_beta < 1:
            raise ValueError(f"ema_beta must be a number with 0 <= ema_beta < 1, got {ema_beta!r}")
        self.ema_beta = float(ema_beta)
        self._groups = block_groups(model, config=config, kinds=kinds)
        self._step_sum: List[Tensor] = [torch.zeros(s.in_features, dtype=torch.float64) for s, _ in self._groups]
        self._ema: Dict[str, Tensor] = {}
        self._seen = False
        self.steps = 0
        self._register(self._attach)

    def _attach(self) -> None:
        for i, (site, prods) in enumerate(self._groups):
            for module, columns in [(site.module, True)] + [(p, False) for p in prods]:
                w = _base_weight(module)
                if w.requires_grad:
                    self._handles.append(w.register_hook(self._make_hook(i, module, columns)))

    def _make_hook(self, i: int, module: nn.Module, columns: bool) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            with torch.no_grad():
                v = _column_products(module, g) if columns else _row_products(module, g)
                self._step_sum[i] += v.cpu()
            self._seen = True

        return hook

    @contextlib.contextmanager
    def token_mask(self, mask: Tensor) -> Iterator["WeightTaylor"]:
        """No-op, for tracker compatibility: weight gradients already exclude padding through the loss.

        Args:
            mask: ``[batch, sequence]``; ignored.
        """
        yield self

    def step(self) -> bool:
        """Close one optimizer step; returns True when the step saw a gradient."""
        self.steps += 1
        if not self._seen:
            return False
        per_kind: Dict[str, List[Tensor]] = {}
        for (site, _), acc in zip(self._groups, self._step_sum):
            per_kind.setdefault(site.kind, []).append(acc.view(-1, site.block_size).sum(1).abs())
            acc.zero_()
        b = self.ema_beta
        for k, v in per_kind.items():
            cur = torch.cat(v)
            self._ema[k] = b * self._ema.get(k, torch.zeros_like(cur)) + (1 - b) * cur
        self._seen = False
        return True

    def scores(self) -> Dict[str, Tensor]:
        """``{kind: EMA score per block}`` (float64 CPU), in the tracker's block order."""
        if not self._ema:
            raise RuntimeError("WeightTaylor has seen no gradient yet: call step() after a backward pass")
        return {k: v.clone() for k, v in self._ema.items()}
