"""Physical structured pruning from a :class:`Selection`: attention heads, FFN neurons and hidden dimensions.

:func:`prune_model` shrinks the layers in place (the same module objects keep their hooks;
their weights become new, smaller ``nn.Parameter`` s, so rebuild the optimizer) and updates the
attributes the attention forward reads. Where the projections, norms and attributes are comes
from the architecture table (:data:`apt_salience.architectures.ARCHITECTURES`); every preset is
supported for heads and neurons, BERT / RoBERTa and the LLaMA family also for hidden dims.

* heads: rows of the query / key / value projections (or of the three parts of a fused
  projection, GPT-2's ``c_attn``) and columns of the attention output projection.
  Grouped-query attention: a key/value group is removed only when all of its query heads are
  removed. Hugging Face's attention repeats each KV head the same number of times, so the
  surviving groups must keep equally many query heads: a group that keeps fewer than the others
  keeps some of its selected-for-pruning heads as *placeholders*, heads whose output-projection
  columns are zeroed (they contribute exactly nothing, like the masked head). An attention left
  with no head keeps one placeholder head (Hugging Face attention cannot run with zero heads).
  Both are counted in :attr:`PruneReport.placeholder_heads`.
  T5: the relative position bias (an embedding with one column per head, owned by the first
  self-attention of a stack and reused by every self-attention of that stack) keeps the columns
  of the heads some layer of the stack still has; each T5 attention of a pruned model selects
  its own heads' columns (its class becomes a subclass, ``HeadPruned<class>``, that does this).
* neurons: rows of the FFN input projections (up, and gate when gated) and columns of the down
  projection.
* hidden dimensions (BERT / RoBERTa, LLaMA / Mistral / Qwen2): columns of every embedding, input
  columns of every projection that reads the residual stream (attention and FFN inputs, the
  pooler / classifier / lm_head on top), output rows of every projection that writes it (the
  head and neuron sites), and the entries of every LayerNorm / RMSNorm. Tied embeddings stay
  tied. Removing dims changes the norms' statistics: each LayerNorm / RMSNorm then computes its
  mean / variance (mean square) over the kept dims only. The pruned model therefore equals,
  exactly, the dense model in which (1) the removed dims are zero at every embedding output,
  head- and neuron-site output and norm output, and (2) every norm computes its statistics over
  the kept dims only. It is in general **not** equal to the model masked with
  :func:`~apt_salience.masks.apply_masks` (which zeroes the site outputs only; embeddings, norm
  weights and biases still write the removed dims, and the norms average over all of them).
  See ``docs/pruning.md`` for the measured distance.

Transformers 5 has no head pruning of its own (``config.pruned_heads`` is gone), so a pruned
model is saved with :func:`save_pruned` (``save_pretrained`` plus ``apt_pruning.json``, the
per-layer head / KV-head / neuron counts and the kept hidden size) and read back with
:func:`load_pruned`.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from apt_salience.pruning import prune_model
    >>> from apt_salience.selection import BlockLayout, Selection
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=64, vocab_size=100))
    >>> lay = BlockLayout.from_model(model)
    >>> heads = torch.tensor([True, False, True, True, True, True, True, True])
    >>> sel = Selection(heads, torch.ones(128, dtype=torch.bool), None, 0., 1., 1., lay)
    >>> report = prune_model(model, sel)
    >>> model.encoder.layer[0].attention.self.num_attention_heads, report.params_before - report.params_after
    (3, 1048)
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    attention_projections,
    detect_architecture,
    ffn_input_projections,
    find_sites,
    layout_sites,
    linear_dims,
    relative_name,
)
from .scores import read_json
from .selection import Selection

__all__ = ["PruneReport", "prune_model", "pruned_shapes", "save_pruned", "load_pruned", "PRUNING_FILE",
           "PRUNING_FORMAT_VERSION", "count_parameters"]

PRUNING_FILE = "apt_pruning.json"
#: The version :func:`save_pruned` writes (``"format": "apt_salience.pruning/2"``); :func:`load_pruned` reads 1 and 2.
PRUNING_FORMAT_VERSION = 2
_FORMAT_RE = re.compile(r"apt_salience\.pruning/(\d+)")

_log = logging.getLogger("apt_salience")


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune_model` did.

    ``params_before`` / ``params_after``: every parameter of the model (biases, norms and
    embeddings included; tied parameters once); ``heads_removed``, ``kv_heads_removed``,
    ``neurons_removed``, ``hidden_removed``: totals (hidden: model dimensions); ``placeholder_heads``:
    heads selected for pruning that had to stay (zeroed) because of grouped-query attention or
    an otherwise empty attention; ``shapes``: :func:`pruned_shapes` after pruning.
    """

    params_before: int
    params_after: int
    heads_removed: int
    kv_heads_removed: int
    neurons_removed: int
    placeholder_heads: int
    shapes: Dict[str, Any] = field(default_factory=dict)
    hidden_removed: int = 0

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared / tied parameters counted once).

    Args:
        model: the model.
    """
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Cuts: collected while validating, applied when everything has been checked.


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), Tensor)


def _linear_like(name: str, mod: nn.Module) -> nn.Module:
    if hasattr(mod, "base_layer"):
        raise ValueError(
            f"'{name}' is a PEFT LoRA layer; physical pruning needs plain Linear layers: call "
            "model.merge_and_unload() first (masks made on the PEFT model still apply to the merged one)"
        )
    if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
        raise ValueError(f"'{name}' is a {type(mod).__name__}; prune_model shrinks nn.Linear / Conv1D layers only")
    return mod


def _dims(mod: nn.Module) -> Tuple[int, int]:
    d = linear_dims(mod)
    assert d is not None
    return d


def _param_axes(mod: nn.Module, axis: str) -> List[Tuple[str, int]]:
    """(parameter name, tensor dim) that an ``axis`` cut indexes: out / in (Linear-like), emb, norm."""
    if axis == "emb":
        return [("weight", 1)]
    if axis == "norm":
        return [(n, 0) for n, p in mod.named_parameters(recurse=False) if p.dim() == 1]
    conv = _is_conv1d(mod)
    if axis == "out":
        return [("weight", 1 if conv else 0), ("bias", 0)]
    return [("weight", 0 if conv else 1)]


def _set_size(mod: nn.Module, axis: str, n: int) -> None:
    if axis == "emb":
        setattr(mod, "embedding_dim", n)
    elif axis == "norm":
        if isinstance(getattr(mod, "normalized_shape", None), tuple):
            setattr(mod, "normalized_shape", (n,))
    elif _is_conv1d(mod):
        setattr(mod, "nf" if axis == "out" else "nx", n)
    else:
        setattr(mod, "out_features" if axis == "out" else "in_features", n)


@dataclass
class _Cut:
    module: nn.Module
    axis: str  # out | in | emb | norm
    index: Tensor  # positions kept along the axis (int64)
    zero: Optional[Tensor] = None  # bool over the kept positions: weights set to 0 there (placeholder heads)


class _Surgery:
    """Everything one prune will change; :meth:`apply` changes it (validation happens before)."""

    def __init__(self) -> None:
        self.cuts: List[_Cut] = []
        self.attrs: List[Tuple[nn.Module, str, int]] = []
        self.after: List[Callable[[], None]] = []

    def cut(self, module: nn.Module, axis: str, index: Tensor, zero: Optional[Tensor] = None) -> None:
        self.cuts.append(_Cut(module, axis, index.long().cpu(), zero))

    def apply(self) -> None:
        # a parameter shared by several modules (tied embeddings) is cut once and stays shared
        done: Dict[Tuple[int, int], Tuple[Tensor, nn.Parameter]] = {}
        with torch.no_grad():
            for c in self.cuts:
                for pname, dim in _param_axes(c.module, c.axis):
                    old = getattr(c.module, pname, None)
                    if not isinstance(old, Tensor):
                        continue
                    key = (id(old), dim)
                    if key in done:
                        new = done[key][1]
                    else:
                        w = old.index_select(dim, c.index.to(old.device)).clone()
                        if c.zero is not None and pname == "weight" and bool(c.zero.any()):
                            w.index_fill_(dim, c.zero.nonzero().squeeze(1).to(w.device), 0)
                        new = nn.Parameter(w, requires_grad=old.requires_grad)
                        done[key] = (old, new)  # keeps `old` alive so its id is not reused
                    setattr(c.module, pname, new)
                _set_size(c.module, c.axis, int(c.index.numel()))
        for mod, attr, value in self.attrs:
            setattr(mod, attr, value)
        for fn in self.after:
            fn()


# ---------------------------------------------------------------------------------------------
# T5-style shared position bias


class _SharedBiasHeads(nn.Module):
    """Mixin for an attention whose position bias is computed once per stack and shared (T5).

    The shared bias keeps one column per head that some layer of the stack still has;
    ``apt_head_index`` (a non-persistent buffer) lists, for each of this attention's heads, its
    column. The full shared bias is passed on to the next layer unchanged; an attention without
    its own relative bias (cross-attention) passes None on, so each makes its zero bias itself.
    """

    apt_head_index: Tensor

    def forward(self, hidden_states: Tensor, mask: Any = None, key_value_states: Any = None,
                position_bias: Optional[Tensor] = None, cache: Any = None, **kwargs: Any) -> Any:
        shared = position_bias
        if position_bias is not None:
            position_bias = position_bias.index_select(1, self.apt_head_index.to(position_bias.device))
        out = super().forward(hidden_states, mask=mask, key_value_states=key_value_states,
                              position_bias=position_bias, cache=cache, **kwargs)
        if shared is None:
            shared = self.__dict__.pop("_apt_full_bias", None)
        return (out[0], shared) + tuple(out[2:])

    def compute_bias(self, *args: Any, **kwargs: Any) -> Tensor:
        full: Tensor = getattr(super(), "compute_bias")(*args, **kwargs)
        self.__dict__["_apt_full_bias"] = full  # handed to the next layers by forward, then dropped
        return full.index_select(1, self.apt_head_index.to(full.device))


_SHARED_BIAS_CLASSES: Dict[type, type] = {}


def _shared_bias_class(base: type) -> type:
    if issubclass(base, _SharedBiasHeads):
        return base
    cls = _SHARED_BIAS_CLASSES.get(base)
    if cls is None:
        cls = type(f"HeadPruned{base.__name__}", (_SharedBiasHeads, base), {"__module__": __name__})
        _SHARED_BIAS_CLASSES[base] = cls
        globals()[cls.__name__] = cls  # so that pickle finds it by name in this process
    return cls


def _bias_columns(root: nn.Module, n_heads: int) -> List[int]:
    """The shared-bias column of each current head of an attention."""
    idx = getattr(root, "apt_head_index", None) if isinstance(root, _SharedBiasHeads) else None
    return idx.tolist() if isinstance(idx, Tensor) else list(range(n_heads))


def _plan_shared_bias(surgery: _Surgery, spec: ArchitectureSpec, modules: Mapping[str, nn.Module],
                      kept: Mapping[str, List[int]], n_heads: Mapping[str, int]) -> int:
    """Cut the shared bias to the columns still used and give every attention its column index.

    ``kept``: every head site -> its current heads that stay; ``n_heads``: its current head count.
    Returns the number of bias columns removed.
    """
    assert spec.shared_bias is not None
    groups: Dict[str, List[str]] = {}  # attentions of one stack and role: the layer index replaced by '*'
    for site in kept:
        root = relative_name(site, spec.attention_up)
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", root, count=1), []).append(site)
    removed = 0
    for members in groups.values():
        roots = {s: modules[relative_name(s, spec.attention_up)] for s in members}
        owners = [s for s in members if isinstance(getattr(roots[s], spec.shared_bias, None), nn.Embedding)]
        if len(owners) > 1:
            raise ValueError(f"more than one attention owns a '{spec.shared_bias}' among {members[:3]}; "
                             "cannot tell which position bias the layers share")
        if owners:
            used = {}
            for s in members:
                cols = _bias_columns(roots[s], n_heads[s])
                used[s] = [cols[h] for h in kept[s]]
            union = sorted(set().union(*used.values()))
            emb = getattr(roots[owners[0]], spec.shared_bias)
            if union and max(union) >= emb.embedding_dim:
                raise ValueError(f"the position bias of '{owners[0]}' has {emb.embedding_dim} columns but its "
                                 f"stack uses column {max(union)}: the model was changed outside prune_model")
            if union != list(range(emb.embedding_dim)):
                surgery.cut(emb, "emb", torch.tensor(union, dtype=torch.long))
                removed += emb.embedding_dim - len(union)
            pos = {c: i for i, c in enumerate(union)}
            index = {s: [pos[c] for c in used[s]] for s in members}
        else:  # no bias of its own (cross-attention): each layer makes its zero bias itself
            index = {s: list(range(len(kept[s]))) for s in members}
        for s in members:
            surgery.after.append(_swap_to_shared_bias(roots[s], index[s]))
    return removed


def _swap_to_shared_bias(root: nn.Module, index: List[int]) -> Callable[[], None]:
    def run() -> None:
        dev = next((p.device for p in root.parameters()), torch.device("cpu"))
        root.__class__ = _shared_bias_class(type(root))
        root.register_buffer("apt_head_index", torch.tensor(index, dtype=torch.long, device=dev), persistent=False)

    return run


# ---------------------------------------------------------------------------------------------
# Heads and neurons


def _head_plan(keep: Tensor, n_kv: int) -> Tuple[List[int], List[int], List[int]]:
    """(query heads to keep, of which placeholders, KV groups to keep) for one attention."""
    n_h = keep.numel()
    g = n_h // n_kv
    groups = keep.view(n_kv, g)
    counts = groups.sum(1)
    if int(counts.sum()) == 0:  # nothing kept: one placeholder head (the first), its group
        return [0], [0], [0]
    m = int(counts.max())
    kept_heads: List[int] = []
    placeholders: List[int] = []
    kept_groups: List[int] = []
    for j in range(n_kv):
        c = int(counts[j])
        if c == 0:
            continue
        kept_groups.append(j)
        members = [j * g + i for i in range(g)]
        chosen = [h for h in members if bool(keep[h])]
        fill = [h for h in members if not bool(keep[h])][: m - c]
        placeholders += fill
        kept_heads += sorted(chosen + fill)
    return kept_heads, placeholders, kept_groups


def _plan_heads(surgery: _Surgery, spec: ArchitectureSpec, modules: Mapping[str, nn.Module], site: str,
                keep: Tensor, head_dim: int) -> Tuple[int, int, int, List[int]]:
    """Validate and plan one attention. Returns (heads removed, KV heads removed, placeholders, heads kept)."""
    o = _linear_like(site, modules[site])
    lin = {r: _linear_like(n, m) for r, (n, m) in attention_projections(spec, modules, site).items()}
    o_in = _dims(o)[0]
    n_h = o_in // head_dim
    inner = n_h * head_dim
    if keep.numel() != n_h or o_in != inner:
        raise ValueError(f"head site '{site}' has {o_in} input channels, not {keep.numel()} heads of {head_dim}: "
                         "selection from another model (or the model was pruned since)")
    if "qkv" in lin:
        n_kv = n_h
        if _dims(lin["qkv"])[1] != 3 * inner:
            raise ValueError(f"the fused projection of head site '{site}' has {_dims(lin['qkv'])[1]} outputs, "
                             f"not 3 x {inner}")
    else:
        n_kv = _dims(lin["k"])[1] // head_dim
        if (_dims(lin["q"])[1] != inner or n_kv == 0 or n_h % n_kv or _dims(lin["v"])[1] != n_kv * head_dim
                or _dims(lin["k"])[1] != n_kv * head_dim):
            raise ValueError(f"head site '{site}': query / key / value widths {_dims(lin['q'])[1]} / "
                             f"{_dims(lin['k'])[1]} / {_dims(lin['v'])[1]} do not fit {n_h} heads of {head_dim}")
    attr_mods = []
    for rel, attr, qty in spec.head_attrs:
        n = relative_name(site, spec.attention_up, rel)
        m = modules.get(n)
        if m is None or not hasattr(m, attr):
            raise ValueError(f"attention module '{n}' has no attribute '{attr}', which the '{spec.name}' row of the "
                             "architecture table says its forward reads (another transformers version?)")
        attr_mods.append((m, attr, qty))
    heads, placeholders, groups = _head_plan(keep.bool().cpu(), n_kv)
    if len(heads) == n_h and not placeholders:
        return 0, 0, 0, heads
    ch = torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)
    zero = torch.tensor([h in placeholders for h in heads for _ in range(head_dim)], dtype=torch.bool)
    surgery.cut(o, "in", ch, zero)
    if "qkv" in lin:
        surgery.cut(lin["qkv"], "out", torch.cat([ch, ch + inner, ch + 2 * inner]))
        new_kv = len(heads)
    elif n_kv == n_h:  # no GQA: keys / values follow the query heads
        for r in ("q", "k", "v"):
            surgery.cut(lin[r], "out", ch)
        new_kv = len(heads)
    else:
        kv_ch = torch.tensor([j * head_dim + i for j in groups for i in range(head_dim)], dtype=torch.long)
        surgery.cut(lin["q"], "out", ch)
        surgery.cut(lin["k"], "out", kv_ch)
        surgery.cut(lin["v"], "out", kv_ch)
        new_kv = len(groups)
    values = {"heads": len(heads), "kv_heads": new_kv, "groups": len(heads) // new_kv, "inner": len(heads) * head_dim}
    surgery.attrs += [(m, attr, values[qty]) for m, attr, qty in attr_mods]
    return n_h - len(heads), n_kv - new_kv, len(placeholders), heads


def _plan_neurons(surgery: _Surgery, spec: ArchitectureSpec, modules: Mapping[str, nn.Module], site: str,
                  keep: Tensor) -> int:
    down = _linear_like(site, modules[site])
    d_in = _dims(down)[0]
    inputs = [_linear_like(n, m) for n, m in ffn_input_projections(spec, modules, site)]
    if keep.numel() != d_in or any(_dims(i)[1] != d_in for i in inputs):
        raise ValueError(f"neuron site '{site}' has {d_in} neurons; the selection has {keep.numel()}: selection from "
                         "another model (or the model was pruned since)")
    if bool(keep.all()):
        return 0
    idx = keep.bool().cpu().nonzero().squeeze(1)
    for lin in inputs:
        surgery.cut(lin, "out", idx)
    surgery.cut(down, "in", idx)
    return int(keep.numel() - idx.numel())


# ---------------------------------------------------------------------------------------------
# Hidden dimensions


def _hidden_presets() -> List[str]:
    return [k for k, s in ARCHITECTURES.items() if s.hidden is not None]


def _plan_hidden(surgery: _Surgery, arch: str, spec: ArchitectureSpec, model: nn.Module,
                 modules: Mapping[str, nn.Module], keep: Tensor) -> int:
    from .config import load_config

    hs = spec.hidden
    if hs is None:
        raise ValueError(
            f"prune_model removes hidden dimensions physically for {_hidden_presets()} only; this model is {arch!r}. "
            "Select with kinds=('head', 'neuron'), or mask the hidden dims with apt_salience.masks.apply_masks"
        )
    sites, _ = find_sites(model, load_config({"architecture": arch}))
    writers = [s for s in sites if s.kind in ("head", "neuron")]
    d = writers[0].out_features
    if keep.numel() != d:
        raise ValueError(f"the selection has {keep.numel()} hidden dims but the model's hidden size is {d}: "
                         "selection from another model (or the model was pruned since)")
    cls = type(model).__name__
    tops = sorted((t for t in hs.tops if cls.endswith(t[0])), key=lambda t: -len(t[0]))
    if not tops:
        supported = ", ".join(f"*{t[0]}" for t in hs.tops)
        raise ValueError(f"hidden pruning of '{arch}' models knows the model classes {supported}; {cls} has heads on "
                         "top that prune_model does not know. Prune heads and neurons only, or mask hidden dims")
    _, readers_re, indep_re = tops[0]
    idx = keep.bool().cpu().nonzero().squeeze(1)
    placed: Dict[str, str] = {}

    def place(name: str, mod: nn.Module, axis: str) -> None:
        if axis in ("in", "out"):
            _linear_like(name, mod)
            size = _dims(mod)[0 if axis == "in" else 1]
        elif axis == "emb":
            if not isinstance(mod, nn.Embedding):
                raise ValueError(f"'{name}' matches the embedding pattern of '{arch}' but is a {type(mod).__name__}")
            size = mod.embedding_dim
        else:
            ps = [p for p in mod.parameters(recurse=False) if p.dim() == 1]
            size = ps[0].numel() if ps and all(p.numel() == ps[0].numel() for p in ps) else -1
        if size != d:
            raise ValueError(f"'{name}' ({type(mod).__name__}) is placed as a hidden-stream {axis!r} module of '{arch}' "
                             f"but its width is {size}, not the hidden size {d}")
        surgery.cut(mod, axis, idx)
        placed[name] = axis

    for s in writers:
        place(s.name, s.module, "out")
        inputs = (list(attention_projections(spec, modules, s.name).values()) if s.kind == "head"
                  else ffn_input_projections(spec, modules, s.name))
        for n, m in inputs:
            place(n, m, "in")
    emb_re, norm_re = re.compile(hs.embeddings), re.compile(hs.norms)
    rd_re = re.compile(readers_re) if readers_re else None
    ind_re = re.compile(indep_re) if indep_re else None
    for name, mod in modules.items():
        if not name or name in placed:
            continue
        if emb_re.fullmatch(name):
            place(name, mod, "emb")
        elif norm_re.fullmatch(name):
            place(name, mod, "norm")
        elif rd_re is not None and rd_re.fullmatch(name):
            place(name, mod, "in")
        elif ind_re is not None and ind_re.fullmatch(name):
            placed[name] = "independent"
    for name, mod in modules.items():
        if name and name not in placed and any(d in p.shape for p in mod.parameters(recurse=False)):
            raise ValueError(
                f"module '{name}' ({type(mod).__name__}) has a parameter of the hidden size {d} that the '{arch}' row "
                "of the architecture table does not place (embedding, norm, reader or writer of the residual stream, "
                "or independent of it); prune_model cannot remove hidden dims of this model safely"
            )
    return d - int(idx.numel())


# ---------------------------------------------------------------------------------------------
# prune_model


def _spec_for(model: nn.Module, hint: Optional[str]) -> Tuple[str, ArchitectureSpec]:
    arch = detect_architecture(model) or hint
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"prune_model supports the presets {sorted(ARCHITECTURES)}; this model is {arch!r}. Apply the selection "
            "with apt_salience.masks.apply_masks instead"
        )
    assert arch is not None
    return arch, ARCHITECTURES[arch]


def _prune(model: nn.Module, arch: str, spec: ArchitectureSpec, modules: Mapping[str, nn.Module],
           heads: Mapping[str, Tuple[Tensor, int]], neurons: Mapping[str, Tensor],
           hidden: Optional[Tensor]) -> PruneReport:
    surgery = _Surgery()
    n_heads = n_kv = n_neurons = n_placeholders = n_hidden = 0
    kept: Dict[str, List[int]] = {}
    changed = False
    for site, (keep, hd) in heads.items():
        h, k, p, kept_heads = _plan_heads(surgery, spec, modules, site, keep, hd)
        n_heads, n_kv, n_placeholders = n_heads + h, n_kv + k, n_placeholders + p
        kept[site] = kept_heads
        changed = changed or len(kept_heads) != keep.numel()  # (placeholders alone change no bias column)
    if spec.shared_bias and changed:  # every attention of the model then selects its bias columns
        from .config import load_config

        all_sites, _ = find_sites(model, load_config({"architecture": arch}))
        n_now = {s.name: s.num_blocks for s in all_sites if s.kind == "head"}
        for name, n in n_now.items():
            kept.setdefault(name, list(range(n)))
        _plan_shared_bias(surgery, spec, modules, kept, n_now)
    for site, keep in neurons.items():
        n_neurons += _plan_neurons(surgery, spec, modules, site, keep)
    if hidden is not None:
        n_hidden = _plan_hidden(surgery, arch, spec, model, modules, hidden)
    before = count_parameters(model)
    surgery.apply()
    if n_placeholders:
        _log.info("apt_salience: %d head(s) kept as zeroed placeholders (grouped-query attention groups must stay "
                  "equal, or an attention would be empty)", n_placeholders)
    return PruneReport(before, count_parameters(model), n_heads, n_kv, n_neurons, n_placeholders,
                       pruned_shapes(model, arch), n_hidden)


def prune_model(model: nn.Module, selection: Selection) -> PruneReport:
    """Remove the heads, neurons and hidden dims that ``selection`` drops; modifies the model in place.

    Heads and neurons: the pruned model computes what the model masked with
    ``apply_masks(model, selection)`` computes (up to float rounding). Hidden dims (BERT / RoBERTa
    / LLaMA family only): the pruned model computes exactly what the dense model computes when
    the removed dims are zeroed at every embedding, head-site, neuron-site and norm output *and*
    every LayerNorm / RMSNorm takes its statistics over the kept dims only; that is not the
    ``apply_masks`` model (see the module docstring and ``docs/pruning.md``). Other presets
    refuse a selection that drops hidden dims.

    Everything is checked before anything changes: on any error the model is left as it was.
    Remove mask handles first, rebuild the optimizer after (the pruned weights are new
    Parameters), and call ``tracker.refresh()`` on an attached tracker so it reads the new shapes.

    Args:
        model: a Hugging Face model of a preset in :data:`apt_salience.architectures.ARCHITECTURES`
            (plain ``nn.Linear`` / ``Conv1D`` layers: merge LoRA adapters first).
        selection: a :class:`~apt_salience.selection.Selection` made for this model (its layout's
            site names and sizes must match the model's current shapes).

    Returns:
        A :class:`PruneReport` (parameters before / after, blocks removed, placeholders, shapes).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from apt_salience.pruning import prune_model
        >>> from apt_salience.selection import BlockLayout, Selection
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...     num_key_value_heads=2, intermediate_size=16, vocab_size=50))
        >>> lay = BlockLayout.from_model(model)
        >>> sel = Selection(torch.tensor([False, False, True, True]), torch.arange(16) < 10,
        ...                 torch.arange(32) % 8 != 0, 0., 1., 1., lay)
        >>> r = prune_model(model, sel)
        >>> attn = model.model.layers[0].self_attn
        >>> attn.q_proj.weight.shape, attn.k_proj.out_features, attn.num_key_value_groups, r.neurons_removed
        (torch.Size([16, 28]), 8, 2, 6)
        >>> r.hidden_removed, model.lm_head.in_features, model.model.norm.weight.shape
        (4, 28, torch.Size([28]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be an apt_salience Selection, got {type(selection).__name__}")
    arch, spec = _spec_for(model, selection.layout.architecture)
    modules = dict(model.named_modules())
    heads: Dict[str, Tuple[Tensor, int]] = {}
    neurons: Dict[str, Tensor] = {}
    for kind, name, real, _, _, bs in layout_sites(modules, selection.layout, "selection"):
        m = selection.by_site(kind).get(name)
        if m is None:
            continue
        if kind == "head":
            heads[real] = (m.bool(), bs)
        else:
            neurons[real] = m.bool()
    hidden = selection.hidden
    if hidden is not None and bool(hidden.bool().all()):
        hidden = None
    return _prune(model, arch, spec, modules, heads, neurons, None if hidden is None else hidden.bool())


# ---------------------------------------------------------------------------------------------
# save / load


def _config_hidden_size(model: nn.Module) -> Optional[int]:
    from .architectures import _model_config

    v = getattr(_model_config(model), "hidden_size", None)
    return int(v) if isinstance(v, int) else None


def pruned_shapes(model: nn.Module, architecture: Optional[str] = None) -> Dict[str, Any]:
    """The per-site head / KV-head / neuron counts and the hidden size of a (pruned) model: what :func:`load_pruned` re-applies.

    Args:
        model: a model of a preset architecture, pruned or not.
        architecture: the preset name (detected from ``model.config`` by default).

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> from apt_salience.pruning import pruned_shapes
        >>> s = pruned_shapes(GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=10, n_positions=8)))
        >>> s["format"], s["heads"]["h.0.attn.c_proj"], s["neurons"], s["hidden"]
        ('apt_salience.pruning/2', {'heads': 2, 'kv_heads': 2, 'head_dim': 8}, {'h.0.mlp.c_proj': 64}, {'config': 16, 'kept': 16})
    """
    from .config import load_config

    arch, spec = _spec_for(model, architecture)
    sites, _ = find_sites(model, load_config({"architecture": arch}))
    modules = dict(model.named_modules())
    heads: Dict[str, Dict[str, Any]] = {}
    neurons: Dict[str, int] = {}
    for s in sites:
        if s.kind == "head":
            projs = attention_projections(spec, modules, s.name)
            kv = _dims(projs["k"][1])[1] // s.block_size if "k" in projs else s.num_blocks
            entry: Dict[str, Any] = {"heads": s.num_blocks, "kv_heads": kv, "head_dim": s.block_size}
            root = modules[relative_name(s.name, spec.attention_up)]
            if isinstance(root, _SharedBiasHeads):
                entry["bias_index"] = root.apt_head_index.tolist()
            heads[s.name] = entry
        elif s.kind == "neuron":
            neurons[s.name] = s.num_blocks
    d = next(s.out_features for s in sites if s.kind in ("head", "neuron"))
    return {"format": f"apt_salience.pruning/{PRUNING_FORMAT_VERSION}", "architecture": arch,
            "model_class": type(model).__name__, "hidden": {"config": _config_hidden_size(model) or d, "kept": d},
            "heads": heads, "neurons": neurons}


def _record_version(rec: Any, where: Path) -> int:
    fmt = rec.get("format") if isinstance(rec, dict) else None
    m = _FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    if m is None:
        raise ValueError(f"{where} is not an apt_salience pruning record (format {fmt!r}; expected "
                         f"'apt_salience.pruning/<version>'); it was not written by apt_salience.pruning.save_pruned")
    v = int(m.group(1))
    if not 1 <= v <= PRUNING_FORMAT_VERSION:
        raise ValueError(f"{where} has pruning-record format version {v}; this apt_salience reads versions 1 to "
                         f"{PRUNING_FORMAT_VERSION}. Upgrade apt_salience to the version that wrote it")
    return v


def _apply_shapes(model: nn.Module, rec: Mapping[str, Any], where: Path) -> None:
    arch = rec["architecture"]
    detected = detect_architecture(model)
    if arch not in ARCHITECTURES or (detected is not None and detected != arch):
        raise ValueError(f"{where} is for architecture {arch!r}, but the model built from config.json is {detected!r}")
    spec = ARCHITECTURES[arch]
    modules = dict(model.named_modules())

    def site(name: str) -> nn.Module:
        if name not in modules:
            raise ValueError(f"{where} names module '{name}', which the model built from config.json does not have")
        return modules[name]

    heads: Dict[str, Tuple[Tensor, int]] = {}
    for name, h in dict(rec.get("heads", {})).items():
        hd = int(h["head_dim"])
        n_h = _dims(_linear_like(name, site(name)))[0] // hd
        keep = torch.zeros(n_h, dtype=torch.bool)
        want_h, want_kv = int(h["heads"]), int(h["kv_heads"])
        if "bias_index" in h:
            keep[torch.tensor([int(i) for i in h["bias_index"]], dtype=torch.long)] = True
        else:
            projs = attention_projections(spec, modules, name)
            n_kv = _dims(projs["k"][1])[1] // hd if "k" in projs else n_h
            if n_kv == n_h:
                keep[:want_h] = True
            else:
                g, m = n_h // n_kv, want_h // want_kv
                for j in range(want_kv):
                    keep[j * g : j * g + m] = True
        if int(keep.sum()) != want_h:
            raise ValueError(f"{where}: head site '{name}' records {want_h} heads, which this model cannot reproduce")
        heads[name] = (keep, hd)
    neurons: Dict[str, Tensor] = {}
    for name, n in dict(rec.get("neurons", {})).items():
        d_in = _dims(_linear_like(name, site(name)))[0]
        neurons[name] = torch.arange(d_in) < int(n)
    hidden = None
    hid = rec.get("hidden")
    if hid is not None:
        d = next((_dims(modules[n])[1] for n in list(heads) + list(neurons)), None)
        kept = int(hid["kept"])
        if d is not None and kept < d:
            hidden = torch.arange(d) < kept
    _prune(model, arch, spec, modules, heads, neurons, hidden)


def save_pruned(model: nn.Module, path: Union[str, "os.PathLike[str]"], **save_kwargs: Any) -> Path:
    """``model.save_pretrained(path)`` plus ``apt_pruning.json`` with the per-layer shapes.

    ``config.json`` keeps the original sizes (the model classes build from it); ``apt_pruning.json``
    (format ``apt_salience.pruning/2``: architecture, per head site its heads / KV heads / head size
    and, for T5, each head's position-bias column, per neuron site its neurons, and the kept hidden
    size) says how to shrink that model before the weights are loaded. Read it back with
    :func:`load_pruned` (``from_pretrained`` alone cannot: the weights do not fit the config).

    Args:
        model: a Hugging Face ``PreTrainedModel`` of a preset architecture, pruned or not.
        path: the folder to write (created).
        save_kwargs: passed to ``save_pretrained`` (transformers 5: ``save_original_format=False`` unless
            given, so the weights keep the names of the model's own modules).

    Example: see :func:`load_pruned`.
    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise TypeError("save_pruned needs a Hugging Face PreTrainedModel (with save_pretrained)")
    from .scores import write_json

    import inspect

    p = Path(path)
    shapes = pruned_shapes(model)
    if "save_original_format" in inspect.signature(save).parameters:
        # transformers 5 would rename some weights back to their 4.x names (ViT); load_pruned reads the model's own
        save_kwargs.setdefault("save_original_format", False)
    save(p, **save_kwargs)
    write_json(p / PRUNING_FILE, shapes)
    return p


def load_pruned(path: Union[str, "os.PathLike[str]"], model_class: Optional[Type[Any]] = None) -> nn.Module:
    """Load a model written by :func:`save_pruned`: built from its config, shrunk to the saved shapes, weights loaded.

    Reads ``apt_pruning.json`` of format version 1 (heads and neurons, written by earlier versions)
    or 2. A missing, unreadable or corrupt record, or one of an unknown version, is a ``ValueError``
    that names the file (and, for bad JSON, the line).

    Args:
        path: the folder :func:`save_pruned` wrote.
        model_class: the class to build; defaults to ``transformers.<config.architectures[0]>``.

    Returns:
        The model, in eval mode.

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertModel
        >>> from apt_salience.pruning import prune_model, save_pruned, load_pruned
        >>> from apt_salience.selection import BlockLayout, Selection
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=64, vocab_size=100)).eval()
        >>> sel = Selection(torch.arange(8) != 5, torch.arange(128) % 3 > 0, torch.arange(32) != 7, 0., 1., 1.,
        ...                 BlockLayout.from_model(model))
        >>> _ = prune_model(model, sel)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_pruned(model, d); again = load_pruned(d)
        >>> ids = torch.randint(0, 100, (1, 6))
        >>> torch.allclose(again(ids).last_hidden_state, model(ids).last_hidden_state), again.config.hidden_size
        (True, 32)
    """
    import transformers
    from safetensors.torch import load_file

    p = Path(path)
    rec_path = p / PRUNING_FILE
    if not rec_path.is_file():
        raise ValueError(f"'{p}' has no {PRUNING_FILE}; it was not written by apt_salience.pruning.save_pruned")
    try:
        rec = read_json(rec_path, "pruning record")
    except ValueError as exc:
        raise ValueError(f"{exc}. The pruned shapes of the model in '{p}' are lost with it: restore {PRUNING_FILE} "
                         "from a copy, or prune the original model again and save it with save_pruned") from None
    _record_version(rec, rec_path)
    config = transformers.AutoConfig.from_pretrained(p)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"cannot tell the model class from {p}/config.json; pass model_class=")
        model_class = getattr(transformers, archs[0])
    model = model_class(config)
    try:
        _apply_shapes(model, rec, rec_path)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{rec_path} is malformed ({type(exc).__name__}: {exc}); write it again with save_pruned") from None
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in '{p}'")
    state: Dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"weights in '{p}' do not fit the pruned model: unexpected {result.unexpected_keys[:5]}")
    if result.missing_keys:
        tie = getattr(model, "tie_weights", None)
        if callable(tie):
            tie()
        loaded = {t.data_ptr() for n, t in model.state_dict().items() if n in state}
        untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
        if untied:
            raise ValueError(f"weights in '{p}' lack {untied[:5]} (not tied to any loaded weight)")
    model.eval()
    return model
