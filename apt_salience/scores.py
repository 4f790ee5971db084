"""Read-only results: :class:`SalienceScores` holds one :class:`BlockScores` per block kind.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["BlockScores", "SalienceScores", "KINDS"]

#: Block kinds in the order they appear in results.
KINDS = ("head", "neuron", "hidden", "adapter")
_FIELDS = ("salience", "kurtosis", "outlier_aware", "param_count", "density")


@dataclass(frozen=True)
class BlockScores:
    """Scores of every block of one kind, in model order (site after site, blocks in channel order).

    Fields are 1-D float32 CPU tensors of equal length; ``sites`` lists ``(module_name, num_blocks)``.
    ``density = outlier_aware / param_count``.
    """

    salience: Tensor
    kurtosis: Tensor
    outlier_aware: Tensor
    param_count: Tensor
    density: Tensor
    sites: List[Tuple[str, int]] = field(default_factory=list)

    @classmethod
    def build(
        cls, *, salience: Tensor, kurtosis: Tensor, outlier_aware: Tensor, param_count: Tensor,
        sites: List[Tuple[str, int]],
    ) -> "BlockScores":
        """Assemble from the four measured fields; ``density`` is derived."""
        vals = [t.detach().to("cpu", torch.float32).reshape(-1) for t in (salience, kurtosis, outlier_aware, param_count)]
        n = vals[0].numel()
        if any(v.numel() != n for v in vals) or sum(c for _, c in sites) != n:
            raise ValueError("BlockScores fields and sites must describe the same number of blocks")
        density = vals[2] / vals[3]
        return cls(vals[0], vals[1], vals[2], vals[3], density, [(str(a), int(b)) for a, b in sites])

    def __len__(self) -> int:
        return int(self.salience.numel())

    def split(self, field_name: str = "outlier_aware") -> Dict[str, Tensor]:
        """``{site: that site's slice of the field}``."""
        values: Tensor = getattr(self, field_name)
        out: Dict[str, Tensor] = {}
        start = 0
        for name, count in self.sites:
            out[name] = values[start : start + count]
            start += count
        return out

    def site_totals(self, field_name: str = "salience") -> Dict[str, float]:
        """``{site: sum of the field over its blocks}`` (adapter importance = ``site_totals('salience')``)."""
        return {k: float(v.sum()) for k, v in self.split(field_name).items()}

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {f: getattr(self, f).tolist() for f in _FIELDS}
        d["sites"] = [[a, b] for a, b in self.sites]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BlockScores":
        t = {f: torch.tensor(d[f], dtype=torch.float32) for f in _FIELDS}
        return cls(**t, sites=[(str(a), int(b)) for a, b in d["sites"]])


@dataclass(frozen=True)
class SalienceScores:
    """One published reading: ``.head``, ``.neuron``, ``.hidden`` and ``.adapter`` (None when absent).

    ``step`` is the number of optimizer steps seen when it was published; ``d_model`` the
    hidden size; ``meta`` the architecture, config and layer of each site.
    """

    step: int
    head: Optional[BlockScores] = None
    neuron: Optional[BlockScores] = None
    hidden: Optional[BlockScores] = None
    adapter: Optional[BlockScores] = None
    d_model: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    def kinds(self) -> Dict[str, BlockScores]:
        """The present kinds, in order."""
        return {k: v for k in KINDS if (v := getattr(self, k)) is not None}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable nested dict (lists of floats)."""
        return {
            "format": "apt_salience.scores/1",
            "step": self.step,
            "d_model": self.d_model,
            "meta": self.meta,
            **{k: v.to_dict() for k, v in self.kinds().items()},
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SalienceScores":
        if not isinstance(d, dict) or "step" not in d:
            raise ValueError("not an apt_salience scores dict (missing 'step')")
        kinds = {k: BlockScores.from_dict(d[k]) for k in KINDS if d.get(k) is not None}
        return cls(step=int(d["step"]), d_model=int(d.get("d_model", 0)), meta=dict(d.get("meta", {})), **kinds)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write the reading as JSON (``SalienceScores.load`` reads it back)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "SalienceScores":
        """Read a file written by :meth:`save`."""
        return cls.from_dict(read_json(path, "scores"))


def write_json(path: Union[str, "os.PathLike[str]"], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` (parent folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def read_json(path: Union[str, "os.PathLike[str]"], what: str) -> Any:
    """Read a JSON file; a missing/unreadable file or bad JSON is a ``ValueError`` naming ``what`` and the file."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {what} file '{p}': {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file '{p}' is not JSON (line {exc.lineno}): {exc.msg}") from None
