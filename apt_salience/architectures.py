"""Architecture knowledge in one table: model family -> site regexes and where GQA is read.

Everything else (head counts, gating, parameter counts) is derived from the current
module shapes, so it stays right after physical pruning.

Example:
    >>> from apt_salience.architectures import ARCHITECTURES
    >>> ARCHITECTURES["llama"].kv_proj
    'k_proj'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import PRESET_NAMES, ConfigError, SalienceConfig
from .salience import head_param_count, neuron_param_count

__all__ = ["ArchitectureSpec", "ARCHITECTURES", "Site", "find_sites", "linear_dims", "linear_weight", "detect_architecture"]

_P = r"(?:.*\.)?"  # any module-name prefix (a PEFT wrapper adds "base_model.model.")


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to find the sites of one model family."""

    name: str
    model_types: Tuple[str, ...]
    heads: str
    neurons: str
    kv_proj: Optional[str] = None  # sibling of the head site whose out_features / head_dim = n_kv
    adapters: str = r".*\.lora_B\.[^.]+"


_BERT_HEADS = _P + r"layer\.\d+\.attention\.output\.dense"
_BERT_NEURONS = _P + r"layer\.\d+\.output\.dense"
_LLAMA = dict(heads=_P + r"layers\.\d+\.self_attn\.o_proj", neurons=_P + r"layers\.\d+\.mlp\.down_proj", kv_proj="k_proj")

ARCHITECTURES: Dict[str, ArchitectureSpec] = {
    "bert": ArchitectureSpec("bert", ("bert",), _BERT_HEADS, _BERT_NEURONS),
    "roberta": ArchitectureSpec("roberta", ("roberta", "xlm-roberta"), _BERT_HEADS, _BERT_NEURONS),
    "llama": ArchitectureSpec("llama", ("llama",), **_LLAMA),
    "mistral": ArchitectureSpec("mistral", ("mistral",), **_LLAMA),
    "qwen2": ArchitectureSpec("qwen2", ("qwen2",), **_LLAMA),
    "t5": ArchitectureSpec(
        "t5",
        ("t5", "mt5"),
        _P + r"block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)\.o",
        _P + r"block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
    ),
    "gpt2": ArchitectureSpec("gpt2", ("gpt2",), _P + r"h\.\d+\.attn\.c_proj", _P + r"h\.\d+\.mlp\.c_proj"),
    "opt": ArchitectureSpec("opt", ("opt",), _P + r"layers\.\d+\.self_attn\.out_proj", _P + r"layers\.\d+\.fc2"),
    "vit": ArchitectureSpec(
        "vit",
        ("vit",),
        _P + r"layers?\.\d+\.attention\.(?:o_proj|output\.dense)",
        _P + r"layers?\.\d+\.(?:mlp\.fc2|output\.dense)",
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
    """``(in_features, out_features)`` of a Linear-like module, or None."""
    m = _base(module)
    if isinstance(m, nn.Linear):
        return int(m.in_features), int(m.out_features)
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return None


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a view; Conv1D's ``[in, out]`` is transposed)."""
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


@dataclass
class Site:
    """One hooked module and what its blocks are."""

    name: str
    kind: str  # head | neuron | adapter
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
    """The preset whose ``model_types`` contains ``model.config.model_type``, or None."""
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


def _layer_of(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name.rsplit(".", 1)[0] if "." in name else name


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

    compiled = {k: re.compile(r) for k, r in (("head", heads_re), ("neuron", neurons_re), ("adapter", adapters_re)) if r}
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
            if spec is not None and spec.kv_proj and parent is not None and hasattr(parent, spec.kv_proj):
                kv_dims = linear_dims(getattr(parent, spec.kv_proj))
                if kv_dims is not None and kv_dims[1] % head_dim == 0:
                    n_kv = kv_dims[1] // head_dim
            count = head_param_count(d_out, head_dim, n_h, n_kv)
            block = head_dim
        elif kind == "neuron":
            gated = False
            if parent is not None:
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
        sites.append(Site(name, kind, module, d_in, d_out, block, _layer_of(name), count, _module_device(module)))

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
