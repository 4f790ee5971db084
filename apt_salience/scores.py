"""Read-only results: :class:`SalienceScores` holds one :class:`BlockScores` per block kind and the typed layout.

A reading is self-contained: besides the scores of each kind it carries the block layout
(:class:`~apt_salience.layout.BlockLayout`: sites, block sizes, layers, parameter counts,
``d_model``, architecture), the tracker config it was computed under, the number of optimizer
steps in its window, the sites whose tensors never required grad (``unobserved_sites``) and,
when ``uncertainty_beta`` is set, each kind's AdaLoRA-style uncertainty. Readers (selection,
pruner, tuner, masks, pruning, reconstruction, the Trainer callback) need nothing but the reading.

Files: :meth:`SalienceScores.save` writes format ``apt_salience.scores/2``; :meth:`SalienceScores.load`
also reads format ``apt_salience.scores/1`` (the layout in an untyped ``meta`` dict), upgrading it.

Example:
    >>> import torch
    >>> from apt_salience.scores import BlockScores
    >>> b = BlockScores.build(salience=torch.tensor([2., 4.]), kurtosis=torch.zeros(2),
    ...                       outlier_aware=torch.tensor([2., 4.]), param_count=torch.tensor([1., 4.]),
    ...                       sites=[("layer.0.fc2", 2)])
    >>> b.density.tolist(), b.site_totals("salience")
    ([2.0, 1.0], {'layer.0.fc2': 6.0})
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import ConfigError, SalienceConfig, load_config
from .layout import KINDS, BlockKind, BlockLayout
from .salience import normalize_scores

__all__ = ["BlockScores", "SalienceScores", "KINDS", "BlockKind", "SCORES_FORMAT", "write_json", "read_json"]

_FIELDS = ("salience", "kurtosis", "outlier_aware", "param_count", "density")
#: The format :meth:`SalienceScores.to_dict` writes; :meth:`SalienceScores.from_dict` reads versions 1 and 2.
SCORES_FORMAT = "apt_salience.scores/2"
_FORMAT_RE = re.compile(r"apt_salience\.scores/(\d+)")


def _f32(t: Any) -> Tensor:
    return torch.as_tensor(t).detach().to("cpu", torch.float32).reshape(-1)


def _sites_list(sites: Any, where: str) -> List[Tuple[str, int]]:
    try:
        return [(str(a), int(b)) for a, b in sites]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} field 'sites' must be a list of [site name, number of blocks] ({exc})") from None


@dataclass(frozen=True)
class BlockScores:
    """Scores of every block of one kind, in model order (site after site, blocks in channel order).

    Fields are 1-D float32 CPU tensors of equal length: ``salience`` (the EMA of the per-step
    salience), ``kurtosis`` (the window's), ``outlier_aware`` (the EMA of ``S + sqrt(Kurt)``),
    ``param_count`` (per block, current shapes), ``density`` (``outlier_aware / param_count``);
    ``sites`` lists ``(module_name, num_blocks)``. ``uncertainty`` is the AdaLoRA-style uncertainty
    ``U <- b U + (1 - b) |S_hat - S_bar|`` of the outlier-aware score (config ``uncertainty_beta``;
    None when it is off), for the score ``outlier_aware * uncertainty``.
    """

    salience: Tensor
    kurtosis: Tensor
    outlier_aware: Tensor
    param_count: Tensor
    density: Tensor
    sites: List[Tuple[str, int]] = field(default_factory=list)
    uncertainty: Optional[Tensor] = None

    @classmethod
    def build(
        cls, *, salience: Tensor, kurtosis: Tensor, outlier_aware: Tensor, param_count: Tensor,
        sites: Sequence[Tuple[str, int]], uncertainty: Optional[Tensor] = None,
    ) -> "BlockScores":
        """Assemble from the measured fields; ``density`` is derived (:func:`~apt_salience.normalize_scores`).

        Args:
            salience: per-block salience.
            kurtosis: per-block kurtosis.
            outlier_aware: per-block outlier-aware salience.
            param_count: per-block parameter counts (positive).
            sites: ``(site name, number of blocks)`` in order; the counts add up to the number of blocks.
            uncertainty: per-block uncertainty, or None.
        """
        vals = [_f32(t) for t in (salience, kurtosis, outlier_aware, param_count)]
        unc = _f32(uncertainty) if uncertainty is not None else None
        n = vals[0].numel()
        if any(v.numel() != n for v in vals + ([unc] if unc is not None else [])) or sum(c for _, c in sites) != n:
            raise ValueError("BlockScores fields and sites must describe the same number of blocks")
        density = normalize_scores(vals[2], vals[3])
        return cls(vals[0], vals[1], vals[2], vals[3], density, [(str(a), int(b)) for a, b in sites], unc)

    def __len__(self) -> int:
        return int(self.salience.numel())

    def by_site(self, field_name: str = "outlier_aware") -> Dict[str, Tensor]:
        """``{site: that site's slice of the field}`` (views), in model order.

        Args:
            field_name: a tensor field (``salience``, ``kurtosis``, ``outlier_aware``, ``param_count``,
                ``density``, ``uncertainty``).
        """
        values = getattr(self, field_name, None)
        if not isinstance(values, Tensor):
            allowed = _FIELDS + (("uncertainty",) if self.uncertainty is not None else ())
            raise ValueError(f"field_name must be one of {', '.join(allowed)}, got {field_name!r}")
        out: Dict[str, Tensor] = {}
        start = 0
        for name, count in self.sites:
            out[name] = values[start : start + count]
            start += count
        return out

    #: Deprecated alias of :meth:`by_site`.
    split = by_site

    def site_totals(self, field_name: str = "salience") -> Dict[str, float]:
        """``{site: sum of the field over its blocks}`` (adapter importance = ``site_totals('salience')``).

        Args:
            field_name: a tensor field, as for :meth:`by_site`.
        """
        return {k: float(v.sum()) for k, v in self.by_site(field_name).items()}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict of lists (:meth:`from_dict` reads it back)."""
        d: Dict[str, Any] = {f: getattr(self, f).tolist() for f in _FIELDS}
        d["sites"] = [[a, b] for a, b in self.sites]
        if self.uncertainty is not None:
            d["uncertainty"] = self.uncertainty.tolist()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], kind: str = "block") -> "BlockScores":
        """Read :meth:`to_dict`; a missing or malformed field is a ``ValueError`` naming it.

        Args:
            d: the dict.
            kind: the kind, for error messages.
        """
        where = f"the '{kind}' scores"
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(d).__name__}")
        for f in _FIELDS + ("sites",):
            if f not in d:
                raise ValueError(f"{where} have no field '{f}' (expected: {', '.join(_FIELDS + ('sites',))})")
        t: Dict[str, Tensor] = {}
        for f in _FIELDS + (("uncertainty",) if d.get("uncertainty") is not None else ()):
            try:
                t[f] = torch.tensor(d[f], dtype=torch.float32).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"{where} field '{f}' must be a list of numbers ({exc})") from None
        sites = _sites_list(d["sites"], where)
        n = t["salience"].numel()
        bad = [f for f, v in t.items() if v.numel() != n]
        if bad or sum(c for _, c in sites) != n:
            raise ValueError(f"{where} do not describe one number of blocks: salience has {n}, "
                             + ", ".join(f"{f} {t[f].numel()}" for f in bad)
                             + (", " if bad else "") + f"the sites {sum(c for _, c in sites)}")
        return cls(t["salience"], t["kurtosis"], t["outlier_aware"], t["param_count"], t["density"], sites,
                   t.get("uncertainty"))


_META_KEYS = ("architecture", "config", "window_steps", "layers", "block_size", "fingerprint", "unobserved_sites")


@dataclass(frozen=True, init=False)
class SalienceScores:
    """One published reading: ``.head``, ``.neuron``, ``.hidden`` and ``.adapter`` (None when absent), typed.

    Attributes:
        step: optimizer steps seen when it was published.
        head, neuron, hidden, adapter: the :class:`BlockScores` of each kind (None when absent).
        d_model: the hidden size (0 when unknown).
        layout: the :class:`~apt_salience.layout.BlockLayout` of the blocks (every present kind;
            its parameter counts are the blocks' ``param_count``).
        window_steps: optimizer steps that observed something in the window of this reading.
        config: the tracker's :class:`~apt_salience.SalienceConfig` (None for hand-built scores).
        fingerprint: the tracker's layout fingerprint (None for hand-built scores).
        unobserved_sites: sites whose input or output never required grad (frozen layers below
            them): their salience is 0 because their gradient was never seen;
            :func:`~apt_salience.select_blocks` keeps their blocks by default.

    ``meta`` is a read-only dict view of the layout and reading fields (the untyped form of
    format 1, kept for compatibility); ``architecture`` is ``layout.architecture``.

    Args:
        step: see above.
        head, neuron, hidden, adapter: see above.
        d_model: see above.
        meta: the untyped form (``layers``, ``block_size``, ``architecture``, ``config``,
            ``window_steps``, ``fingerprint``, ``unobserved_sites``), accepted instead of the typed
            keywords for compatibility (not together with ``layout``).
        layout: see above; derived from the blocks (and ``meta``) when None.
        window_steps, config, fingerprint, unobserved_sites: see above.

    Example:
        >>> import torch
        >>> b = BlockScores.build(salience=torch.ones(2), kurtosis=torch.zeros(2), outlier_aware=torch.ones(2),
        ...                       param_count=torch.full((2,), 8.0), sites=[("l.0.fc2", 2)])
        >>> s = SalienceScores(step=1, d_model=4, neuron=b)
        >>> s.layout.sites["neuron"], s.layout.layers, SalienceScores.from_dict(s.to_dict()).layout == s.layout
        ((('l.0.fc2', 2),), {'l.0.fc2': 'l.0'}, True)
    """

    step: int
    head: Optional[BlockScores]
    neuron: Optional[BlockScores]
    hidden: Optional[BlockScores]
    adapter: Optional[BlockScores]
    d_model: int
    layout: BlockLayout
    window_steps: float
    config: Optional[SalienceConfig]
    fingerprint: Optional[str]
    unobserved_sites: Tuple[str, ...]

    def __init__(
        self,
        step: int,
        head: Optional[BlockScores] = None,
        neuron: Optional[BlockScores] = None,
        hidden: Optional[BlockScores] = None,
        adapter: Optional[BlockScores] = None,
        d_model: int = 0,
        meta: Optional[Mapping[str, Any]] = None,
        *,
        layout: Optional[BlockLayout] = None,
        window_steps: Optional[float] = None,
        config: Union[None, SalienceConfig, Mapping[str, Any]] = None,
        fingerprint: Optional[str] = None,
        unobserved_sites: Sequence[str] = (),
    ) -> None:
        blocks = {"head": head, "neuron": neuron, "hidden": hidden, "adapter": adapter}
        for k, b in blocks.items():
            if b is not None and not isinstance(b, BlockScores):
                raise TypeError(f"{k} must be a BlockScores or None, got {type(b).__name__}")
        present = {k: b for k, b in blocks.items() if b is not None}
        m: Mapping[str, Any] = {}
        if meta is not None:
            if layout is not None:
                raise ValueError("give the layout either typed (layout=) or in the untyped meta dict, not both; "
                                 "meta is the compatibility form of format 1")
            if not isinstance(meta, Mapping):
                raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
            m = meta
        d = int(d_model) or int(layout.d_model if layout is not None else 0)
        if layout is None:
            layout = BlockLayout.from_blocks(present, d_model=d, block_size=m.get("block_size"),
                                             layers=m.get("layers"), architecture=m.get("architecture"))
        else:
            if not isinstance(layout, BlockLayout):
                raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
            for k in KINDS:
                mine = tuple(present[k].sites) if k in present else None
                if layout.sites.get(k) != mine:
                    raise ValueError(f"layout has {k} sites {layout.sites.get(k)!r} but the {k} scores have {mine!r}")
            # the reading's parameter counts are its blocks' (one source, exact through save / load)
            layout = BlockLayout(layout.sites, dict(layout.block_size), dict(layout.layers), d or layout.d_model,
                                 {k: b.param_count.double() for k, b in present.items()}, layout.architecture)
        cfg = m.get("config") if config is None else config
        if cfg is not None and not isinstance(cfg, SalienceConfig):
            cfg = load_config(cfg)
        ws = m.get("window_steps", 0.0) if window_steps is None else window_steps
        fp = m.get("fingerprint") if fingerprint is None else fingerprint
        uo = tuple(str(s) for s in (unobserved_sites or m.get("unobserved_sites") or ()))
        for name, value in (("step", int(step)), ("d_model", d or layout.d_model), ("layout", layout),
                            ("window_steps", float(ws)), ("config", cfg), ("fingerprint", fp),
                            ("unobserved_sites", uo), *blocks.items()):
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ reading

    def kinds(self) -> Dict[str, BlockScores]:
        """The present kinds, in order."""
        return {k: v for k in KINDS if (v := getattr(self, k)) is not None}

    @property
    def architecture(self) -> Optional[str]:
        """The architecture the reading was taken on (``layout.architecture``)."""
        return self.layout.architecture

    @property
    def layers(self) -> Dict[str, str]:
        """``{site: layer}`` (``layout.layers``)."""
        return dict(self.layout.layers)

    @property
    def meta(self) -> Dict[str, Any]:
        """The untyped view of format 1 (a new dict): architecture, config, window_steps, layers, block_size, ...

        Kept for compatibility; read the typed attributes (``layout``, ``config``, ...) instead.
        """
        out: Dict[str, Any] = {
            "architecture": self.layout.architecture,
            "config": self.config.to_dict() if self.config is not None else None,
            "window_steps": self.window_steps,
            "layers": dict(self.layout.layers),
            "block_size": dict(self.layout.block_size),
            "fingerprint": self.fingerprint,
            "unobserved_sites": list(self.unobserved_sites),
        }
        return {k: v for k, v in out.items() if v is not None}

    def uncertainty(self) -> Dict[str, Tensor]:
        """``{kind: uncertainty}`` of the kinds that have one (empty when ``uncertainty_beta`` was off)."""
        return {k: b.uncertainty for k, b in self.kinds().items() if b.uncertainty is not None}

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable nested dict (lists of floats), format ``apt_salience.scores/2``."""
        lay = self.layout
        return {
            "format": SCORES_FORMAT,
            "step": self.step,
            "d_model": self.d_model,
            "layout": {"architecture": lay.architecture, "block_size": dict(lay.block_size), "layers": dict(lay.layers)},
            "window_steps": self.window_steps,
            "config": self.config.to_dict() if self.config is not None else None,
            "fingerprint": self.fingerprint,
            "unobserved_sites": list(self.unobserved_sites),
            **{k: v.to_dict() for k, v in self.kinds().items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SalienceScores":
        """Read :meth:`to_dict` (format 2) or a format-1 dict (``meta``), upgrading it.

        A missing or malformed field is a ``ValueError`` naming it; an unknown format names the
        formats this version reads.

        Args:
            d: the dict (e.g. ``json.load`` of a file :meth:`save` wrote).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"not an apt_salience scores dict: got a {type(d).__name__}")
        version = _format_version(d.get("format"))
        if "step" not in d:
            raise ValueError("not an apt_salience scores dict: missing field 'step'")
        kinds: Dict[str, BlockScores] = {k: BlockScores.from_dict(d[k], k) for k in KINDS if d.get(k) is not None}
        try:
            step, d_model = int(d["step"]), int(d.get("d_model") or 0)
        except (TypeError, ValueError):
            raise ValueError(f"scores fields 'step' and 'd_model' must be integers, got {d.get('step')!r} and "
                             f"{d.get('d_model')!r}") from None
        if version == 1:
            meta = d.get("meta") or {}
            if not isinstance(meta, Mapping):
                raise ValueError(f"scores field 'meta' must be a dict, got {type(meta).__name__}")
            fields = {k: meta.get(k) for k in _META_KEYS}
            lay: Mapping[str, Any] = {"architecture": fields["architecture"], "block_size": fields["block_size"],
                                      "layers": fields["layers"]}
        else:
            for key in ("layout", "d_model"):
                if key not in d:
                    raise ValueError(f"scores dict (format {version}) is missing the field '{key}'")
            lay = d["layout"]
            if not isinstance(lay, Mapping):
                raise ValueError(f"scores field 'layout' must be a dict, got {type(lay).__name__}")
            fields = {k: d.get(k) for k in ("config", "window_steps", "fingerprint", "unobserved_sites")}
        for key in ("block_size", "layers"):
            if lay.get(key) is not None and not isinstance(lay.get(key), Mapping):
                raise ValueError(f"scores field '{key}' must be a dict {{site: value}}, got {type(lay[key]).__name__}")
        try:
            layout = BlockLayout.from_blocks(kinds, d_model=d_model, block_size=lay.get("block_size"),
                                             layers=lay.get("layers"), architecture=lay.get("architecture"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"scores field 'block_size' must map sites to integers ({exc})") from None
        try:
            config = load_config(fields["config"]) if fields.get("config") is not None else None
        except (ConfigError, TypeError) as exc:
            raise ValueError(f"scores field 'config' is not a valid tracker config: {exc}") from None
        unobserved = fields.get("unobserved_sites") or ()
        if isinstance(unobserved, str) or not isinstance(unobserved, Sequence):
            raise ValueError(f"scores field 'unobserved_sites' must be a list of site names, got {unobserved!r}")
        return cls(step, kinds.get("head"), kinds.get("neuron"), kinds.get("hidden"), kinds.get("adapter"),
                   d_model=d_model, layout=layout, window_steps=float(fields.get("window_steps") or 0.0),
                   config=config, fingerprint=fields.get("fingerprint"), unobserved_sites=tuple(unobserved))

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write the reading as JSON (:meth:`load` reads it back); returns the path.

        Args:
            path: the file (parent folders are created).
        """
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "SalienceScores":
        """Read a file written by :meth:`save` (this version or format 1).

        Args:
            path: the file.
        """
        return cls.from_dict(read_json(path, "scores"))


def _format_version(fmt: Any) -> int:
    if fmt is None:
        return 1  # format 1 files written before the field existed
    m = _FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    if m is None or int(m.group(1)) not in (1, 2):
        raise ValueError(f"scores format {fmt!r} is not one this version of apt_salience reads "
                         f"(apt_salience.scores/1 and {SCORES_FORMAT}); upgrade apt_salience to read it")
    return int(m.group(1))


def write_json(path: Union[str, "os.PathLike[str]"], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` (parent folders created); returns the path.

    Args:
        path: the file.
        obj: a JSON-serialisable object.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def read_json(path: Union[str, "os.PathLike[str]"], what: str) -> Any:
    """Read a JSON file; a missing/unreadable file or bad JSON is a ``ValueError`` naming ``what`` and the file.

    Args:
        path: the file.
        what: what the file holds, for error messages (``"scores"``, ``"selection"``).
    """
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {what} file '{p}': {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file '{p}' is not JSON (line {exc.lineno}): {exc.msg}") from None
