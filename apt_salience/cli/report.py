"""Figures and a Markdown summary from a saved :class:`~apt_salience.scores.SalienceScores` reading.

:func:`render_report` writes into one folder:

* ``scores.json`` — the reading itself (``SalienceScores.load`` reads it back);
* ``head_salience.png``, ``head_kurtosis.png``, ``head_outlier_aware.png`` — heatmaps, one row per
  attention site (layer), one column per head;
* ``neuron_salience.png`` — each layer's FFN-neuron salience sorted in descending order (log scale);
* ``hidden_salience.png`` — salience of every hidden dimension, in index order and sorted;
* ``density_ranking.png`` — every head and neuron block sorted by density against the cumulative
  share of parameters, with the cut that the budget makes (:func:`apt_salience.selection.select_blocks`);
* ``summary.md`` — the reading's shape, the budget cut, and the top and bottom blocks of each kind.

matplotlib is needed (Agg backend, no display); without it :class:`ReportDependencyError` says
which command installs it.

Example:
    >>> import tempfile, torch
    >>> from apt_salience.scores import BlockScores, SalienceScores
    >>> mk = lambda v, pc, sites: BlockScores.build(salience=torch.tensor(v), kurtosis=torch.ones(len(v)),
    ...     outlier_aware=torch.tensor(v) + 1, param_count=torch.full((len(v),), pc), sites=sites)
    >>> s = SalienceScores(step=3, d_model=4, head=mk([4., 1., 2., 3.], 32., [("l.0.o", 2), ("l.1.o", 2)]),
    ...     neuron=mk([1., 3., .1, 2.], 8., [("l.0.down", 2), ("l.1.down", 2)]),
    ...     hidden=mk([1., 2., 3., 4.], 24., [("hidden", 4)]))
    >>> files = render_report(s, tempfile.mkdtemp())
    >>> sorted(files)[:3]
    ['density_ranking', 'head_kurtosis', 'head_outlier_aware']
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..layout import BlockKind
from ..scores import BlockScores, SalienceScores
from ..selection import BlockLayout, select_blocks

__all__ = ["render_report", "density_figure", "ReportDependencyError", "PLOT_INSTALL_HINT", "block_table", "site_label"]

#: The command that installs what the report needs.
PLOT_INSTALL_HINT = 'pip install matplotlib   (or: pip install "apt-salience[plot]")'

_DPI = 110


class ReportDependencyError(RuntimeError):
    """matplotlib is missing; the message says which command installs it."""


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write and close one figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportDependencyError(f"the report's figures need matplotlib; install it with: {PLOT_INSTALL_HINT}") from None
    return plt


def site_label(name: str, layer: Optional[str] = None) -> str:
    """A short row label for a site: ``L<layer index>``, ``dec L<i>`` in an encoder-decoder's decoder.

    Args:
        name: the site's module name.
        layer: its layer prefix (``BlockLayout.layers[name]``); None: the name itself is searched.

    Example:
        >>> site_label("bert.encoder.layer.3.attention.output.dense", "bert.encoder.layer.3")
        'L3'
        >>> site_label("decoder.block.1.layer.1.EncDecAttention.o", "decoder.block.1")
        'dec L1'
    """
    prefix = layer if layer else name
    nums = re.findall(r"\d+", prefix)
    label = f"L{nums[-1]}" if nums else prefix
    if re.search(r"(^|\.)decoder(\.|$)", prefix):
        label = "dec " + label
    return label


def _labels(scores: SalienceScores, sites: Sequence[Tuple[str, int]]) -> List[str]:
    layers = BlockLayout.from_scores(scores).layers
    labels = [site_label(n, layers.get(n)) for n, _ in sites]
    if len(set(labels)) < len(labels):  # disambiguate with the module name's tail
        tails = [n[len(layers.get(n, "")):].strip(".") or n for n, _ in sites]
        labels = [f"{lab} {tail}" for lab, tail in zip(labels, tails)]
    return labels


def _grid(b: BlockScores, field: str) -> Tensor:
    """[sites, max blocks] of a field, NaN where a site has fewer blocks."""
    rows = list(b.split(field).values())
    width = max((r.numel() for r in rows), default=0)
    g = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        g[i, : r.numel()] = r
    return g


def _norm(values: Tensor) -> Any:
    from matplotlib.colors import LogNorm, Normalize

    v = values[torch.isfinite(values)]
    if v.numel() and float(v.min()) > 0 and float(v.max()) / float(v.min()) > 10:  # a few outliers: log colours
        return LogNorm(vmin=float(v.min()), vmax=float(v.max())), True
    lo = float(v.min()) if v.numel() else 0.0
    hi = float(v.max()) if v.numel() else 1.0
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12), False


_FIELD_TEXT = {
    "salience": "salience (EMA of sum|H| x sum|dL/dH|)",
    "kurtosis": "kurtosis of the head's activations",
    "outlier_aware": "outlier-aware salience (salience + sqrt(kurtosis))",
    "density": "density (outlier-aware salience / parameters)",
}


def _heatmap(plt: Any, scores: SalienceScores, field: str, path: Path) -> Path:
    b = scores.head
    assert b is not None
    g = _grid(b, field)
    labels = _labels(scores, b.sites)
    n_rows, n_cols = g.shape
    fig_w = min(16.0, max(6.0, 0.55 * n_cols + 3.0))
    fig_h = min(14.0, max(3.5, 0.45 * n_rows + 2.0))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=_DPI)
    norm, log = _norm(g)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(g.numpy(), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xlabel("head index")
    ax.set_ylabel("layer (attention site)")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(labels)
    step = 1 if n_cols <= 24 else int(math.ceil(n_cols / 24))
    ax.set_xticks(range(0, n_cols, step))
    ax.set_title(f"Head {_FIELD_TEXT.get(field, field)}\n(step {scores.step}; {n_rows} layers x {n_cols} heads)", fontsize=11)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(field + (" (log scale)" if log else ""))
    if n_rows * n_cols <= 160:  # values readable in the cells
        finite = g[torch.isfinite(g)]
        mid = float(finite.median()) if finite.numel() else 0.0
        for i in range(n_rows):
            for j in range(n_cols):
                v = float(g[i, j])
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if v < mid else "black")
    return _save(plt, fig, path)


def _neuron_curves(plt: Any, scores: SalienceScores, path: Path) -> Path:
    b = scores.neuron
    assert b is not None
    fig, ax = plt.subplots(figsize=(8.5, 5.0), dpi=_DPI)
    labels = _labels(scores, b.sites)
    cmap = plt.get_cmap("viridis")
    parts = list(b.split("salience").values())
    positive = all(bool((p > 0).all()) for p in parts if p.numel())
    for i, (lab, vals) in enumerate(zip(labels, parts)):
        v = torch.sort(vals, descending=True).values
        x = torch.arange(1, v.numel() + 1).float() / max(1, v.numel())
        ax.plot(x.numpy(), v.numpy(), color=cmap(i / max(1, len(parts) - 1)), label=lab, linewidth=1.6)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("neuron rank within its layer (fraction of the layer's neurons, most salient first)")
    ax.set_ylabel("neuron salience" + (" (log scale)" if positive else ""))
    ax.set_title(f"FFN neuron salience per layer, sorted (step {scores.step})", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(title="layer", fontsize=8, ncol=2 if len(parts) > 8 else 1, loc="upper right")
    return _save(plt, fig, path)


def _hidden_plot(plt: Any, scores: SalienceScores, path: Path) -> Path:
    b = scores.hidden
    assert b is not None
    v = b.salience
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.0, 4.5), dpi=_DPI)
    positive = bool((v > 0).all())
    a1.plot(range(v.numel()), v.numpy(), linewidth=0.9, color="tab:blue")
    a1.set_xlabel("hidden dimension index")
    a1.set_ylabel("salience (summed over sites)" + (" (log scale)" if positive else ""))
    a1.set_title("Hidden-dimension salience, by index", fontsize=11)
    s = torch.sort(v, descending=True).values
    a2.plot(range(1, s.numel() + 1), s.numpy(), linewidth=1.6, color="tab:orange")
    a2.set_xlabel("rank (most salient first)")
    a2.set_ylabel("salience" + (" (log scale)" if positive else ""))
    a2.set_title("Hidden-dimension salience, sorted", fontsize=11)
    for a in (a1, a2):
        if positive:
            a.set_yscale("log")
        a.grid(True, alpha=0.3)
    fig.suptitle(f"Hidden dimensions (d_model = {v.numel()}, step {scores.step})", fontsize=12)
    return _save(plt, fig, path)


def _budget_cut(scores: SalienceScores, keep_ratio: float) -> Optional[Any]:
    try:
        kinds = tuple(k for k in ("head", "neuron") if getattr(scores, k) is not None)
        return select_blocks(scores, keep_ratio=keep_ratio, kinds=kinds, score="outlier_aware")
    except (ValueError, TypeError):  # e.g. a reading without parameter counts: no cut drawn
        return None


def _density_plot(plt: Any, scores: SalienceScores, keep_ratio: float, sel: Any, path: Path) -> Path:
    dens: List[Tensor] = []
    cost: List[Tensor] = []
    kind_id: List[Tensor] = []
    kept: List[Tensor] = []
    kinds = [k for k in ("head", "neuron") if getattr(scores, k) is not None]
    for i, k in enumerate(kinds):
        b: BlockScores = getattr(scores, k)
        dens.append(b.density.double())
        cost.append(b.param_count.double())
        kind_id.append(torch.full((len(b),), i))
        m = getattr(sel, k, None) if sel is not None else None
        kept.append(m if m is not None else torch.zeros(len(b), dtype=torch.bool))
    d, c, kid, kp = torch.cat(dens), torch.cat(cost), torch.cat(kind_id), torch.cat(kept)
    order = torch.sort(d, descending=True, stable=True).indices
    d, c, kid, kp = d[order], c[order], kid[order], kp[order]
    cum = torch.cumsum(c, 0) / c.sum()
    fig, ax = plt.subplots(figsize=(9.0, 5.0), dpi=_DPI)
    colors = {"head": "tab:red", "neuron": "tab:blue"}
    positive = bool((d > 0).all())
    for i, k in enumerate(kinds):
        sel_k = kid == i
        ax.scatter(cum[sel_k].numpy(), d[sel_k].numpy(), s=6 if k == "neuron" else 22, color=colors[k],
                   label=f"{k} ({int(sel_k.sum())} blocks)", alpha=0.8, edgecolors="none")
    if positive:
        ax.set_yscale("log")
    title = f"Blocks ranked by density (outlier-aware salience / parameters), step {scores.step}"
    if sel is not None:
        cut = float(sel.params_kept) / float(sel.params_total)
        ax.axvline(cut, color="black", linestyle="--", linewidth=1.4,
                   label=f"budget {keep_ratio:.0%}: keeps {int(kp.sum())} blocks ({cut:.1%} of parameters)")
        ax.axvspan(cut, 1.0, color="grey", alpha=0.12)
        if sel.allocation != "global" or bool((kp != (cum <= cut + 1e-12)).any()):
            title += f"\n(allocation: {sel.allocation})"
    ax.set_xlabel("cumulative share of head + FFN parameters (blocks in density order)")
    ax.set_ylabel("density" + (" (log scale)" if positive else ""))
    ax.set_title(title, fontsize=11)
    ax.set_xlim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="upper right")
    return _save(plt, fig, path)


def density_figure(scores: SalienceScores, path: Union[str, "os.PathLike[str]"], *, selection: Any = None,
                   keep_ratio: float = 0.5) -> Path:
    """Write ``density_ranking.png``-style figure: heads and neurons by density, the kept blocks marked.

    Args:
        scores: a reading with head and/or neuron blocks.
        path: the PNG to write.
        selection: the :class:`~apt_salience.selection.Selection` to mark (e.g. ``pruner.final_selection``);
            default: ``select_blocks`` at ``keep_ratio`` on outlier-aware density.
        keep_ratio: the budget of the default cut.

    Example:
        >>> import tempfile, torch, os
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.tensor([1., 3.]), kurtosis=torch.zeros(2),
        ...     outlier_aware=torch.tensor([1., 3.]), param_count=torch.ones(2), sites=[("l.0.fc2", 2)])
        >>> p = density_figure(SalienceScores(step=1, d_model=1, neuron=b), os.path.join(tempfile.mkdtemp(), "d.png"))
        >>> p.is_file()
        True
    """
    if scores.head is None and scores.neuron is None:
        raise ValueError("the scores have no head or neuron blocks to rank")
    plt = _pyplot()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sel = selection if selection is not None else _budget_cut(scores, keep_ratio)
    share = float(sel.params_kept / sel.params_total) if sel is not None and sel.params_total else keep_ratio
    with plt.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10}):
        return _density_plot(plt, scores, share, sel, out)


def block_table(scores: SalienceScores, kind: BlockKind, top: int = 10, *,
                field: str = "density") -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """The ``top`` highest and lowest blocks of a kind by ``field``: rows with site, block index and every field.

    Ties keep the model order. Each row: ``rank`` (1 = highest), ``site``, ``block`` (index within
    the site) and the values of ``salience``, ``kurtosis``, ``outlier_aware``, ``param_count``,
    ``density``; the lowest rows come lowest first. A kind the reading lacks gives two empty lists.

    Args:
        scores: the reading.
        kind: ``"head"``, ``"neuron"``, ``"hidden"`` or ``"adapter"``.
        top: rows in each list.
        field: the :class:`~apt_salience.scores.BlockScores` field ranked by.

    Example:
        >>> import torch
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.tensor([1., 3., 2.]), kurtosis=torch.zeros(3),
        ...     outlier_aware=torch.tensor([1., 3., 2.]), param_count=torch.ones(3), sites=[("l.0.fc2", 3)])
        >>> hi, lo = block_table(SalienceScores(step=1, neuron=b), "neuron", top=1)
        >>> hi[0]["block"], lo[0]["block"]
        (1, 0)
    """
    b: Optional[BlockScores] = getattr(scores, kind)
    if b is None:
        return [], []
    values = getattr(b, field)
    site_of: List[Tuple[str, int]] = []
    for name, n in b.sites:
        site_of += [(name, j) for j in range(n)]
    order = torch.sort(values, descending=True, stable=True).indices.tolist()

    def row(i: int, rank: int) -> Dict[str, Any]:
        name, j = site_of[i]
        return {"rank": rank, "site": name, "block": j, **{f: float(getattr(b, f)[i]) for f in
                ("salience", "kurtosis", "outlier_aware", "param_count", "density")}}

    k = min(top, len(order))
    hi = [row(i, r + 1) for r, i in enumerate(order[:k])]
    lo = [row(order[len(order) - 1 - r], len(order) - r) for r in range(k)]
    return hi, lo


def _md_rows(rows: List[Dict[str, Any]]) -> List[str]:
    out = ["| rank | site | block | salience | kurtosis | outlier-aware | density |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['rank']} | `{r['site']}` | {r['block']} | {r['salience']:.4g} | {r['kurtosis']:.4g} | "
                   f"{r['outlier_aware']:.4g} | {r['density']:.4g} |")
    return out


def _summary(scores: SalienceScores, keep_ratio: float, sel: Any, top: int, figures: Dict[str, Path], title: str) -> str:
    architecture = BlockLayout.from_scores(scores).architecture or "unknown"
    lines = [f"# {title}", ""]
    lines.append(f"- reading published at optimizer step **{scores.step}**; architecture: "
                 f"`{architecture}`; d_model = {scores.d_model}")
    for kind, b in scores.kinds().items():
        lines.append(f"- {kind}: {len(b)} blocks in {len(b.sites)} site(s), "
                     f"{float(b.param_count.sum()) if kind != 'hidden' else float(b.param_count[0]):,.0f} "
                     f"{'parameters' if kind != 'hidden' else 'parameters per hidden dim'}")
    if sel is not None:
        kept = {k: v for k, v in sel.num_kept().items() if k in sel.kinds}
        total = {k: int(m.numel()) for k, m in sel.masks().items()}
        lines.append(f"- budget {keep_ratio:.0%} of head + FFN parameters (outlier-aware density, "
                     f"{sel.allocation} allocation): keeps " + ", ".join(f"{kept[k]}/{total[k]} {k}s" for k in kept)
                     + f" = {sel.params_kept:,.0f} of {sel.params_total:,.0f} parameters")
    lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for name, p in figures.items():
            lines.append(f"![{name}]({p.name})")
        lines.append("")
    kinds: Tuple[BlockKind, ...] = ("head", "neuron", "hidden", "adapter")
    for kind in kinds:
        if getattr(scores, kind) is None:
            continue
        hi, lo = block_table(scores, kind, top)
        lines += [f"## {kind.capitalize()} blocks: top {len(hi)} by density", ""] + _md_rows(hi) + [""]
        lines += [f"## {kind.capitalize()} blocks: bottom {len(lo)} by density", ""] + _md_rows(lo) + [""]
    return "\n".join(lines)


def render_report(
    scores: Union[SalienceScores, str, "os.PathLike[str]"],
    out_dir: Union[str, "os.PathLike[str]"],
    *,
    budget: float = 0.5,
    top: int = 10,
    title: str = "apt_salience report",
) -> Dict[str, Path]:
    """Write the figures, ``summary.md`` and ``scores.json`` of a reading into ``out_dir``.

    The files are listed in the module docstring; files of the same names in ``out_dir`` are
    overwritten. Needs matplotlib (:class:`ReportDependencyError` otherwise).

    Args:
        scores: a :class:`~apt_salience.scores.SalienceScores` or the path of a saved one.
        out_dir: the folder (created if missing).
        budget: the fraction of head + FFN parameters kept by the cut drawn on the density ranking
            (``select_blocks`` on outlier-aware density, global allocation).
        top: blocks listed at the top and at the bottom of each kind in ``summary.md``.
        title: the summary's heading.

    Returns:
        ``{name: path}``: the figures by name (``head_salience``, ...), ``summary`` and ``scores``.

    Example: see the module docstring.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    if not isinstance(scores, SalienceScores):
        scores = SalienceScores.load(scores)
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: Dict[str, Path] = {}
    figures: Dict[str, Path] = {}
    with plt.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10}):
        if scores.head is not None and len(scores.head):
            for f in ("salience", "kurtosis", "outlier_aware"):
                figures[f"head_{f}"] = _heatmap(plt, scores, f, out / f"head_{f}.png")
        if scores.neuron is not None and len(scores.neuron):
            figures["neuron_salience"] = _neuron_curves(plt, scores, out / "neuron_salience.png")
        if scores.hidden is not None and len(scores.hidden):
            figures["hidden_salience"] = _hidden_plot(plt, scores, out / "hidden_salience.png")
        sel = None
        if scores.head is not None or scores.neuron is not None:
            sel = _budget_cut(scores, budget)
            figures["density_ranking"] = _density_plot(plt, scores, budget, sel, out / "density_ranking.png")
    files.update(figures)
    files["summary"] = out / "summary.md"
    files["summary"].write_text(_summary(scores, budget, sel, top, figures, title) + "\n", encoding="utf-8")
    files["scores"] = scores.save(out / "scores.json")
    return files
