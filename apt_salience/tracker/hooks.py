"""The hook objects the tracker puts on the model, and the one object that owns their handles.

Two hooks on each site: a forward pre-hook (observes the site's input; on the first site it
also closes the previous micro-batch) and a forward hook (observes its output). They are small
objects rather than closures so that copying the model is defined:

* ``copy.deepcopy(model)`` (a teacher for self-distillation, an EMA copy, a snapshot) gives a
  copy that is *not* tracked: its hooks are inert placeholders that remove themselves at the
  copy's first forward, and the tracker removes them at its next ``step()`` or ``detach()``.
  Attach a tracker to the copy to track it.
* pickling (``torch.save(model)``) while attached raises a ``TypeError`` that says what to do
  (save ``model.state_dict()`` and ``tracker.state_dict()``, or detach first).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet", "SiteInputHook", "SiteOutputHook"]

_PICKLE_MESSAGE = (
    "apt_salience: a model cannot be pickled while a SalienceTracker is attached to it (its hooks are on the "
    "modules). Save model.state_dict() (and tracker.state_dict() for the statistics), or call tracker.detach() first."
)

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_FLAG_DICTS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _remove_hook_objects(module: nn.Module, predicate: Callable[[Any], bool]) -> int:
    """Remove the hooks of ``module`` for which ``predicate(hook)`` holds; returns how many."""
    removed = 0
    for dname in _HOOK_DICTS:
        d = getattr(module, dname, None)
        if not d:
            continue
        for hid in [k for k, h in d.items() if predicate(h)]:
            del d[hid]
            removed += 1
            for fname in _FLAG_DICTS:
                f = getattr(module, fname, None)
                if f is not None:
                    f.pop(hid, None)
    return removed


class _Hook:
    """Base of the tracker's hooks: owned by one :class:`HookSet`, inert in copies, refuses pickling."""

    __slots__ = ("_owner", "_module", "__weakref__")

    def __init__(self, owner: "HookSet", module: nn.Module):
        self._owner = owner
        self._module = weakref.ref(module)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_CopiedHook":
        original = self._module()
        copy_of_module = memo.get(id(original)) if original is not None else None
        if isinstance(copy_of_module, nn.Module):
            self._owner.note_copy(copy_of_module)
        return _CopiedHook()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_PICKLE_MESSAGE)


class _CopiedHook:
    """What a tracker hook becomes in a deep copy of the model: does nothing, removes itself when called."""

    __slots__ = ()

    def __call__(self, module: nn.Module, *args: Any) -> None:
        _remove_hook_objects(module, lambda h: isinstance(h, _CopiedHook))
        return None

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_CopiedHook":
        return _CopiedHook()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_PICKLE_MESSAGE)


class SiteInputHook(_Hook):
    """Forward pre-hook of a site: observes its input (replaced by the probe's identity under compile)."""

    __slots__ = ("_fn",)

    def __init__(self, owner: "HookSet", module: nn.Module, fn: Callable[[Any], Any]):
        super().__init__(owner, module)
        self._fn = fn

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        for i, v in enumerate(args):
            if isinstance(v, torch.Tensor):
                new = self._fn(v)
                if new is None:
                    return None
                return args[:i] + (new,) + args[i + 1 :], kwargs
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                new = self._fn(v)
                if new is None:
                    return None
                return args, {**kwargs, k: new}
        return None


class SiteOutputHook(_Hook):
    """Forward hook of a site: observes its output (the sub-layer's write to the residual stream)."""

    __slots__ = ("_fn",)

    def __init__(self, owner: "HookSet", module: nn.Module, fn: Callable[[Any], Any]):
        super().__init__(owner, module)
        self._fn = fn

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            if not output:
                return None
            new = self._fn(output[0])
            if new is None:
                return None
            return type(output)([new, *output[1:]]) if isinstance(output, list) else (new,) + tuple(output[1:])
        return self._fn(output)


class HookSet:
    """Owns every hook handle of one tracker; :meth:`remove` is idempotent and also cleans copies."""

    def __init__(self) -> None:
        self._handles: List[RemovableHandle] = []
        self._copies: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def add_input_hook(self, module: nn.Module, fn: Callable[[Any], Any]) -> None:
        self._handles.append(module.register_forward_pre_hook(SiteInputHook(self, module, fn), with_kwargs=True))

    def add_output_hook(self, module: nn.Module, fn: Callable[[Any], Any]) -> None:
        self._handles.append(module.register_forward_hook(SiteOutputHook(self, module, fn)))

    def note_copy(self, module: nn.Module) -> None:
        self._copies.add(module)

    def clean_copies(self) -> None:
        """Take the inert placeholders off deep copies of the model."""
        for m in list(self._copies):
            _remove_hook_objects(m, lambda h: isinstance(h, _CopiedHook))
        self._copies = weakref.WeakSet()

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self.clean_copies()

    def __len__(self) -> int:
        return len(self._handles)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_PICKLE_MESSAGE)
