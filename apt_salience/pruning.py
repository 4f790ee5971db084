"""Physical structured pruning of BERT / RoBERTa and LLaMA-family models from a :class:`Selection`.

:func:`prune_model` shrinks the Linear layers in place (the same module objects keep their
hooks; their weights become new, smaller ``nn.Parameter`` s, so rebuild the optimizer) and
updates the attributes the attention code reads:

* heads: rows of the query / key / value projections and columns of the attention output
  projection. Grouped-query attention: a key/value group is removed only when all of its
  query heads are removed. Hugging Face's attention repeats each KV head the same number of
  times, so the surviving groups must keep equally many query heads: a group that keeps
  fewer than the others keeps some of its selected-for-pruning heads as *placeholders*, heads
  whose output-projection columns are zeroed (they contribute exactly nothing, like the
  masked head). An attention left with no head keeps one placeholder head (Hugging Face
  attention cannot run with zero heads). Both are counted in :attr:`PruneReport.placeholder_heads`.
* neurons: rows of the FFN up (and gate) projection, columns of the down projection.
* hidden dimensions: not pruned physically (a selection that drops some is refused; mask them
  with :func:`apply_masks` instead).

Transformers 5 has no head pruning of its own (``config.pruned_heads`` is gone), so a pruned
model is saved with :func:`save_pruned` (``save_pretrained`` plus ``apt_pruning.json``, the
per-layer head / KV-head / neuron counts) and read back with :func:`load_pruned`.

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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .architectures import detect_architecture, linear_dims
from .masks import block_size_of, resolve_module
from .selection import BlockLayout, Selection

__all__ = ["PruneReport", "PruneSpec", "PRUNE_SPECS", "prune_model", "pruned_shapes", "save_pruned", "load_pruned",
           "PRUNING_FILE", "count_parameters"]

PRUNING_FILE = "apt_pruning.json"


@dataclass(frozen=True)
class PruneSpec:
    """Where the projections that a head / neuron site reads from live, relative to the site.

    ``*_up``: how many name components to strip from the site's name to reach the root the
    relative names start from.
    """

    head_up: int
    q: str
    k: str
    v: str
    attn: str  # the module whose attributes the attention forward reads ("" = the root)
    neuron_up: int
    neuron_inputs: Tuple[str, ...]


_BERT = PruneSpec(2, "self.query", "self.key", "self.value", "self", 2, ("intermediate.dense",))
_LLAMA = PruneSpec(1, "q_proj", "k_proj", "v_proj", "", 1, ("gate_proj", "up_proj"))

#: Architectures :func:`prune_model` supports.
PRUNE_SPECS: Dict[str, PruneSpec] = {"bert": _BERT, "roberta": _BERT, "llama": _LLAMA, "mistral": _LLAMA,
                                     "qwen2": _LLAMA}


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune_model` did.

    ``params_before`` / ``params_after``: every parameter of the model (biases included);
    ``heads_removed``, ``kv_heads_removed``, ``neurons_removed``: totals; ``placeholder_heads``:
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

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared / tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _join(root: str, rel: str) -> str:
    return f"{root}.{rel}" if root and rel else (root or rel)


def _up(name: str, n: int) -> str:
    parts = name.split(".")
    return ".".join(parts[: len(parts) - n])


def _plain_linear(name: str, mod: nn.Module) -> nn.Linear:
    if hasattr(mod, "base_layer"):
        raise ValueError(
            f"'{name}' is a PEFT LoRA layer; physical pruning needs plain Linear layers: call "
            "model.merge_and_unload() first (masks made on the PEFT model still apply to the merged one)"
        )
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"'{name}' is a {type(mod).__name__}; prune_model shrinks nn.Linear layers only")
    return mod


def _keep_rows(lin: nn.Linear, idx: Tensor) -> None:
    with torch.no_grad():
        w = lin.weight.index_select(0, idx.to(lin.weight.device)).clone()
        lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
        if lin.bias is not None:
            b = lin.bias.index_select(0, idx.to(lin.bias.device)).clone()
            lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    lin.out_features = int(idx.numel())


def _keep_cols(lin: nn.Linear, idx: Tensor, zero: Optional[Tensor] = None) -> None:
    with torch.no_grad():
        w = lin.weight.index_select(1, idx.to(lin.weight.device)).clone()
        if zero is not None and bool(zero.any()):
            w[:, zero.to(w.device)] = 0
        lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    lin.in_features = int(idx.numel())


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


def _spec_for(model: nn.Module, layout: Optional[BlockLayout]) -> Tuple[str, PruneSpec]:
    arch = (layout.architecture if layout is not None else None) or detect_architecture(model)
    if arch not in PRUNE_SPECS:
        detected = detect_architecture(model)
        if detected in PRUNE_SPECS:
            arch = detected
    if arch not in PRUNE_SPECS:
        raise ValueError(
            f"prune_model supports {sorted(PRUNE_SPECS)}; this model is {arch!r}. Apply the selection with "
            "apt_salience.masks.apply_masks instead"
        )
    assert arch is not None
    return arch, PRUNE_SPECS[arch]


def _prune_heads(modules: Mapping[str, nn.Module], spec: PruneSpec, site: str, keep: Tensor,
                 head_dim: int) -> Tuple[int, int, int]:
    """Returns (heads removed, kv heads removed, placeholders)."""
    o = _plain_linear(site, modules[site])
    root = _up(site, spec.head_up)
    names = {r: _join(root, getattr(spec, r)) for r in ("q", "k", "v")}
    for r, n in names.items():
        if n not in modules:
            raise ValueError(f"cannot find the {r} projection '{n}' of head site '{site}'")
    q, k, v = (_plain_linear(names[r], modules[names[r]]) for r in ("q", "k", "v"))
    n_h = o.in_features // head_dim
    n_kv = k.out_features // head_dim
    if keep.numel() != n_h or n_h % n_kv or q.out_features != n_h * head_dim:
        raise ValueError(f"head site '{site}' has {n_h} heads and {n_kv} KV heads; the selection has {keep.numel()}")
    heads, placeholders, groups = _head_plan(keep.bool().cpu(), n_kv)
    ch = torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)
    zero = torch.tensor([h in placeholders for h in heads for _ in range(head_dim)], dtype=torch.bool)
    kv_ch = torch.tensor([j * head_dim + i for j in groups for i in range(head_dim)], dtype=torch.long)
    _keep_rows(q, ch)
    _keep_cols(o, ch, zero)
    if n_kv == n_h:  # no GQA: keys / values follow the query heads
        _keep_rows(k, ch)
        _keep_rows(v, ch)
        new_kv = len(heads)
    else:
        _keep_rows(k, kv_ch)
        _keep_rows(v, kv_ch)
        new_kv = len(groups)
    attn = modules[_join(root, spec.attn)] if _join(root, spec.attn) else None
    if attn is not None:
        n_new = len(heads)
        for attr, value in (("num_attention_heads", n_new), ("all_head_size", n_new * head_dim), ("num_heads", n_new),
                            ("num_key_value_heads", new_kv), ("num_key_value_groups", n_new // new_kv)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
    return n_h - len(heads), n_kv - new_kv, len(placeholders)


def _prune_neurons(modules: Mapping[str, nn.Module], spec: PruneSpec, site: str, keep: Tensor) -> int:
    down = _plain_linear(site, modules[site])
    root = _up(site, spec.neuron_up)
    inputs = []
    for rel in spec.neuron_inputs:
        n = _join(root, rel)
        if n not in modules:
            raise ValueError(f"cannot find the FFN input projection '{n}' of neuron site '{site}'")
        inputs.append(_plain_linear(n, modules[n]))
    if keep.numel() != down.in_features or any(i.out_features != down.in_features for i in inputs):
        raise ValueError(f"neuron site '{site}' has {down.in_features} neurons; the selection has {keep.numel()}")
    idx = keep.bool().cpu().nonzero().squeeze(1)
    for lin in inputs:
        _keep_rows(lin, idx)
    _keep_cols(down, idx)
    return int(keep.numel() - idx.numel())


def prune_model(model: nn.Module, selection: Selection) -> PruneReport:
    """Remove the heads and neurons that ``selection`` drops, in place.

    The pruned model computes what the model masked with ``apply_masks(model, selection)``
    computes (up to float rounding). Remove mask handles first, rebuild the optimizer after
    (the pruned weights are new Parameters), and call ``tracker.refresh()`` on an attached
    tracker so it reads the new shapes. Returns a :class:`PruneReport`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from apt_salience.pruning import prune_model
        >>> from apt_salience.selection import BlockLayout, Selection
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...     num_key_value_heads=2, intermediate_size=16, vocab_size=50))
        >>> lay = BlockLayout.from_model(model)
        >>> sel = Selection(torch.tensor([False, False, True, True]), torch.arange(16) < 10, None, 0., 1., 1., lay)
        >>> r = prune_model(model, sel)
        >>> attn = model.model.layers[0].self_attn
        >>> attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups, r.neurons_removed
        (16, 8, 2, 6)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be an apt_salience Selection, got {type(selection).__name__}")
    if selection.hidden is not None and not bool(selection.hidden.all()):
        raise ValueError(
            "the selection prunes hidden dimensions, which prune_model does not remove physically; select with "
            "kinds=('head', 'neuron') or apply the hidden masks with apply_masks"
        )
    arch, spec = _spec_for(model, selection.layout)
    modules = dict(model.named_modules())
    layout = selection.layout
    # validate everything before touching the model
    plan: List[Tuple[str, str, Tensor, int]] = []
    for kind in ("head", "neuron"):
        for name, keep in selection.site_masks(kind).items():
            real, mod = resolve_module(modules, name)
            dims = linear_dims(mod)
            bs = block_size_of(layout, name, dims, keep.numel())
            if dims is None or dims[0] != keep.numel() * bs:
                raise ValueError(
                    f"{kind} site '{real}' has {dims[0] if dims else 'no'} input channels but the selection has "
                    f"{keep.numel()} blocks of {bs}: selection from another model (or the model was pruned since)"
                )
            _plain_linear(real, mod)
            plan.append((kind, real, keep, bs))
    before = count_parameters(model)
    heads = kv = neurons = placeholders = 0
    for kind, real, keep, bs in plan:
        if kind == "head":
            h, k, p = _prune_heads(modules, spec, real, keep, bs)
            heads += h
            kv += k
            placeholders += p
        elif not bool(keep.all()):
            neurons += _prune_neurons(modules, spec, real, keep)
    if placeholders:
        import logging

        logging.getLogger("apt_salience").info(
            "apt_salience: %d head(s) kept as zeroed placeholders (grouped-query attention groups must stay equal, "
            "or an attention would be empty)", placeholders)
    return PruneReport(before, count_parameters(model), heads, kv, neurons, placeholders, pruned_shapes(model, arch))


# ---------------------------------------------------------------------------------------------
# save / load


def pruned_shapes(model: nn.Module, architecture: Optional[str] = None) -> Dict[str, Any]:
    """The per-site head / KV-head / neuron counts of a (pruned) model: what :func:`load_pruned` re-applies."""
    from .architectures import find_sites
    from .config import load_config

    arch, spec = _spec_for(model, None) if architecture is None else (architecture, PRUNE_SPECS[architecture])
    sites, _ = find_sites(model, load_config({"architecture": arch}))
    modules = dict(model.named_modules())
    heads: Dict[str, Dict[str, int]] = {}
    neurons: Dict[str, int] = {}
    for s in sites:
        if s.kind == "head":
            k = modules[_join(_up(s.name, spec.head_up), spec.k)]
            dims = linear_dims(k)
            assert dims is not None
            heads[s.name] = {"heads": s.num_blocks, "kv_heads": dims[1] // s.block_size, "head_dim": s.block_size}
        elif s.kind == "neuron":
            neurons[s.name] = s.num_blocks
    return {"format": "apt_salience.pruning/1", "architecture": arch, "heads": heads, "neurons": neurons}


def _apply_shapes(model: nn.Module, shapes: Mapping[str, Any]) -> None:
    arch = shapes["architecture"]
    spec = PRUNE_SPECS[arch]
    modules = dict(model.named_modules())
    for site, h in shapes["heads"].items():
        o = _plain_linear(site, modules[site])
        hd = int(h["head_dim"])
        n_h, n_kv = o.in_features // hd, linear_dims(modules[_join(_up(site, spec.head_up), spec.k)])[1] // hd  # type: ignore[index]
        want_h, want_kv = int(h["heads"]), int(h["kv_heads"])
        keep = torch.zeros(n_h, dtype=torch.bool)
        if n_kv == n_h:
            keep[:want_h] = True
        else:
            g, m = n_h // n_kv, want_h // want_kv
            for j in range(want_kv):
                keep[j * g : j * g + m] = True
        _prune_heads(modules, spec, site, keep, hd)
    for site, n in shapes["neurons"].items():
        down = _plain_linear(site, modules[site])
        keep = torch.arange(down.in_features) < int(n)
        if not bool(keep.all()):
            _prune_neurons(modules, spec, site, keep)


def save_pruned(model: nn.Module, path: Union[str, "os.PathLike[str]"], **save_kwargs: Any) -> Path:
    """``model.save_pretrained(path)`` plus ``apt_pruning.json`` with the per-layer shapes.

    Example: see :func:`load_pruned`.
    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise TypeError("save_pruned needs a Hugging Face PreTrainedModel (with save_pretrained)")
    p = Path(path)
    shapes = pruned_shapes(model)
    save(p, **save_kwargs)
    (p / PRUNING_FILE).write_text(json.dumps(shapes, indent=1), encoding="utf-8")
    return p


def load_pruned(path: Union[str, "os.PathLike[str]"], model_class: Optional[Type[Any]] = None) -> nn.Module:
    """Load a model written by :func:`save_pruned`: built from its config, shrunk to the saved shapes, weights loaded.

    ``model_class`` defaults to ``transformers.<config.architectures[0]>``. Returns the model in eval mode.

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertModel
        >>> from apt_salience.pruning import prune_model, save_pruned, load_pruned
        >>> from apt_salience.selection import BlockLayout, Selection
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=64, vocab_size=100)).eval()
        >>> sel = Selection(torch.arange(8) != 5, torch.arange(128) % 3 > 0, None, 0., 1., 1., BlockLayout.from_model(model))
        >>> _ = prune_model(model, sel)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_pruned(model, d); again = load_pruned(d)
        >>> ids = torch.randint(0, 100, (1, 6))
        >>> torch.allclose(again(ids).last_hidden_state, model(ids).last_hidden_state)
        True
    """
    import transformers
    from safetensors.torch import load_file

    p = Path(path)
    rec_path = p / PRUNING_FILE
    if not rec_path.is_file():
        raise ValueError(f"'{p}' has no {PRUNING_FILE}; it was not written by apt_salience.pruning.save_pruned")
    shapes = json.loads(rec_path.read_text(encoding="utf-8"))
    if shapes.get("format") != "apt_salience.pruning/1":
        raise ValueError(f"{rec_path} is not an apt_salience pruning record")
    config = transformers.AutoConfig.from_pretrained(p)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"cannot tell the model class from {p}/config.json; pass model_class=")
        model_class = getattr(transformers, archs[0])
    model = model_class(config)
    _apply_shapes(model, shapes)
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
