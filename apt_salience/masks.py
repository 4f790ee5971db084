"""Soft / hard structured masks applied through hooks: :func:`apply_masks` and :class:`MaskHandle`.

Where each kind is multiplied (the same sites the tracker observes: the layout's site names,
found in ``dict(model.named_modules())`` by :func:`apt_salience.architectures.layout_sites`):

* head: the input channels of the head site (attention output projection), ``d_head`` channels
  per head, through a forward pre-hook;
* neuron: the input channels of the FFN down projection, through a forward pre-hook;
* hidden: the output of every head and neuron site (what each sub-layer writes to the residual
  stream), through a forward hook. Embeddings, layer norms and the residual stream itself are
  not touched, so this is *not* what physical hidden pruning gives (see
  :func:`apt_salience.pruning.prune_model` and ``docs/pruning.md``).

Under PEFT the site is the LoRA wrapper, so the mask covers base layer and adapter together.
The hooks are prepended, so a :class:`~apt_salience.tracker.SalienceTracker` attached before
or after sees the masked tensors. Removing the handle restores the model bit-exactly.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from apt_salience.masks import apply_masks
    >>> from apt_salience.layout import BlockLayout
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    >>> layout = BlockLayout.from_model(model, {"architecture": "custom", "sites": {"neurons": "2"}})
    >>> x = torch.randn(2, 4)
    >>> with apply_masks(model, {"neuron": torch.zeros(6)}, layout=layout):
    ...     torch.allclose(model(x), model[2].bias.expand(2, 4))
    True
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .architectures import block_size_of, layout_sites, resolve_module
from .layout import BlockLayout
from .selection import Selection

__all__ = ["MaskHandle", "apply_masks", "resolve_module", "block_size_of"]

MasksArg = Union[Selection, Mapping[str, Tensor]]


def _first_tensor_index(args: Tuple[Any, ...]) -> int:
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            return i
    return -1


class MaskHandle:
    """The hooks of one :func:`apply_masks` call: :meth:`update` the masks in place, :meth:`remove` them.

    ``remove()`` is idempotent; the handle is also a context manager.

    Args:
        model: the model the hooks go on (modified in place through hooks until :meth:`remove`).
        layout: the layout the masks follow.
        masks: ``{kind: 1-D float mask}`` already checked against ``layout``
            (:func:`apply_masks` builds the handle; call that).
    """

    def __init__(self, model: nn.Module, layout: BlockLayout, masks: Dict[str, Tensor]):
        self.layout = layout
        self.kinds: Tuple[str, ...] = tuple(k for k in layout.kinds() if k in masks)
        self._handles: List[RemovableHandle] = []
        self._channel: Dict[str, Tuple[nn.Module, str, Tensor]] = {}  # site -> (module, kind, channel mask)
        self._hidden: Optional[Tensor] = None
        self._hidden_sites: List[Tuple[str, nn.Module]] = []
        modules = dict(model.named_modules())
        try:
            for kind, name, _, mod, count, bs in layout_sites(modules, layout, "masks"):
                if kind in self.kinds:
                    dev = next((p.device for p in mod.parameters()), torch.device("cpu"))
                    self._channel[name] = (mod, kind, torch.ones(count * bs, device=dev))
                self._hidden_sites.append((name, mod))
            if "hidden" in self.kinds:
                dev = next((p.device for _, m in self._hidden_sites for p in m.parameters()), torch.device("cpu"))
                self._hidden = torch.ones(layout.d_model, device=dev)
            self.update(masks)
            for name, (mod, kind, _) in self._channel.items():
                self._handles.append(mod.register_forward_pre_hook(self._make_pre_hook(name), prepend=True))
            if self._hidden is not None:
                for name, mod in self._hidden_sites:
                    self._handles.append(mod.register_forward_hook(self._make_hidden_hook(), prepend=True))
        except BaseException:
            self.remove()
            raise

    # -------------------------------------------------------------- hooks

    def _make_pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
            i = _first_tensor_index(args)
            if i < 0:
                return None
            mask = self._channel[name][2]
            x = args[i]
            if x.shape[-1] != mask.numel():
                raise RuntimeError(
                    f"masked site '{name}' now has {x.shape[-1]} input channels, the mask {mask.numel()}; remove the "
                    "mask handle before pruning or reshaping the model"
                )
            return args[:i] + (x * mask.to(device=x.device, dtype=x.dtype),) + args[i + 1 :]

        return hook

    def _make_hidden_hook(self) -> Any:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
            assert self._hidden is not None
            y = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(y, Tensor):
                return None
            m = self._hidden.to(device=y.device, dtype=y.dtype)
            y = y * m
            if isinstance(output, tuple):
                return (y,) + tuple(output[1:])
            if isinstance(output, list):
                return [y] + list(output[1:])
            return y

        return hook

    # -------------------------------------------------------------- public

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return bool(self._handles)

    def update(self, masks: MasksArg) -> None:
        """Replace the mask values (a :class:`Selection` with the same layout, or ``{kind: 1-D tensor}``).

        Args:
            masks: a :class:`Selection` with this handle's layout, or ``{kind: 1-D tensor}`` of the masked kinds.
        """
        if isinstance(masks, Selection):
            if masks.layout.sites != self.layout.sites:
                raise ValueError("the selection's block layout differs from the one these masks were applied with")
            masks = masks.masks(torch.float32)
        checked = self.layout.check_masks(masks, "masks")
        for kind, m in checked.items():
            if kind not in self.kinds and not bool((m == 1).all()):
                raise ValueError(
                    f"kind {kind!r} was not masked when apply_masks was called (masked kinds: {self.kinds}); "
                    "apply a new handle to mask it"
                )
        with torch.no_grad():
            for kind in ("head", "neuron"):
                if kind not in checked or kind not in self.kinds:
                    continue
                m = checked[kind]
                for name, sl in self.layout.by_site(kind).items():
                    _, _, ch = self._channel[name]
                    bs = ch.numel() // (sl.stop - sl.start)
                    ch.copy_(m[sl].repeat_interleave(bs).to(ch.device))
            if "hidden" in checked and self._hidden is not None:
                self._hidden.copy_(checked["hidden"].to(self._hidden.device))

    def masks(self) -> Dict[str, Tensor]:
        """The current block masks (float32, CPU) of the kinds being masked."""
        out: Dict[str, Tensor] = {}
        for kind in ("head", "neuron"):
            parts = []
            for name, count in self.layout.sites.get(kind, ()):
                if name in self._channel:
                    ch = self._channel[name][2].cpu()
                    parts.append(ch[:: ch.numel() // count] if count else ch[:0])
            if parts:
                out[kind] = torch.cat(parts)
        if self._hidden is not None:
            out["hidden"] = self._hidden.detach().cpu().clone()
        return out

    def remove(self) -> None:
        """Remove every hook (safe to call twice)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "MaskHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"MaskHandle(sites={len(self._channel)}, hidden={self._hidden is not None}, active={self.active})"


def apply_masks(model: nn.Module, masks: MasksArg, *, layout: Optional[BlockLayout] = None) -> MaskHandle:
    """Multiply heads, neurons and hidden dims of ``model`` by ``masks`` through hooks.

    Args:
        model: the model the masks' layout was made from (names are looked up in
            ``model.named_modules()``; a PEFT wrapper prefix added or removed is tolerated).
        masks: a :class:`~apt_salience.selection.Selection` (its bool masks, as 0/1), or
            ``{kind: 1-D float tensor}`` (e.g. from :func:`~apt_salience.selection.update_masks`) with
            ``layout`` given or taken from ``masks``' selection.
        layout: the :class:`~apt_salience.selection.BlockLayout` of a dict of masks (a Selection's layout by default).

    Kinds absent from ``masks`` are not hooked (hidden only when given). Returns a
    :class:`MaskHandle`; ``handle.remove()`` restores the model exactly. Modifies the model in place
    through forward hooks (its weights are not touched) until the handle is removed.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from apt_salience.masks import apply_masks
        >>> from apt_salience.layout import BlockLayout
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=64, vocab_size=100)).eval()
        >>> layout = BlockLayout.from_model(model)
        >>> ids = torch.randint(0, 100, (1, 5)); before = model(ids).last_hidden_state
        >>> h = apply_masks(model, {"head": torch.tensor([1., 0, 1, 1, 0, 0, 1, 1])}, layout=layout)
        >>> bool((model(ids).last_hidden_state - before).abs().max() > 0)
        True
        >>> h.remove(); torch.equal(model(ids).last_hidden_state, before)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(masks, Selection):
        if layout is not None and layout.sites != masks.layout.sites:
            raise ValueError("layout differs from the selection's own layout; pass one or the other")
        layout = masks.layout
        mdict: Dict[str, Tensor] = masks.masks(torch.float32)
    elif isinstance(masks, Mapping):
        if layout is None:
            raise ValueError("apply_masks: a dict of masks needs layout= (e.g. selection.layout or BlockLayout.from_model)")
        mdict = dict(masks)
    else:
        raise TypeError(f"masks must be a Selection or a dict {{kind: tensor}}, got {type(masks).__name__}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    checked = layout.check_masks(mdict, "masks")
    if not checked:
        raise ValueError("apply_masks: no masks given (expected at least one of head, neuron, hidden)")
    return MaskHandle(model, layout, checked)
