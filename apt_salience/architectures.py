"""Architecture knowledge in one table: per model family, where the sites are and how each block kind is removed.

One row (:class:`ArchitectureSpec`) says, for a preset: the site regexes (head sites = attention
output projections, neuron sites = FFN down projections), where the query / key / value
projections (or one fused projection) and the FFN input projections sit relative to a site,
which attributes the attention forward reads, and (:class:`HiddenSpec`) which embeddings,
norms and heads on top hold the hidden dimension. The tracker, the masks and physical pruning
all read this table; adding a family is one row.

Everything else (head counts, gating, parameter counts) is derived from the current
module shapes, so it stays right after physical pruning.

Example:
    >>> from apt_salience.architectures import ARCHITECTURES
    >>> ARCHITECTURES["llama"].kv_proj, ARCHITECTURES["gpt2"].qkv, ARCHITECTURES["t5"].ffn_inputs
    ('k_proj', 'c_attn', (('wi',), ('wi_0', 'wi_1')))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import PRESET_NAMES, ConfigError, SalienceConfig
from .layout import BlockLayout, SiteKind, layer_of
from .salience import head_param_count, neuron_param_count

__all__ = ["ArchitectureSpec", "HiddenSpec", "ARCHITECTURES", "Site", "find_sites", "linear_dims", "linear_weight",
           "detect_architecture", "resolve_module", "block_size_of", "layout_sites", "attention_projections",
           "ffn_input_projections", "relative_name"]

_P = r"(?:.*\.)?"  # any module-name prefix (a PEFT wrapper adds "base_model.model.")

#: What an attention attribute in :attr:`ArchitectureSpec.head_attrs` is set to after head pruning.
HEAD_QUANTITIES = ("heads", "kv_heads", "groups", "inner")


@dataclass(frozen=True)
class HiddenSpec:
    """Where a family holds the hidden (model) dimension besides its sites, for physical hidden pruning.

    The head and neuron sites *write* the residual stream (their output rows go); the query /
    key / value (or fused) projections and the FFN input projections of the :class:`ArchitectureSpec`
    *read* it (their input columns go). Besides those:

    * ``embeddings``: regex of the ``nn.Embedding`` s whose ``embedding_dim`` is the hidden size
      (their columns go);
    * ``norms``: regex of the LayerNorm / RMSNorm modules over the hidden size (weight and bias go);
    * ``tops``: the heads on top, per model class: ``(class-name suffix, readers, independent)``.
      ``readers`` (regex) read the residual stream (input columns go: pooler, classifier, lm_head);
      ``independent`` (regex) have a hidden-sized dimension that lives in another space and stays
      (e.g. BERT's classifier, which reads the pooler's output). A model class whose name ends in
      none of the suffixes is refused, and so is any module with a hidden-sized parameter that
      none of these names.
    """

    embeddings: str
    norms: str
    tops: Tuple[Tuple[str, str, str], ...]


@dataclass(frozen=True)
class ArchitectureSpec:
    """One model family: where its sites are and how each block kind is removed.

    Names of projections are relative to a *root*: the site's name with its last
    ``attention_up`` (head sites) or ``ffn_up`` (neuron sites) components removed.

    * ``name``: the preset's name; ``model_types``: the ``config.model_type`` values it is detected from.
    * ``heads`` / ``neurons`` / ``adapters``: site regexes (``re.fullmatch`` on module names).
    * ``q`` / ``k`` / ``v``: the query / key / value projections, or ``qkv``: one fused projection
      whose outputs are ``[q | k | v]`` (GPT-2's ``c_attn``).
    * ``gqa``: keys / values may have fewer heads than queries (read from ``k``'s width).
    * ``head_attrs``: ``(module relative to the root, attribute, quantity)`` the attention forward
      reads; quantity is one of ``heads``, ``kv_heads``, ``groups`` (query heads per KV head) or
      ``inner`` (heads x head_dim).
    * ``shared_bias``: name (relative to the root) of a position-bias ``nn.Embedding`` with one
      column per head that one attention of a stack owns and every same-role attention of that
      stack reuses (T5's ``relative_attention_bias``).
    * ``ffn_inputs``: alternatives, each a tuple of FFN input projections (the first alternative
      whose modules all exist is used; two or more = a gated FFN).
    * ``hidden``: how hidden dims are removed physically (None: not supported for this family).
    """

    name: str
    model_types: Tuple[str, ...]
    heads: str
    neurons: str
    adapters: str = r".*\.lora_B\.[^.]+"
    attention_up: int = 1
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None
    gqa: bool = False
    head_attrs: Tuple[Tuple[str, str, str], ...] = ()
    shared_bias: Optional[str] = None
    ffn_up: int = 1
    ffn_inputs: Tuple[Tuple[str, ...], ...] = ()
    hidden: Optional[HiddenSpec] = None

    @property
    def kv_proj(self) -> Optional[str]:
        """The projection whose width tells the number of KV heads (grouped-query families), else None."""
        return self.k if self.gqa else None


def _bert_like(name: str, model_types: Tuple[str, ...], seq_cls: Tuple[str, str]) -> ArchitectureSpec:
    return ArchitectureSpec(
        name, model_types,
        heads=_P + r"layer\.\d+\.attention\.output\.dense",
        neurons=_P + r"layer\.\d+\.output\.dense",
        attention_up=2, q="self.query", k="self.key", v="self.value",
        head_attrs=(("self", "num_attention_heads", "heads"), ("self", "all_head_size", "inner")),
        ffn_up=2, ffn_inputs=(("intermediate.dense",),),
        hidden=HiddenSpec(
            embeddings=_P + r"embeddings\.(?:word|position|token_type)_embeddings",
            norms=_P + r"(?:embeddings|layer\.\d+\.output|layer\.\d+\.attention\.output)\.LayerNorm",
            tops=(("Model", _P + r"pooler\.dense", ""), ("ForSequenceClassification",) + seq_cls),
        ),
    )


def _llama_like(name: str) -> ArchitectureSpec:
    return ArchitectureSpec(
        name, (name,),
        heads=_P + r"layers\.\d+\.self_attn\.o_proj",
        neurons=_P + r"layers\.\d+\.mlp\.down_proj",
        q="q_proj", k="k_proj", v="v_proj", gqa=True,
        head_attrs=(("", "num_key_value_groups", "groups"),),
        ffn_inputs=(("gate_proj", "up_proj"),),
        hidden=HiddenSpec(
            embeddings=_P + r"embed_tokens",
            norms=_P + r"(?:layers\.\d+\.(?:input|post_attention)_layernorm|norm)",
            tops=(("Model", "", ""), ("ForCausalLM", r"lm_head", ""), ("ForSequenceClassification", r"score", "")),
        ),
    )


ARCHITECTURES: Dict[str, ArchitectureSpec] = {
    # BertForSequenceClassification: the pooler reads the stream, the classifier reads the pooler's output
    "bert": _bert_like("bert", ("bert",), (_P + r"pooler\.dense", _P + r"classifier")),
    # RobertaForSequenceClassification: classifier.dense reads the stream, classifier.out_proj its output
    "roberta": _bert_like("roberta", ("roberta", "xlm-roberta"), (_P + r"classifier\.dense", _P + r"classifier\.out_proj")),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "t5": ArchitectureSpec(
        "t5",
        ("t5", "mt5"),
        _P + r"block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)\.o",
        _P + r"block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
        q="q", k="k", v="v",
        head_attrs=(("", "n_heads", "heads"), ("", "inner_dim", "inner")),
        shared_bias="relative_attention_bias",
        ffn_inputs=(("wi",), ("wi_0", "wi_1")),
    ),
    "gpt2": ArchitectureSpec(
        "gpt2", ("gpt2",), _P + r"h\.\d+\.attn\.c_proj", _P + r"h\.\d+\.mlp\.c_proj",
        qkv="c_attn", head_attrs=(("", "num_heads", "heads"), ("", "split_size", "inner")),
        ffn_inputs=(("c_fc",),),
    ),
    "opt": ArchitectureSpec(
        "opt", ("opt",), _P + r"layers\.\d+\.self_attn\.out_proj", _P + r"layers\.\d+\.fc2",
        q="q_proj", k="k_proj", v="v_proj", head_attrs=(("", "num_heads", "heads"),),
        ffn_inputs=(("fc1",),),
    ),
    "vit": ArchitectureSpec(
        "vit",
        ("vit",),
        _P + r"layers?\.\d+\.attention\.(?:o_proj|output\.dense)",
        _P + r"layers?\.\d+\.(?:mlp\.fc2|output\.dense)",
        q="q_proj", k="k_proj", v="v_proj", head_attrs=(("", "num_attention_heads", "heads"),),
        ffn_inputs=(("fc1",),),
    ),
}
assert tuple(ARCHITECTURES) == PRESET_NAMES


# ---------------------------------------------------------------------------------------------
# Linear-like modules: nn.Linear, transformers' Conv1D (weight [in, out]), PEFT LoRA wrappers.


def _is_lora_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def _base(module: nn.Module) -> nn.Module:
    while _is_lora_wrapper(module):
        module = module.base_layer  # type: ignore[assignment]
    return module


def linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(in_features, out_features)`` of a Linear-like module, or None.

    Args:
        module: an ``nn.Linear``, a transformers ``Conv1D`` or a PEFT LoRA wrapper of one.
    """
    m = _base(module)
    if isinstance(m, nn.Linear):
        return int(m.in_features), int(m.out_features)
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return None


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a view; Conv1D's ``[in, out]`` is transposed).

    Args:
        module: an ``nn.Linear``, a transformers ``Conv1D`` or a PEFT LoRA wrapper of one.
    """
    m = _base(module)
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(m).__name__} has no weight tensor")
    return w.t() if type(m).__name__ == "Conv1D" else w


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Module lookup: by name, relative to a site, from a block layout.


def relative_name(site: str, up: int, rel: str = "") -> str:
    """The name ``rel`` relative to ``site`` with its last ``up`` components removed.

    Args:
        site: a site's module name.
        up: how many trailing components to remove.
        rel: the name to append (empty: the root itself).

    Example:
        >>> relative_name("encoder.layer.0.attention.output.dense", 2, "self.query")
        'encoder.layer.0.attention.self.query'
    """
    parts = site.split(".")
    root = ".".join(parts[: len(parts) - up])
    return f"{root}.{rel}" if root and rel else (root or rel)


def resolve_module(modules: Mapping[str, nn.Module], name: str) -> Tuple[str, nn.Module]:
    """Find the module called ``name``; tolerate a wrapper prefix added or removed (PEFT's ``base_model.model.``).

    Raises ``ValueError`` when no module, or more than one, fits.

    Args:
        modules: ``dict(model.named_modules())``.
        name: the module name a layout or selection gives.
    """
    if name in modules:
        return name, modules[name]
    cands = [n for n in modules if n and (n.endswith("." + name) or name.endswith("." + n))]
    if len(cands) == 1:
        return cands[0], modules[cands[0]]
    if not cands:
        raise ValueError(
            f"module '{name}' named by the masks / selection is not in this model; were the scores "
            "computed on another model?"
        )
    raise ValueError(f"module name '{name}' is ambiguous in this model (candidates: {cands[:4]})")


def block_size_of(layout: BlockLayout, name: str, dims: Optional[Tuple[int, int]], count: int) -> int:
    """The site's block size from the layout, or (scores without it) from the module's input width.

    Args:
        layout: the layout that names the site.
        name: the site's name in the layout.
        dims: the module's ``(in, out)`` (:func:`linear_dims`), or None.
        count: the site's number of blocks in the layout.
    """
    bs = layout.block_size.get(name)
    if bs:
        return int(bs)
    if dims is not None and count and dims[0] % count == 0:
        return dims[0] // count
    return 1


def layout_sites(modules: Mapping[str, nn.Module], layout: BlockLayout, what: str = "masks",
                 kinds: Tuple[str, ...] = ("head", "neuron")) -> List[Tuple[str, str, str, nn.Module, int, int]]:
    """The head / neuron sites a layout names, found in ``modules``: ``(kind, name, real name, module, blocks, block size)``.

    Raises ``ValueError`` naming the site when a module is missing or its shape does not fit the
    layout (a layout from another model, or a model pruned since).

    Args:
        modules: ``dict(model.named_modules())``.
        layout: the layout whose sites are looked up.
        what: how errors name the layout's owner (``masks``, ``selection``).
        kinds: the kinds whose sites are returned.
    """
    out: List[Tuple[str, str, str, nn.Module, int, int]] = []
    for kind in kinds:
        for name, count in layout.sites.get(kind, ()):
            real, mod = resolve_module(modules, name)
            dims = linear_dims(mod)
            bs = block_size_of(layout, name, dims, count)
            if dims is None or dims[0] != count * bs:
                raise ValueError(
                    f"{kind} site '{real}' has {dims[0] if dims else 'no'} input channels but the {what} "
                    f"describe {count} blocks of {bs}: {what} from another model (or the model was pruned since)"
                )
            if layout.d_model and dims[1] != layout.d_model:
                raise ValueError(
                    f"{kind} site '{real}' writes {dims[1]} channels but the {what}' d_model is {layout.d_model}: "
                    f"{what} from another model (or the model was pruned since)"
                )
            out.append((kind, name, real, mod, count, bs))
    return out


def attention_projections(spec: ArchitectureSpec, modules: Mapping[str, nn.Module],
                          site: str) -> Dict[str, Tuple[str, nn.Module]]:
    """``{"q", "k", "v"}`` (or ``{"qkv"}`` for a fused projection) -> ``(name, module)`` of a head site.

    Raises ``ValueError`` naming the missing module.

    Args:
        spec: the architecture row.
        modules: ``dict(model.named_modules())``.
        site: the head site's name.
    """
    roles = {"qkv": spec.qkv} if spec.qkv else {"q": spec.q, "k": spec.k, "v": spec.v}
    out: Dict[str, Tuple[str, nn.Module]] = {}
    for role, rel in roles.items():
        if not rel:
            raise ValueError(f"the '{spec.name}' architecture row names no {role} projection for head site '{site}'")
        n = relative_name(site, spec.attention_up, rel)
        if n not in modules:
            raise ValueError(f"cannot find the {role} projection '{n}' of head site '{site}' ({spec.name} layout)")
        out[role] = (n, modules[n])
    return out


def ffn_input_projections(spec: ArchitectureSpec, modules: Mapping[str, nn.Module],
                          site: str) -> List[Tuple[str, nn.Module]]:
    """The FFN input projections (up, and gate when gated) of a neuron site, as ``(name, module)``.

    Raises ``ValueError`` when no alternative of ``spec.ffn_inputs`` is complete.

    Args:
        spec: the architecture row.
        modules: ``dict(model.named_modules())``.
        site: the neuron site's name.
    """
    for alt in spec.ffn_inputs:
        names = [relative_name(site, spec.ffn_up, rel) for rel in alt]
        if names and all(n in modules for n in names):
            return [(n, modules[n]) for n in names]
    wanted = " or ".join("+".join(relative_name(site, spec.ffn_up, r) for r in alt) for alt in spec.ffn_inputs)
    raise ValueError(f"cannot find the FFN input projection(s) {wanted or '(none in the table)'} of neuron site '{site}'")


# ---------------------------------------------------------------------------------------------


@dataclass
class Site:
    """One hooked module and what its blocks are.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        kind: ``head``, ``neuron`` or ``adapter``.
        module: the module (a PEFT LoRA wrapper for a wrapped site).
        in_features: its input width (the blocks' channels).
        out_features: its output width (``d_model`` for head and neuron sites).
        block_size: channels per block: ``d_head`` for heads, 1 otherwise.
        layer: the layer it belongs to (:func:`~apt_salience.layout.layer_of`).
        block_param_count: parameters of one block, from the current shapes.
        device: where its parameters are.
    """

    name: str
    kind: SiteKind
    module: nn.Module
    in_features: int
    out_features: int
    block_size: int  # d_head for heads, 1 otherwise
    layer: str  # the module-name prefix up to the layer index
    block_param_count: float  # parameters of one block (current shapes)
    device: torch.device

    @property
    def num_blocks(self) -> int:
        return self.in_features // self.block_size

    @property
    def writes_hidden(self) -> bool:
        return self.kind in ("head", "neuron")


def _model_config(model: nn.Module) -> Any:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            return cfg
    return None


def detect_architecture(model: nn.Module) -> Optional[str]:
    """The preset whose ``model_types`` contains ``model.config.model_type``, or None.

    Args:
        model: a Hugging Face model (or a wrapper of one); anything else gives None.
    """
    cfg = _model_config(model)
    mt = getattr(cfg, "model_type", None)
    for name, spec in ARCHITECTURES.items():
        if mt in spec.model_types:
            return name
    return None


def _config_head_dim(cfg: Any) -> Optional[int]:
    if cfg is None:
        return None
    for attr in ("head_dim", "d_kv", "attention_head_size"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    heads = next((getattr(cfg, a) for a in ("num_attention_heads", "num_heads", "n_head") if getattr(cfg, a, None)), None)
    hidden = next((getattr(cfg, a) for a in ("hidden_size", "d_model", "n_embd") if getattr(cfg, a, None)), None)
    if isinstance(heads, int) and isinstance(hidden, int) and hidden % heads == 0:
        return hidden // heads
    return None


def _linear_listing(model: nn.Module, limit: int = 12) -> str:
    seen: Dict[str, int] = {}
    for name, m in model.named_modules():
        if name and linear_dims(m) is not None and ".lora_" not in name and not name.endswith("base_layer"):
            key = re.sub(r"\.\d+\.", ".N.", "." + name + ".")[1:-1]
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return "  (no nn.Linear / Conv1D modules found)"
    rows = [f"  {k}  (x{v})" for k, v in list(seen.items())[:limit]]
    if len(seen) > limit:
        rows.append(f"  ... and {len(seen) - limit} more patterns")
    return "\n".join(rows)


_FIX_EXAMPLE = (
    "Set the sites explicitly, e.g. in config.yaml:\n"
    "  architecture: custom\n"
    "  sites:\n"
    "    heads: '.*\\.attn\\.out_proj'     # attention output projection (input = concatenated heads)\n"
    "    neurons: '.*\\.mlp\\.down'        # FFN down projection (input = neurons)\n"
    "    head_dim: 64"
)


def find_sites(model: nn.Module, config: SalienceConfig) -> Tuple[List[Site], str]:
    """Resolve the architecture and return ``(sites in model order, architecture name)``.

    Raises :class:`~apt_salience.config.ConfigError` with the fix when nothing usable is found.

    Args:
        model: the model whose sites are found (its current shapes are read; nothing is changed).
        config: the validated config; ``architecture`` and ``sites`` are used.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    arch = config.architecture
    spec: Optional[ArchitectureSpec]
    if arch == "auto":
        detected = detect_architecture(model)
        if detected is None and not (config.sites.heads or config.sites.neurons or config.sites.adapters):
            mt = getattr(_model_config(model), "model_type", None)
            raise ConfigError(
                f"architecture 'auto' could not recognise this model (model_type={mt!r}, class "
                f"{type(model).__name__}); known presets: {', '.join(PRESET_NAMES)}.\n"
                f"Linear-like modules found:\n{_linear_listing(model)}\n{_FIX_EXAMPLE}"
            )
        arch = detected or "custom"
    spec = ARCHITECTURES.get(arch)
    heads_re = config.sites.heads or (spec.heads if spec else None)
    neurons_re = config.sites.neurons or (spec.neurons if spec else None)
    adapters_re = config.sites.adapters or (spec.adapters if spec else r".*\.lora_B\.[^.]+")
    cfg = _model_config(model)
    head_dim = config.sites.head_dim or _config_head_dim(cfg)

    patterns: Tuple[Tuple[SiteKind, Optional[str]], ...] = (("head", heads_re), ("neuron", neurons_re),
                                                             ("adapter", adapters_re))
    compiled = {k: re.compile(r) for k, r in patterns if r}
    modules = dict(model.named_modules())
    sites: List[Site] = []
    for name, module in model.named_modules():
        if not name:
            continue
        kinds = [k for k, rx in compiled.items() if rx.fullmatch(name)]
        if not kinds:
            continue
        if len(kinds) > 1:
            raise ConfigError(
                f"module '{name}' matches the site patterns of more than one kind ({', '.join(kinds)}); "
                "make 'sites.heads', 'sites.neurons' and 'sites.adapters' disjoint"
            )
        kind = kinds[0]
        if kind != "adapter" and (".lora_" in name or name.endswith(".base_layer")):
            continue  # LoRA internals are never heads or neurons
        dims = linear_dims(module)
        if dims is None:
            if kind == "adapter" and isinstance(module, (nn.ModuleDict, nn.Identity, nn.Dropout)):
                continue
            raise ConfigError(
                f"site '{name}' (matched by the {kind} pattern) is a {type(module).__name__}, not an nn.Linear, "
                "transformers Conv1D or PEFT LoRA Linear; adjust the 'sites' regular expressions"
            )
        d_in, d_out = dims
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = modules.get(parent_name)
        if kind == "head":
            if head_dim is None:
                raise ConfigError(
                    f"cannot tell the head size for head site '{name}': set 'sites.head_dim' "
                    "(the model config has no head_dim / d_kv / hidden_size and num_attention_heads)"
                )
            if d_in % head_dim:
                raise ConfigError(
                    f"head site '{name}' has {d_in} input channels, not a multiple of head_dim={head_dim}; "
                    "set 'sites.head_dim' to the size of one attention head"
                )
            n_h = d_in // head_dim
            n_kv = n_h
            if spec is not None and spec.gqa:
                try:
                    kv_dims = linear_dims(attention_projections(spec, modules, name)["k"][1])
                except ValueError:  # sites overridden by config: no table projections to read
                    kv_dims = None
                if kv_dims is not None and kv_dims[1] % head_dim == 0:
                    n_kv = kv_dims[1] // head_dim
            count = head_param_count(d_out, head_dim, n_h, n_kv)
            block = head_dim
        elif kind == "neuron":
            gated = False
            inputs: Optional[List[Tuple[str, nn.Module]]] = None
            if spec is not None:
                try:
                    inputs = ffn_input_projections(spec, modules, name)
                except ValueError:  # sites overridden by config: fall back to the siblings
                    inputs = None
            if inputs is not None:
                gated = len(inputs) >= 2
            elif parent is not None:
                siblings = [
                    c for cn, c in parent.named_children()
                    if c is not module and (d := linear_dims(c)) is not None and d[1] == d_in
                ]
                gated = len(siblings) >= 2
            count = neuron_param_count(d_out, gated)
            block = 1
        else:
            a_name = name.replace(".lora_B.", ".lora_A.")
            a_dims = linear_dims(modules[a_name]) if a_name in modules else None
            count = float((a_dims[0] if a_dims else d_out) + d_out)
            block = 1
        sites.append(Site(name, kind, module, d_in, d_out, block, layer_of(name), count, _module_device(module)))

    if not any(s.kind in ("head", "neuron") for s in sites) and not any(s.kind == "adapter" for s in sites):
        raise ConfigError(
            f"no sites matched (architecture '{arch}', heads={heads_re!r}, neurons={neurons_re!r}).\n"
            f"Linear-like modules found:\n{_linear_listing(model)}\n{_FIX_EXAMPLE}"
        )
    hidden_dims = {s.out_features for s in sites if s.writes_hidden}
    if len(hidden_dims) > 1:
        raise ConfigError(
            f"head and neuron sites write different hidden sizes {sorted(hidden_dims)}; the hidden kind needs one "
            "model dimension. Restrict 'sites.heads' / 'sites.neurons' to modules that write the residual stream"
        )
    return sites, arch
