"""Adaptive LoRA ranks (APT's tuner): adapter importance, the growth rule, growing PEFT LoRA layers.

* Adapter importance: the sum of the per-rank salience of the ``adapter`` kind over the ranks
  of one LoRA layer (:func:`adapter_importance`, :func:`rank_adapters`).
* Growth rule: when the tuning budget goes from ``Delta_t`` to ``Delta_t'``, the most important
  half of the adapters get ``r' = floor(r * Delta_t' / Delta_t)`` (:func:`grown_rank`,
  :func:`plan_rank_growth`).
* :func:`grow_lora_rank` appends ``N(0, sigma^2)`` rows to ``lora_A`` and zero columns to
  ``lora_B``: the layer computes exactly what it computed before. The scaling is kept (``lora_alpha``
  is adjusted so that ``alpha / r`` stays the same). The grown weights are new Parameters:
  rebuild the optimizer (:func:`rebuild_optimizer`) and call ``tracker.refresh()``.

Example:
    >>> from apt_salience.tuning import grown_rank
    >>> grown_rank(8, new_budget=30, old_budget=20)
    12
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .scores import BlockScores, SalienceScores

__all__ = [
    "adapter_importance",
    "rank_adapters",
    "grown_rank",
    "plan_rank_growth",
    "grow_lora_rank",
    "apply_rank_plan",
    "lora_ranks",
    "rebuild_optimizer",
]


def _layer_name(site: str) -> Tuple[str, str]:
    """``a.b.lora_B.default`` -> (``a.b``, ``default``)."""
    if ".lora_B." not in site:
        return site, "default"
    layer, adapter = site.rsplit(".lora_B.", 1)
    return layer, adapter


def _adapter_scores(scores: SalienceScores) -> BlockScores:
    if not isinstance(scores, SalienceScores):
        raise TypeError(f"scores must be an apt_salience SalienceScores, got {type(scores).__name__}")
    if scores.adapter is None:
        raise ValueError(
            "the scores have no adapter kind: attach the tracker to a model with LoRA adapters (PEFT lora_B layers, "
            "or set sites.adapters in the config)"
        )
    return scores.adapter


def adapter_importance(scores: SalienceScores, score: str = "salience") -> Dict[str, float]:
    """``{LoRA layer name: sum over its ranks of the adapter score}``, in model order.

    Example:
        >>> import torch
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.tensor([1., 2., 5.]), kurtosis=torch.zeros(3),
        ...     outlier_aware=torch.tensor([1., 2., 5.]), param_count=torch.ones(3),
        ...     sites=[("m.q.lora_B.default", 2), ("m.v.lora_B.default", 1)])
        >>> adapter_importance(SalienceScores(step=1, adapter=b))
        {'m.q': 3.0, 'm.v': 5.0}
    """
    b = _adapter_scores(scores)
    if score not in ("salience", "outlier_aware", "density", "kurtosis"):
        raise ValueError(f"score must be one of salience, outlier_aware, density, kurtosis; got {score!r}")
    return {_layer_name(site)[0]: total for site, total in b.site_totals(score).items()}


def rank_adapters(scores: SalienceScores, score: str = "salience") -> List[Tuple[str, float]]:
    """Adapters sorted by importance, most important first (ties in model order)."""
    imp = adapter_importance(scores, score)
    order = sorted(range(len(imp)), key=lambda i: -list(imp.values())[i])
    items = list(imp.items())
    return [items[i] for i in order]


def grown_rank(rank: int, new_budget: float, old_budget: float) -> int:
    """APT's growth rule ``r' = floor(r * Delta_t' / Delta_t)`` (never below ``rank``)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    for name, v in (("new_budget", new_budget), ("old_budget", old_budget)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    return max(rank, int(math.floor(rank * float(new_budget) / float(old_budget) + 1e-9)))


def plan_rank_growth(
    scores: SalienceScores,
    new_budget: float,
    old_budget: float,
    *,
    ranks: Optional[Mapping[str, int]] = None,
    fraction: float = 0.5,
    score: str = "salience",
) -> Dict[str, int]:
    """New rank of every adapter: the top ``fraction`` (by importance) grow by :func:`grown_rank`, the rest stay.

    ``ranks`` defaults to the ranks the scores saw (blocks per adapter site). The number that
    grows is ``max(1, floor(n * fraction))``.

    Example:
        >>> import torch
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.tensor([1., 1., 9., 9., 0., 0., 3., 3.]), kurtosis=torch.zeros(8),
        ...     outlier_aware=torch.zeros(8), param_count=torch.ones(8),
        ...     sites=[(f"m.{n}.lora_B.default", 2) for n in "abcd"])
        >>> plan_rank_growth(SalienceScores(step=1, adapter=b), new_budget=3, old_budget=2)
        {'m.a': 2, 'm.b': 3, 'm.c': 2, 'm.d': 3}
    """
    b = _adapter_scores(scores)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    current = {_layer_name(site)[0]: n for site, n in b.sites}
    if ranks is not None:
        unknown = [k for k in ranks if k not in current]
        if unknown:
            raise ValueError(f"ranks names adapters the scores do not have: {unknown[:3]} (known: {list(current)[:3]} ...)")
        current.update({k: int(v) for k, v in ranks.items()})
    ordered = rank_adapters(scores, score)
    n_grow = max(1, int(math.floor(len(ordered) * fraction + 1e-9)))
    grow = {name for name, _ in ordered[:n_grow]}
    return {name: grown_rank(r, new_budget, old_budget) if name in grow else r for name, r in current.items()}


def _lora_parts(layer: nn.Module, adapter_name: str) -> Tuple[nn.Linear, nn.Linear]:
    la, lb = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not isinstance(la, nn.ModuleDict) or not isinstance(lb, nn.ModuleDict):
        raise TypeError(f"layer must be a PEFT LoRA layer (with lora_A / lora_B ModuleDicts), got {type(layer).__name__}")
    if adapter_name not in la:
        raise ValueError(f"layer has no adapter {adapter_name!r} (adapters: {list(la.keys())})")
    a, b = la[adapter_name], lb[adapter_name]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        raise TypeError(f"grow_lora_rank supports Linear LoRA adapters; got {type(a).__name__} / {type(b).__name__}")
    dora = getattr(layer, "use_dora", {})
    if isinstance(dora, dict) and dora.get(adapter_name):
        raise ValueError("grow_lora_rank does not support DoRA adapters")
    return a, b


def lora_ranks(model: nn.Module, adapter_name: str = "default") -> Dict[str, int]:
    """``{LoRA layer name: current rank}`` of every PEFT LoRA layer holding ``adapter_name``."""
    out: Dict[str, int] = {}
    for name, m in model.named_modules():
        la = getattr(m, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and adapter_name in la:
            a = la[adapter_name]
            if isinstance(a, nn.Linear):
                out[name] = int(a.out_features)
    return out


def grow_lora_rank(
    layer: nn.Module,
    new_rank: int,
    *,
    adapter_name: str = "default",
    std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Grow a PEFT LoRA layer's rank to ``new_rank`` without changing its output.

    New rows of ``lora_A`` are drawn from ``N(0, std^2)`` (``std`` defaults to the standard
    deviation of the current ``lora_A`` weights, or ``1/sqrt(in_features)`` if that is 0); new
    columns of ``lora_B`` are zero. ``r`` is updated and ``lora_alpha`` rescaled so that the
    scaling stays what it was. The weights become new Parameters: rebuild the optimizer.

    Example:
        >>> import torch, peft
        >>> from torch import nn
        >>> from apt_salience.tuning import grow_lora_rank
        >>> net = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5)), peft.LoraConfig(r=2, target_modules=["0"],
        ...                           init_lora_weights=False))
        >>> x = torch.randn(3, 6); before = net(x)
        >>> grow_lora_rank(net.base_model.model[0], 5)
        >>> net.base_model.model[0].lora_A["default"].weight.shape, torch.allclose(net(x), before, atol=1e-6)
        (torch.Size([5, 6]), True)
    """
    a, b = _lora_parts(layer, adapter_name)
    r = int(a.out_features)
    if isinstance(new_rank, bool) or not isinstance(new_rank, int) or new_rank < r:
        raise ValueError(f"new_rank must be an int >= the current rank {r}, got {new_rank!r}")
    if new_rank == r:
        return
    if std is None:
        s = float(a.weight.detach().float().std()) if a.weight.numel() > 1 else 0.0
        std = s if s > 0 and math.isfinite(s) else 1.0 / math.sqrt(a.in_features)
    elif isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
        raise ValueError(f"std must be a number >= 0, got {std!r}")
    extra = new_rank - r
    with torch.no_grad():
        wa = a.weight.detach()
        rows = torch.randn(extra, a.in_features, generator=generator, dtype=torch.float32) * std
        new_a = torch.cat([wa, rows.to(device=wa.device, dtype=wa.dtype)], 0)
        wb = b.weight.detach()
        new_b = torch.cat([wb, torch.zeros(b.out_features, extra, device=wb.device, dtype=wb.dtype)], 1)
    a.weight = nn.Parameter(new_a, requires_grad=a.weight.requires_grad)
    b.weight = nn.Parameter(new_b, requires_grad=b.weight.requires_grad)
    a.out_features = new_rank
    b.in_features = new_rank
    r_dict = getattr(layer, "r", None)
    if isinstance(r_dict, dict):
        r_dict[adapter_name] = new_rank
    scaling = getattr(layer, "scaling", None)
    alpha = getattr(layer, "lora_alpha", None)
    if isinstance(scaling, dict) and isinstance(alpha, dict) and adapter_name in scaling:
        rs = getattr(layer, "use_rslora", {})
        denom = math.sqrt(new_rank) if isinstance(rs, dict) and rs.get(adapter_name) else new_rank
        alpha[adapter_name] = scaling[adapter_name] * denom


def apply_rank_plan(model: nn.Module, plan: Mapping[str, int], *, adapter_name: str = "default",
                    std: Optional[float] = None, generator: Optional[torch.Generator] = None) -> List[str]:
    """Grow every LoRA layer named in ``plan`` to its planned rank; returns the names that grew."""
    from .masks import resolve_module

    modules = dict(model.named_modules())
    grown: List[str] = []
    todo = []
    for name, rank in plan.items():
        real, layer = resolve_module(modules, name)
        a, _ = _lora_parts(layer, adapter_name)
        if rank < a.out_features:
            raise ValueError(f"plan shrinks '{real}' from rank {a.out_features} to {rank}; only growth is supported")
        todo.append((real, layer, rank, a.out_features))
    for real, layer, rank, r in todo:
        if rank > r:
            grow_lora_rank(layer, int(rank), adapter_name=adapter_name, std=std, generator=generator)
            grown.append(real)
    return grown


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyper-parameters over ``model``'s trainable parameters.

    Each old parameter group keeps its settings and those of its parameters that are still in the
    model (with their optimizer state); trainable parameters it did not know (grown or pruned
    weights) join the first group with fresh state.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    live = [p for p in model.parameters() if p.requires_grad]
    live_ids = {id(p) for p in live}
    known: set = set()
    groups: List[Dict[str, Any]] = []
    for g in optimizer.param_groups:
        params = [p for p in g["params"] if id(p) in live_ids]
        known.update(id(p) for p in params)
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    new = [p for p in live if id(p) not in known]
    if groups:
        groups[0]["params"] = groups[0]["params"] + new
    groups = [g for g in groups if g["params"]]
    # every group carries all its hyper-parameters; lr is passed for optimizers that require it
    extra = {"lr": optimizer.defaults["lr"]} if "lr" in optimizer.defaults else {}
    opt = type(optimizer)(groups, **extra)
    for g in groups:
        for p in g["params"]:
            if p in optimizer.state:
                opt.state[p] = optimizer.state[p]
    return opt
