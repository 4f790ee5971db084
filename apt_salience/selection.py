"""Budgeted block selection (APT Eq. 13-14).

:func:`select_blocks` ranks the heads, FFN neurons and hidden dimensions of a
:class:`~apt_salience.scores.SalienceScores` reading by density (score / parameter count)
and keeps the largest prefix whose parameter count

``C(i) = d_m' * sum_layers (c_head * n_h' + c_neuron * n_f')``

fits the budget (binary search over the monotone ``C``). ``c_head * d_model`` and
``c_neuron * d_model`` are the per-block parameter counts the tracker reports (current module
shapes; grouped-query attention and gated FFNs included), so ``C`` is ``d_m' / d_model`` times
the summed parameter count of the kept head and neuron blocks.

Allocation strategies and score calibrations live in two registries
(:data:`ALLOCATIONS`, :data:`CALIBRATIONS`); :func:`register_allocation` and
:func:`register_calibration` add new ones in one place.

Example:
    >>> import torch
    >>> from apt_salience.scores import BlockScores, SalienceScores
    >>> from apt_salience.selection import select_blocks
    >>> mk = lambda v, pc, sites: BlockScores.build(salience=torch.tensor(v), kurtosis=torch.zeros(len(v)),
    ...     outlier_aware=torch.tensor(v), param_count=torch.full((len(v),), pc), sites=sites)
    >>> scores = SalienceScores(step=1, d_model=4,
    ...     head=mk([4.0, 1.0], 32.0, [("l.0.o", 2)]), neuron=mk([1.0, 3.0, 0.1, 2.0], 8.0, [("l.0.down", 4)]),
    ...     hidden=mk([1.0] * 4, 24.0, [("hidden", 4)]))
    >>> sel = select_blocks(scores, keep_ratio=0.5, kinds=("head", "neuron"))
    >>> sel.head.tolist(), sel.neuron.tolist(), sel.params_kept, sel.budget
    ([True, False], [False, True, False, True], 48.0, 48.0)
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor

from .layout import PRUNABLE_KINDS, BlockLayout, PrunableKind
from .salience import normalize_scores
from .scores import BlockScores, SalienceScores, read_json, write_json

__all__ = [
    "BlockLayout",
    "Selection",
    "SelectionProblem",
    "SelectionWarning",
    "select_blocks",
    "cubic_keep_ratio",
    "update_masks",
    "ALLOCATIONS",
    "CALIBRATIONS",
    "register_allocation",
    "register_calibration",
    "PRUNABLE_KINDS",
    "UnobservedPolicy",
]

#: What :func:`select_blocks` does with the blocks of sites the tracker could not observe.
UnobservedPolicy = Literal["keep", "prune"]

MasksLike = Union["Selection", Mapping[str, Tensor]]


class SelectionWarning(UserWarning):
    """The selection could not honour the budget exactly (e.g. forced blocks exceed it)."""


# ---------------------------------------------------------------------------------------------
# Selection result


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select_blocks`: boolean keep-masks per kind plus what it costs.

    ``head``, ``neuron``, ``hidden``: 1-D bool tensors in the order of the scores (None when the
    scores lack that kind). ``params_kept``: ``C`` of the kept blocks; ``budget``: the budget it
    was selected under; ``params_total``: ``C`` of the whole model the scores describe;
    ``layout``: the sites it refers to (used by :func:`apt_salience.masks.apply_masks` and
    :func:`apt_salience.pruning.prune_model`); ``kinds``, ``score``, ``allocation``, ``calibration``:
    the settings it was selected with.
    """

    head: Optional[Tensor]
    neuron: Optional[Tensor]
    hidden: Optional[Tensor]
    params_kept: float
    budget: float
    params_total: float
    layout: BlockLayout
    kinds: Tuple[PrunableKind, ...] = PRUNABLE_KINDS
    score: str = "outlier_aware"
    allocation: str = "global"
    calibration: str = "none"

    def masks(self, dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
        """``{kind: mask}`` for the present kinds (bool, or cast to ``dtype``).

        Args:
            dtype: the dtype of the returned masks (None: bool).
        """
        out: Dict[str, Tensor] = {k: m for k in PRUNABLE_KINDS if (m := getattr(self, k)) is not None}
        return {k: m.to(dtype) for k, m in out.items()} if dtype is not None else out

    def by_site(self, kind: str) -> Dict[str, Tensor]:
        """``{site: that site's slice of the kind's mask}`` (empty when the kind is absent).

        Args:
            kind: ``head``, ``neuron`` or ``hidden``.
        """
        if kind not in PRUNABLE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(PRUNABLE_KINDS)}, got {kind!r}")
        m = getattr(self, kind)
        if m is None:
            return {}
        return {name: m[sl] for name, sl in self.layout.by_site(kind).items()}

    #: Deprecated alias of :meth:`by_site`.
    site_masks = by_site

    def num_kept(self) -> Dict[str, int]:
        """``{kind: number of kept blocks}``."""
        return {k: int(m.sum()) for k, m in self.masks().items()}

    def num_pruned(self) -> Dict[str, int]:
        """``{kind: number of pruned blocks}``."""
        return {k: int((~m).sum()) for k, m in self.masks().items()}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict, format ``apt_salience.selection/1`` (:meth:`from_dict` reads it back)."""
        return {
            "format": "apt_salience.selection/1",
            **{k: m.tolist() for k, m in self.masks().items()},
            "params_kept": self.params_kept,
            "budget": self.budget,
            "params_total": self.params_total,
            "layout": self.layout.to_dict(),
            "kinds": list(self.kinds),
            "score": self.score,
            "allocation": self.allocation,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Selection":
        """Read :meth:`to_dict`; a missing field is a ``ValueError`` naming it.

        Args:
            d: the dict.
        """
        if not isinstance(d, Mapping) or d.get("format") != "apt_salience.selection/1":
            raise ValueError("not an apt_salience selection dict (format 'apt_salience.selection/1' expected)")
        for key in ("params_kept", "budget", "params_total", "layout", "kinds", "score", "allocation", "calibration"):
            if key not in d:
                raise ValueError(f"selection dict is missing the field '{key}'")
        kinds = tuple(d["kinds"])
        bad = [k for k in kinds if k not in PRUNABLE_KINDS]
        if bad:
            raise ValueError(f"selection field 'kinds' has {bad}; kinds are {', '.join(PRUNABLE_KINDS)}")
        masks = {k: torch.tensor(d[k], dtype=torch.bool) if d.get(k) is not None else None for k in PRUNABLE_KINDS}
        return cls(
            masks["head"], masks["neuron"], masks["hidden"], float(d["params_kept"]), float(d["budget"]),
            float(d["params_total"]), BlockLayout.from_dict(d["layout"]), cast(Tuple[PrunableKind, ...], kinds),
            str(d["score"]), str(d["allocation"]), str(d["calibration"]),
        )

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write as JSON (:meth:`load` reads it back); returns the path.

        Args:
            path: the file (parent folders are created).
        """
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "Selection":
        """Read a file written by :meth:`save`.

        Args:
            path: the file.
        """
        return cls.from_dict(read_json(path, "selection"))

    def __repr__(self) -> str:
        kept = ", ".join(f"{k}={self.num_kept()[k]}/{m.numel()}" for k, m in self.masks().items())
        return (f"Selection({kept}, params_kept={self.params_kept:.6g}, budget={self.budget:.6g}, "
                f"params_total={self.params_total:.6g}, allocation={self.allocation!r})")


# ---------------------------------------------------------------------------------------------
# The problem handed to an allocation strategy


@dataclass
class SelectionProblem:
    """Everything an allocation strategy needs, over the blocks of the selected kinds.

    Blocks are concatenated kind after kind (head, neuron, hidden), model order within a kind, so
    the index itself is the tie-break order. ``cost`` is each head/neuron block's parameter count
    (0 for hidden dims); ``is_hidden`` marks hidden dims. A strategy returns a bool keep vector
    that keeps every ``forced`` block and no dead (``~alive``) block; :meth:`params` evaluates
    ``C`` for any keep vector. ``density``: each block's score over its parameter count; ``group``:
    its (kind, layer) group; ``site``: its site; ``alive``: not pruned before; ``fixed_cost``: the
    parameters of the head / neuron blocks of kinds not selected; ``fixed_hidden``: ``d_m'`` when hidden
    dims are not selected; ``d_model``: the hidden size.
    """

    density: Tensor  # float64 [N]
    cost: Tensor  # float64 [N]
    is_hidden: Tensor  # bool [N]
    group: Tensor  # int64 [N]: (kind, layer) group id
    site: Tensor  # int64 [N]: site id
    alive: Tensor  # bool [N]
    forced: Tensor  # bool [N]
    fixed_cost: float  # parameter count of the head/neuron blocks of kinds not selected (kept as they are)
    fixed_hidden: float  # d_m' when hidden dims are not selected
    d_model: int

    def params(self, keep: Tensor) -> float:
        """``C`` of the model that keeps these blocks.

        Args:
            keep: bool ``[N]``, the kept blocks.
        """
        h = float(keep[self.is_hidden].sum()) if bool(self.is_hidden.any()) else self.fixed_hidden
        return h / self.d_model * (self.fixed_cost + float(self.cost[keep].sum()))

    def prefix_params(self, order: Tensor) -> Tensor:
        """``C(i)`` for i = 0..len(order): the model made of the first i blocks of ``order`` (float64 [len+1]).

        Args:
            order: block indices, in the order they are kept.
        """
        z = torch.zeros(1, dtype=torch.float64)
        p = torch.cat([z, torch.cumsum(self.cost[order], 0)]) + self.fixed_cost
        if bool(self.is_hidden.any()):
            h = torch.cat([z, torch.cumsum(self.is_hidden[order].double(), 0)])
        else:
            h = torch.full_like(p, self.fixed_hidden)
        return h / self.d_model * p


AllocationFn = Callable[[SelectionProblem, float], Tensor]
CalibrationFn = Callable[[str, Tensor, Sequence[Tuple[str, int]]], Tensor]


def _density_order(prob: SelectionProblem, idx: Optional[Tensor] = None) -> Tensor:
    """Indices sorted by (forced first, density descending, index): dead blocks excluded."""
    if idx is None:
        idx = torch.arange(prob.density.numel())
    idx = idx[prob.alive[idx]]
    d = prob.density[idx]
    o = torch.sort(d, descending=True, stable=True).indices
    idx = idx[o]
    f = prob.forced[idx]
    if bool(f.any()):
        idx = torch.cat([idx[f], idx[~f]])
    return idx


def _last_fitting(c: Tensor, budget: float, lo: int) -> int:
    """Largest i >= lo with c[i] <= budget (c non-decreasing), by binary search; lo if none."""
    tol = budget * 1e-12
    i = int(torch.searchsorted(c, torch.tensor([budget + tol], dtype=c.dtype), right=True)[0]) - 1
    return max(i, lo)


def _allocate_global(prob: SelectionProblem, budget: float) -> Tensor:
    """APT: one global density sort, keep the largest prefix with ``C(i) <= budget``."""
    order = _density_order(prob)
    c = prob.prefix_params(order)
    n_forced = int(prob.forced.sum())
    i = _last_fitting(c, budget, n_forced)
    keep = torch.zeros_like(prob.alive)
    keep[order[:i]] = True
    return keep


def _allocate_uniform(prob: SelectionProblem, budget: float) -> Tensor:
    """Keep the same fraction ``f`` of every (kind, layer) group, by density within the group.

    ``k_g(f) = clamp(floor(f * n_g), forced_g, alive_g)``; the largest ``f`` (among the
    breakpoints ``j / n_g``) with ``C <= budget`` is found by binary search.
    """
    n = prob.density.numel()
    n_groups = int(prob.group.max()) + 1 if n else 0
    order = _density_order(prob)  # forced first, then density: alive blocks only
    grp_sorted = prob.group[order]
    o = torch.sort(grp_sorted, stable=True).indices  # by group, density order within each group
    by_group = order[o]
    g_o = grp_sorted[o]
    size_alive = torch.bincount(g_o, minlength=n_groups)
    starts = torch.cumsum(size_alive, 0) - size_alive
    rank = torch.full((n,), n + 1, dtype=torch.int64)
    rank[by_group] = torch.arange(g_o.numel()) - starts[g_o]
    size_all = torch.bincount(prob.group, minlength=n_groups)
    n_forced = torch.bincount(prob.group[prob.forced], minlength=n_groups)
    z = torch.zeros(1, dtype=torch.float64)
    cum_cost = torch.cat([z, torch.cumsum(prob.cost[by_group], 0)])
    cum_hid = torch.cat([z, torch.cumsum(prob.is_hidden[by_group].double(), 0)])
    has_hidden = bool(prob.is_hidden.any())

    def k_for(f: float) -> Tensor:
        k = torch.floor(f * size_all.double() + 1e-9).long()
        return torch.minimum(torch.maximum(k, n_forced), size_alive)

    def params(f: float) -> float:  # O(groups): prefix sums within each group
        end = starts + k_for(f)
        p = float((cum_cost[end] - cum_cost[starts]).sum()) + prob.fixed_cost
        h = float((cum_hid[end] - cum_hid[starts]).sum()) if has_hidden else prob.fixed_hidden
        return h / prob.d_model * p

    sizes = sorted({int(x) for x in size_all.tolist() if x})
    cands = torch.unique(torch.cat([torch.arange(sz + 1, dtype=torch.float64) / sz for sz in sizes])).tolist()
    limit = budget * (1 + 1e-12)
    lo, hi = 0, len(cands) - 1
    if params(cands[0]) <= limit:
        while lo < hi:  # largest candidate fraction with C <= budget
            mid = (lo + hi + 1) // 2
            if params(cands[mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
    return rank < k_for(cands[lo])[prob.group]


def _calibrate_none(kind: str, values: Tensor, sites: Sequence[Tuple[str, int]]) -> Tensor:
    return values


def _calibrate_site_mean(kind: str, values: Tensor, sites: Sequence[Tuple[str, int]]) -> Tensor:
    """Divide each site's scores by that site's mean score (sites with a mean <= 0 are left as they are)."""
    out = values.clone()
    start = 0
    for _, count in sites:
        sl = slice(start, start + count)
        mean = float(values[sl].mean()) if count else 0.0
        if mean > 0 and math.isfinite(mean):
            out[sl] = values[sl] / mean
        start += count
    return out


def _allocate_relative(prob: SelectionProblem, budget: float) -> Tensor:
    """One global sort of each block's density divided by its site's mean density (alive blocks).

    Scale-free across sites and kinds: multiplying one site's scores by a constant (a layer with
    smaller gradients, another kind with other units) changes nothing, unlike ``global``; and,
    unlike ``uniform``, sites whose scores are concentrated on a few blocks give up more of the
    others. A site whose mean density is not positive keeps its raw density.
    """
    n_sites = int(prob.site.max()) + 1 if prob.site.numel() else 0
    a = prob.alive
    sums = torch.zeros(n_sites, dtype=torch.float64).index_add_(0, prob.site[a], prob.density[a])
    counts = torch.bincount(prob.site[a], minlength=n_sites).double()
    mean = sums / counts.clamp(min=1)
    ok = (mean > 0) & torch.isfinite(mean)
    div = torch.where(ok, mean, torch.ones_like(mean))[prob.site]
    rel = SelectionProblem(**{**prob.__dict__, "density": prob.density / div})
    return _allocate_global(rel, budget)


#: Allocation strategies: name -> fn(problem, budget) -> keep (bool [N]).
ALLOCATIONS: Dict[str, AllocationFn] = {"global": _allocate_global, "uniform": _allocate_uniform,
                                        "relative": _allocate_relative}
#: Score calibrations applied per kind before density: name -> fn(kind, values, sites) -> values.
CALIBRATIONS: Dict[str, CalibrationFn] = {"none": _calibrate_none, "site_mean": _calibrate_site_mean}


def register_allocation(name: str, fn: AllocationFn) -> None:
    """Add an allocation strategy usable as ``select_blocks(..., allocation=name)``.

    Args:
        name: the name ``select_blocks`` takes.
        fn: ``fn(problem, budget) -> bool keep tensor`` (see :class:`SelectionProblem`).
    """
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError("register_allocation(name: str, fn: callable(problem, budget) -> bool keep tensor)")
    ALLOCATIONS[name] = fn


def register_calibration(name: str, fn: CalibrationFn) -> None:
    """Add a calibration usable as ``select_blocks(..., calibration=name)``.

    Args:
        name: the name ``select_blocks`` takes.
        fn: ``fn(kind, values, sites) -> values`` (per-block scores of one kind, and its sites).
    """
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError("register_calibration(name: str, fn: callable(kind, values, sites) -> values)")
    CALIBRATIONS[name] = fn


# ---------------------------------------------------------------------------------------------


_SCORE_FIELDS = ("outlier_aware", "salience", "kurtosis", "density", "param_count")


def _score_values(scores: SalienceScores, kind: str, score: Union[str, Mapping[str, Tensor]], n: int) -> Tensor:
    if isinstance(score, str):
        b: BlockScores = getattr(scores, kind)
        v = getattr(b, score)
    else:
        if kind not in score:
            raise ValueError(f"score dict has no entry for kind {kind!r} (keys: {sorted(score)}); give one per selected kind")
        v = score[kind]
        if not isinstance(v, Tensor):
            v = torch.as_tensor(v)
    v = v.detach().to("cpu", torch.float64).reshape(-1) if v.dim() <= 1 else v
    if v.dim() != 1 or v.numel() != n:
        raise ValueError(
            f"score for kind {kind!r} has shape {tuple(v.shape)} but the scores have {n} {kind} blocks "
            "(custom scores must follow the layout of the scores: same sites, same order)"
        )
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"score for kind {kind!r} has non-finite values (NaN/inf); cannot rank")
    return v


def _previous_alive(previous: Optional[MasksLike], layout: BlockLayout) -> Dict[str, Tensor]:
    if previous is None:
        return {}
    if isinstance(previous, Selection):
        for kind, sites in previous.layout.sites.items():
            if layout.sites.get(kind) != sites:
                raise ValueError(
                    f"previous selection was made for a different block layout ({kind} sites differ from the "
                    "scores'); selections and scores must come from the same model"
                )
        prev = layout.check_masks(previous.masks(torch.float32), "previous")
    else:
        prev = layout.check_masks(previous, "previous")
    return {k: m > 0 for k, m in prev.items()}


def select_blocks(
    scores: SalienceScores,
    *,
    keep_ratio: Optional[float] = None,
    budget: Optional[float] = None,
    kinds: Sequence[str] = ("head", "neuron", "hidden"),
    score: Union[str, Mapping[str, Tensor]] = "outlier_aware",
    allocation: str = "global",
    calibration: str = "none",
    min_per_site: int = 0,
    previous: Optional[MasksLike] = None,
    unobserved: UnobservedPolicy = "keep",
) -> Selection:
    """Select the blocks to keep under a parameter budget (APT Eq. 13-14).

    Args:
        scores: a tracker reading (its ``layout`` says which blocks there are).
        keep_ratio: in (0, 1]: ``budget = keep_ratio * C(all)``, ``C(all)`` being every block the scores
            describe (blocks pruned in ``previous`` included). Exactly one of ``keep_ratio`` / ``budget``.
        budget: the parameter budget ``C`` (head + neuron weights, scaled by ``d_m' / d_model``). With
            grouped-query attention a head costs ``(2 + 2 n_kv / n_h) d_head d_model`` (its share of the
            KV projections), as in the tracker's parameter counts; :func:`~apt_salience.pruning.prune_model`
            reports what physically goes.
        kinds: which kinds are pruned; a kind left out is kept as it is (whole, or as ``previous`` has it),
            and when ``hidden`` is left out ``d_m'`` is the number of kept hidden dims (``d_model``).
        score: a :class:`~apt_salience.scores.BlockScores` field name (``"outlier_aware"``, ``"salience"``,
            ...) or ``{kind: 1-D tensor}`` of custom per-block scores in the layout of ``scores``.
        allocation: ``"global"`` (APT: one density sort over all kinds and layers), ``"uniform"``
            (the same fraction of every (kind, layer) group, by density within the group),
            ``"relative"`` (each block's density relative to its site's mean density, then one global
            sort), or any name added with :func:`register_allocation`.
        calibration: ``"none"`` or ``"site_mean"`` (each site's scores divided by the site's mean before
            density), or any name added with :func:`register_calibration`.
        min_per_site: keep at least this many blocks of every site (the most dense ones), e.g. 1 so that
            no attention or FFN is emptied. Counted against the budget; a warning if they alone exceed it.
        previous: an earlier :class:`Selection` or ``{kind: mask}`` (float masks: 0 means pruned): blocks
            pruned there stay pruned.
        unobserved: what to do with the head and neuron blocks of the sites the tracker could not
            observe (``scores.unobserved_sites``: their inputs never required grad, e.g. frozen lower
            layers without ``model.enable_input_require_grads()``, so their salience is 0, not
            measured). ``"keep"`` (default): they are kept, counted against the budget like
            ``min_per_site`` blocks, and a :class:`SelectionWarning` names the sites; ``"prune"``:
            they are ranked by their scores like any other block (salience 0 ranks them first
            for pruning).

    Ties in density are broken by kind (head, neuron, hidden) and then model order.

    Example:
        >>> import torch, apt_salience
        >>> from torch import nn
        >>> from apt_salience.selection import select_blocks
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.o = nn.Linear(8, 8); self.up = nn.Linear(8, 16); self.down = nn.Linear(16, 8)
        ...     def forward(self, x): return x + self.down(torch.relu(self.up(x + self.o(x))))
        >>> model = nn.Sequential(Block(), Block())
        >>> cfg = {"architecture": "custom", "sites": {"heads": r".*\\.o", "neurons": r".*\\.down", "head_dim": 4}}
        >>> with apt_salience.attach(model, cfg) as tracker:
        ...     model(torch.randn(3, 5, 8, requires_grad=True)).pow(2).mean().backward(); _ = tracker.step()
        ...     sel = select_blocks(tracker.scores(), keep_ratio=0.5, kinds=("head", "neuron"))
        >>> sel.params_kept <= sel.budget == 0.5 * sel.params_total
        True
    """
    kinds = _check_arguments(scores, keep_ratio, budget, kinds, score, allocation, calibration, min_per_site, unobserved)
    layout = scores.layout.restrict(PRUNABLE_KINDS)
    missing = [k for k in kinds if k not in layout.sites]
    if missing:
        raise ValueError(f"the scores have no {', '.join(missing)} blocks; available kinds: {layout.kinds()}")
    if not any(k in layout.sites for k in ("head", "neuron")):
        raise ValueError("the scores have no head or neuron blocks, so there is no parameter budget to select under")
    if layout.d_model <= 0:
        raise ValueError("the scores have no d_model (hidden size); cannot compute parameter counts")
    for k, pc in layout.param_count.items():
        if pc.numel() and not bool((pc > 0).all() and torch.isfinite(pc).all()):
            raise ValueError(f"the {k} parameter counts must be positive and finite")
    alive_prev = _previous_alive(previous, layout)

    prob, held = _problem(scores, layout, kinds, score, calibration, min_per_site, alive_prev, unobserved)
    if held:
        warnings.warn(
            f"apt_salience: {len(held)} site(s) were never observed by the tracker (their inputs did not require "
            f"grad, so their salience is 0, not measured): {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}; "
            "their blocks are kept. Call model.enable_input_require_grads() before training to score them, or pass "
            "unobserved='prune' to rank them by their zero scores",
            SelectionWarning,
            stacklevel=2,
        )
    # every block kept: d_m' = d_model
    params_total = sum(float(layout.param_count[k].sum()) for k in ("head", "neuron") if k in layout.param_count)
    if keep_ratio is not None:
        budget = float(keep_ratio) * params_total
    assert budget is not None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive finite parameter count, got {budget!r}")
    if budget > params_total * (1 + 1e-9):
        raise ValueError(
            f"budget {budget:.6g} is larger than the model the scores describe ({params_total:.6g} parameters in "
            "head and neuron blocks); use a smaller budget or keep_ratio <= 1"
        )
    budget = float(budget)

    keep = ALLOCATIONS[allocation](prob, budget)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != prob.alive.shape:
        raise TypeError(f"allocation {allocation!r} must return a bool tensor of shape {tuple(prob.alive.shape)}")
    keep = keep & prob.alive
    kept_params = prob.params(keep)
    if kept_params > budget * (1 + 1e-9):
        warnings.warn(
            f"apt_salience: the blocks that must be kept (kinds not selected: "
            f"{[k for k in layout.kinds() if k not in kinds]}, min_per_site={min_per_site}"
            f"{f', {len(held)} unobserved site(s)' if held else ''}) need {kept_params:.6g} "
            f"parameters, more than the budget {budget:.6g}",
            SelectionWarning,
            stacklevel=2,
        )

    masks: Dict[str, Optional[Tensor]] = {k: None for k in PRUNABLE_KINDS}
    start = 0
    for kind in layout.kinds():
        n = layout.num_blocks(kind)
        if kind in kinds:
            masks[kind] = keep[start : start + n].clone()
            start += n
        else:
            masks[kind] = alive_prev.get(kind, torch.ones(n, dtype=torch.bool)).clone()
    return Selection(
        masks["head"], masks["neuron"], masks["hidden"], kept_params, budget, params_total, layout,
        cast(Tuple[PrunableKind, ...], kinds), score if isinstance(score, str) else "custom", allocation, calibration,
    )


def _check_arguments(scores: Any, keep_ratio: Any, budget: Any, kinds: Any, score: Any, allocation: Any,
                     calibration: Any, min_per_site: Any, unobserved: Any) -> Tuple[str, ...]:
    """Every argument check of :func:`select_blocks`; returns ``kinds`` as a tuple."""
    if not isinstance(scores, SalienceScores):
        raise TypeError(f"scores must be an apt_salience SalienceScores, got {type(scores).__name__}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in PRUNABLE_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {PRUNABLE_KINDS}, got {kinds!r}")
    if isinstance(score, str):
        if score not in _SCORE_FIELDS:
            raise ValueError(f"score must be one of {_SCORE_FIELDS} or a dict {{kind: tensor}}, got {score!r}")
    elif not isinstance(score, Mapping):
        raise TypeError(f"score must be a BlockScores field name or a dict {{kind: tensor}}, got {type(score).__name__}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {sorted(ALLOCATIONS)}, got {allocation!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {sorted(CALIBRATIONS)}, got {calibration!r}")
    if isinstance(min_per_site, bool) or not isinstance(min_per_site, int) or min_per_site < 0:
        raise ValueError(f"min_per_site must be an int >= 0, got {min_per_site!r}")
    if unobserved not in ("keep", "prune"):
        raise ValueError(f"unobserved must be 'keep' or 'prune', got {unobserved!r}")
    if (keep_ratio is None) == (budget is None):
        raise ValueError("give exactly one of keep_ratio (fraction in (0, 1]) or budget (parameter count)")
    if keep_ratio is not None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")

    return kinds


def _problem(scores: SalienceScores, layout: BlockLayout, kinds: Tuple[str, ...], score: Union[str, Mapping[str, Tensor]],
             calibration: str, min_per_site: int, alive_prev: Dict[str, Tensor],
             unobserved: str) -> Tuple["SelectionProblem", List[str]]:
    """The blocks of the selected kinds, in tie-break order, as a :class:`SelectionProblem`; and the
    unobserved sites whose blocks are held (kept whole)."""
    # per-kind data in tie-break order
    calib = CALIBRATIONS[calibration]
    dens: List[Tensor] = []
    cost: List[Tensor] = []
    hid: List[Tensor] = []
    grp: List[Tensor] = []
    sid: List[Tensor] = []
    alive: List[Tensor] = []
    frozen: List[Tensor] = []  # blocks of unobserved sites, kept whole under unobserved="keep"
    unobserved_sites = set(scores.unobserved_sites) if unobserved == "keep" else set()
    held: List[str] = []
    group_ids: Dict[Tuple[str, str], int] = {}
    n_sites = 0
    fixed_cost = 0.0
    fixed_hidden = float(layout.d_model)
    for kind in layout.kinds():
        n = layout.num_blocks(kind)
        pc = layout.param_count[kind]
        a = alive_prev.get(kind, torch.ones(n, dtype=torch.bool))
        if kind not in kinds:
            if kind == "hidden":
                fixed_hidden = float(a.sum())
            else:
                fixed_cost += float(pc[a].sum())
            continue
        v = calib(kind, _score_values(scores, kind, score, n), layout.sites[kind]).to(torch.float64)
        dens.append(normalize_scores(v, pc))
        cost.append(pc if kind != "hidden" else torch.zeros(n, dtype=torch.float64))
        hid.append(torch.full((n,), kind == "hidden"))
        alive.append(a)
        g = torch.empty(n, dtype=torch.int64)
        s = torch.empty(n, dtype=torch.int64)
        fz = torch.zeros(n, dtype=torch.bool)
        for name, sl in layout.by_site(kind).items():
            key = (kind, layout.layers.get(name, name) if kind != "hidden" else "hidden")
            g[sl] = group_ids.setdefault(key, len(group_ids))
            s[sl] = n_sites
            n_sites += 1
            if kind != "hidden" and name in unobserved_sites:
                fz[sl] = True
                held.append(name)
        grp.append(g)
        sid.append(s)
        frozen.append(fz)

    prob = SelectionProblem(
        density=torch.cat(dens), cost=torch.cat(cost), is_hidden=torch.cat(hid), group=torch.cat(grp),
        site=torch.cat(sid), alive=torch.cat(alive), forced=torch.zeros(sum(a.numel() for a in alive), dtype=torch.bool),
        fixed_cost=fixed_cost, fixed_hidden=fixed_hidden, d_model=layout.d_model,
    )
    prob.forced = _forced(prob, min_per_site, n_sites) | (torch.cat(frozen) & prob.alive)
    return prob, held


def _forced(prob: SelectionProblem, min_per_site: int, n_sites: int) -> Tensor:
    """The ``min_per_site`` most dense alive blocks of every site."""
    forced = torch.zeros_like(prob.alive)
    if min_per_site <= 0:
        return forced
    order = _density_order(prob)  # nothing forced yet: density order among alive blocks
    s = prob.site[order]
    o = torch.sort(s, stable=True).indices
    s_o = s[o]
    counts = torch.bincount(s_o, minlength=n_sites)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(s_o.numel()) - starts[s_o]
    forced[order[o][rank < min_per_site]] = True
    return forced


# ---------------------------------------------------------------------------------------------
# The schedule and the gradual mask update live in apt_salience.pruner, beside the pruner that uses
# them; they stay importable from here.


def __getattr__(name: str) -> Any:
    if name in ("cubic_keep_ratio", "update_masks"):
        from . import pruner

        return getattr(pruner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
