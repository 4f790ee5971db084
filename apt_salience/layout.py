"""The block layout of a model or a reading: :class:`BlockLayout`, and the block-kind names.

A layout says which blocks a vector of scores, a selection or a set of masks refers to: per
kind, the sites in model order with their number of blocks; per site, its block size (``d_head``
for head sites, 1 otherwise) and its layer; each block's parameter count (from the current
module shapes); ``d_model``; the architecture. It is computed in one place,
:meth:`BlockLayout.from_sites`, from the sites :func:`~apt_salience.architectures.find_sites`
finds; a tracker reading carries it (``scores.layout``), :meth:`BlockLayout.from_model` builds it
without any scores.

Parameter counts (DESIGN, "Parameter counts"): a head or neuron block's count is the site's
``block_param_count`` (:func:`~apt_salience.salience.head_param_count`,
:func:`~apt_salience.salience.neuron_param_count`); one hidden dimension costs the head and
neuron parameters of every site that writes the residual stream divided by ``d_model``
(:func:`hidden_block_param_count`); an adapter rank ``in + out`` of its LoRA pair.

Example:
    >>> from torch import nn
    >>> from apt_salience.layout import BlockLayout
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    >>> lay = BlockLayout.from_model(m, {"architecture": "custom", "sites": {"neurons": "1"}})
    >>> lay.sites["neuron"], lay.d_model, lay.param_count["hidden"].tolist()
    ((('1', 8),), 4, [16.0, 16.0, 16.0, 16.0])
    >>> lay.by_site("neuron")
    {'1': slice(0, 8, None)}
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .architectures import Site

__all__ = [
    "BlockKind",
    "PrunableKind",
    "SiteKind",
    "KINDS",
    "PRUNABLE_KINDS",
    "BlockLayout",
    "hidden_block_param_count",
    "layer_of",
]

#: A block kind: attention head, FFN neuron, hidden (model) dimension, adapter rank.
BlockKind = Literal["head", "neuron", "hidden", "adapter"]
#: The kinds a selection can prune.
PrunableKind = Literal["head", "neuron", "hidden"]
#: The kinds of hooked sites (the hidden kind has no site of its own: it is the sites' outputs).
SiteKind = Literal["head", "neuron", "adapter"]

#: Block kinds in the order they appear in results.
KINDS: Tuple[BlockKind, ...] = ("head", "neuron", "hidden", "adapter")
#: Kinds a selection covers, in tie-break order.
PRUNABLE_KINDS: Tuple[PrunableKind, ...] = ("head", "neuron", "hidden")

#: The pseudo-site name of the hidden kind (one site with ``d_model`` blocks).
HIDDEN_SITE = "hidden"


def layer_of(name: str) -> str:
    """The layer a site belongs to: its module name up to the first numeric component.

    Args:
        name: a module name.

    Example:
        >>> layer_of("encoder.layer.3.attention.output.dense"), layer_of("fc2")
        ('encoder.layer.3', 'fc2')
    """
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name.rsplit(".", 1)[0] if "." in name else name


def hidden_block_param_count(sites: Sequence["Site"], d_model: int) -> float:
    """Parameters of one hidden dimension: the head and neuron parameters of every site that writes it, over ``d_model``.

    This is :func:`~apt_salience.salience.hidden_param_count` computed from the current module
    shapes (``sum_layers (2 n_h + 2 n_kv) d_head + (2|3) d_ff``; T5 cross-attention included).

    Args:
        sites: the sites :func:`~apt_salience.architectures.find_sites` returned.
        d_model: the hidden size (> 0).
    """
    if d_model <= 0:
        raise ValueError(f"d_model must be positive, got {d_model!r}")
    return sum(s.num_blocks * s.block_param_count for s in sites if s.writes_hidden) / d_model


def _as_f64(t: Any) -> Tensor:
    return torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)


@dataclass(frozen=True)
class BlockLayout:
    """Which blocks a reading, a selection or a mask set refers to.

    Attributes:
        sites: per kind, ``(module_name, num_blocks)`` in model order (``hidden`` has the single
            pseudo-site ``("hidden", d_model)``).
        block_size: per site, ``d_head`` for head sites and 1 otherwise (a head size missing from an
            old scores file is read from the model by :func:`~apt_salience.architectures.block_size_of`).
        layers: per site, the layer it belongs to (:func:`layer_of` for tracker sites).
        d_model: the hidden size.
        param_count: per kind, the per-block parameter counts (float64).
        architecture: the preset name (``custom`` for configured sites; None when unknown).
    """

    sites: Dict[str, Tuple[Tuple[str, int], ...]]
    block_size: Dict[str, int]
    layers: Dict[str, str]
    d_model: int
    param_count: Dict[str, Tensor] = field(default_factory=dict)
    architecture: Optional[str] = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_sites(cls, sites: Sequence["Site"], architecture: Optional[str] = None) -> "BlockLayout":
        """The layout of the sites :func:`~apt_salience.architectures.find_sites` found (every kind, hidden included).

        Args:
            sites: the sites, in model order.
            architecture: the architecture name ``find_sites`` returned.
        """
        per_kind: Dict[str, List[Tuple[str, int]]] = {}
        counts: Dict[str, List[Tensor]] = {}
        for s in sites:
            per_kind.setdefault(s.kind, []).append((s.name, s.num_blocks))
            counts.setdefault(s.kind, []).append(torch.full((s.num_blocks,), float(s.block_param_count),
                                                            dtype=torch.float64))
        d_model = next((s.out_features for s in sites if s.writes_hidden), 0)
        if d_model:
            per_kind[HIDDEN_SITE] = [(HIDDEN_SITE, d_model)]
            counts[HIDDEN_SITE] = [torch.full((d_model,), hidden_block_param_count(sites, d_model), dtype=torch.float64)]
        order = [k for k in KINDS if k in per_kind and sum(c for _, c in per_kind[k]) > 0]
        return cls(
            {k: tuple(per_kind[k]) for k in order},
            {s.name: s.block_size for s in sites},
            {s.name: s.layer for s in sites},
            d_model,
            {k: torch.cat(counts[k]) for k in order},
            architecture,
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: Any = None) -> "BlockLayout":
        """The layout of a model's head / neuron sites and hidden dims (no scores needed), e.g. to build masks by hand.

        Args:
            model: the model (its current shapes are read).
            config: the tracker config that names the sites (None, a YAML path, a dict or a
                :class:`~apt_salience.SalienceConfig`); only ``architecture`` and ``sites`` matter.

        Example:
            >>> from torch import nn
            >>> m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
            >>> lay = BlockLayout.from_model(m, {"architecture": "custom", "sites": {"neurons": "1"}})
            >>> lay.sites["neuron"], lay.d_model
            ((('1', 8),), 4)
        """
        from .architectures import find_sites
        from .config import load_config

        sites, arch = find_sites(model, load_config(config))
        return cls.from_sites(sites, arch).restrict(PRUNABLE_KINDS)

    @classmethod
    def from_blocks(cls, blocks: Mapping[str, Any], *, d_model: int = 0, block_size: Optional[Mapping[str, int]] = None,
                    layers: Optional[Mapping[str, str]] = None, architecture: Optional[str] = None) -> "BlockLayout":
        """The layout described by per-kind scores (objects with ``sites`` and ``param_count``, e.g. ``BlockScores``).

        What the scores do not say is filled in: a neuron or adapter site's block size is 1 (a
        head site's is left out: it is read from the model when needed), a site's layer is
        :func:`layer_of` its name, ``d_model`` is the number of hidden blocks.

        Args:
            blocks: ``{kind: scores of that kind}``.
            d_model: the hidden size (0: from the hidden kind).
            block_size: known block sizes per site.
            layers: known layers per site.
            architecture: the architecture name.
        """
        bsz = {str(k): int(v) for k, v in dict(block_size or {}).items()}
        lay = {str(k): str(v) for k, v in dict(layers or {}).items()}
        sites: Dict[str, Tuple[Tuple[str, int], ...]] = {}
        counts: Dict[str, Tensor] = {}
        for kind in KINDS:
            b = blocks.get(kind)
            if b is None:
                continue
            sites[kind] = tuple((str(n), int(c)) for n, c in b.sites)
            counts[kind] = _as_f64(b.param_count)
            if kind != "hidden":
                for name, _ in sites[kind]:
                    if kind != "head":
                        bsz.setdefault(name, 1)
                    lay.setdefault(name, layer_of(name))
        d = int(d_model) or (sum(c for _, c in sites["hidden"]) if "hidden" in sites else 0)
        return cls(sites, bsz, lay, d, counts, architecture)

    @classmethod
    def from_scores(cls, scores: Any) -> "BlockLayout":
        """The head / neuron / hidden layout of a tracker reading (``scores.layout`` restricted to the prunable kinds).

        Args:
            scores: a :class:`~apt_salience.SalienceScores`.
        """
        from .scores import SalienceScores

        if not isinstance(scores, SalienceScores):
            raise TypeError(f"scores must be an apt_salience SalienceScores, got {type(scores).__name__}")
        return scores.layout.restrict(PRUNABLE_KINDS)

    def restrict(self, kinds: Sequence[str]) -> "BlockLayout":
        """The same layout with only ``kinds`` (block sizes and layers of the other kinds' sites dropped).

        Args:
            kinds: the kinds kept.
        """
        keep = [k for k in KINDS if k in self.sites and k in kinds]
        if keep == list(self.sites):
            return self
        names = {n for k in keep for n, _ in self.sites[k]}
        return replace(
            self,
            sites={k: self.sites[k] for k in keep},
            block_size={n: v for n, v in self.block_size.items() if n in names},
            layers={n: v for n, v in self.layers.items() if n in names},
            param_count={k: v for k, v in self.param_count.items() if k in keep},
        )

    # ------------------------------------------------------------------ reading

    def kinds(self) -> Tuple[BlockKind, ...]:
        """Kinds present, in :data:`KINDS` order."""
        return tuple(k for k in KINDS if k in self.sites)

    def num_blocks(self, kind: str) -> int:
        """Number of blocks of ``kind`` (0 when absent).

        Args:
            kind: a block kind.
        """
        return sum(c for _, c in self.sites.get(kind, ()))

    def by_site(self, kind: str) -> Dict[str, slice]:
        """``{site: its slice of the kind's 1-D vectors}`` (the per-site view; see also ``BlockScores.by_site``).

        Args:
            kind: a block kind.
        """
        out: Dict[str, slice] = {}
        start = 0
        for name, count in self.sites.get(kind, ()):
            out[name] = slice(start, start + count)
            start += count
        return out

    #: Deprecated alias of :meth:`by_site`.
    slices = by_site

    def site_names(self, kinds: Sequence[str] = ("head", "neuron", "adapter")) -> List[str]:
        """The names of the sites of ``kinds``, in kind and model order.

        Args:
            kinds: the kinds listed.
        """
        return [n for k in KINDS if k in kinds for n, _ in self.sites.get(k, ())]

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict (:meth:`from_dict` reads it back)."""
        return {
            "sites": {k: [[n, c] for n, c in v] for k, v in self.sites.items()},
            "block_size": dict(self.block_size),
            "layers": dict(self.layers),
            "d_model": self.d_model,
            "param_count": {k: v.tolist() for k, v in self.param_count.items()},
            "architecture": self.architecture,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BlockLayout":
        """Read :meth:`to_dict`; a missing or malformed field is a ``ValueError`` naming it.

        Args:
            d: the dict.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a block layout must be a dict, got {type(d).__name__}")
        for key in ("sites", "block_size", "layers", "d_model"):
            if key not in d:
                raise ValueError(f"block layout dict is missing the field '{key}'")
        try:
            sites = {str(k): tuple((str(n), int(c)) for n, c in v) for k, v in dict(d["sites"]).items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"block layout field 'sites' must map kinds to [[site, blocks], ...] ({exc})") from None
        bad = [k for k in sites if k not in KINDS]
        if bad:
            raise ValueError(f"block layout field 'sites' has unknown kind(s) {bad}; kinds are {', '.join(KINDS)}")
        return cls(
            sites,
            {str(k): int(v) for k, v in dict(d["block_size"]).items()},
            {str(k): str(v) for k, v in dict(d["layers"]).items()},
            int(d["d_model"]),
            {str(k): torch.tensor(v, dtype=torch.float64) for k, v in dict(d.get("param_count") or {}).items()},
            cast(Optional[str], d.get("architecture")),
        )

    # ------------------------------------------------------------------ masks

    def check_masks(self, masks: Mapping[str, Tensor], what: str = "masks") -> Dict[str, Tensor]:
        """Validate ``{kind: 1-D mask}`` against the layout; returns the masks as float32 CPU tensors.

        Args:
            masks: one 1-D tensor per kind, in this layout's block order.
            what: how errors name the masks.
        """
        if not isinstance(masks, Mapping):
            raise TypeError(f"{what} must be a Selection or a dict {{kind: 1-D tensor}}, got {type(masks).__name__}")
        out: Dict[str, Tensor] = {}
        for kind, m in masks.items():
            if m is None:
                continue
            if kind not in self.sites:
                raise ValueError(
                    f"{what} has kind {kind!r}, which the layout does not have (kinds: {', '.join(self.kinds())})"
                )
            if not isinstance(m, Tensor):
                raise TypeError(f"{what}[{kind!r}] must be a torch.Tensor, got {type(m).__name__}")
            n = self.num_blocks(kind)
            if m.dim() != 1 or m.numel() != n:
                raise ValueError(
                    f"{what}[{kind!r}] has shape {tuple(m.shape)} but the layout has {n} {kind} blocks; "
                    "masks and scores must come from the same model"
                )
            out[kind] = m.detach().to("cpu", torch.float32)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return (self.sites == other.sites and self.block_size == other.block_size and self.layers == other.layers
                and self.d_model == other.d_model and self.architecture == other.architecture
                and self.param_count.keys() == other.param_count.keys()
                and all(torch.equal(v, other.param_count[k]) for k, v in self.param_count.items()))
