"""Observation: what happens when a probed tensor passes a site (eager and compiled).

For one forward of a probe with tensor H, :meth:`Observer.observe`

1. decides whether to observe (attached, not paused, a sampled step, gradients enabled, H
   requires grad) and which token mask applies (the ``token_mask`` block in force, or under a
   gradient-checkpointing re-computation the mask of *that* forward, see below);
2. computes the forward part (:func:`~apt_salience.tracker.statistics.forward_part`) at once;
3. arranges for the backward part to be added to the probe's pending sums when dL/dH arrives:
   eagerly with a tensor hook on H (:class:`_GradHook`), or, inside a ``torch.compile``
   graph, with :class:`_ProbeFunction`, an identity ``autograd.Function`` whose backward returns
   the sums as the gradients of the probe's sink tensors (no mutation, no Python state, so the
   graph stays whole).

Gradient checkpointing. A re-computation runs the site's forward again inside backward:

* non-reentrant (PyTorch's default, Hugging Face's): the re-computed tensors never receive a
  gradient (the original ones do and were observed with their own mask), so it is skipped;
* reentrant (``use_reentrant=True``): the first pass ran without gradients and the
  re-computation is what receives them. Its mask is the one in force when *its* first pass
  ran: the first pass records the active mask under its ``CheckpointFunction`` context and the
  re-computation finds it through the autograd node being executed. Two views with different
  masks (SimCSE, R-Drop) therefore each get their own mask. A re-computation by another
  reentrant implementation takes the mask of the last forward when its shape fits.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from typing import Any, Dict, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .accumulate import Probe
from .errors import SalienceWarning
from .kernels import forward_sums
from .statistics import RECIPES, Recipe, backward_part, forward_part

__all__ = ["Observer", "MaskState"]


def _in_backward() -> bool:
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


class MaskState:
    """One token mask, prepared once for every device that holds a probe (no work in the hooks)."""

    __slots__ = ("shape", "index", "keep")

    def __init__(self, mask: Tensor, devices: Sequence[torch.device], name: str):
        if not isinstance(mask, Tensor):
            raise TypeError(f"token_mask: {name} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() == 0:
            raise ValueError(f"token_mask: {name} must be a [batch, sequence] tensor, got a scalar")
        flat = mask.detach().reshape(-1)
        keep = flat if flat.dtype == torch.bool else flat != 0
        idx = keep.nonzero().squeeze(1)  # one synchronisation here, none in the hooks
        self.shape = tuple(mask.shape)
        self.index: Dict[torch.device, Tensor] = {}
        self.keep: Dict[torch.device, Tensor] = {}
        for d in set(devices) | {mask.device}:
            self.index[d] = idx.to(d, non_blocking=True)
            self.keep[d] = keep.to(d, non_blocking=True)


_Masks = Optional[Tuple[MaskState, Optional[MaskState]]]
_SKIP = object()


def _checkpoint_function() -> Any:
    try:
        from torch.utils.checkpoint import CheckpointFunction
    except ImportError:  # pragma: no cover
        return None
    return CheckpointFunction


class _GradHook:
    """Eager: adds one forward's sums and its gradient's sums to the probe's pending sums.

    The forward part is added only the first time (several backwards through one forward count
    its ``|H|`` once); the gradient part every time (``sum |g1| + sum |g2|``).
    """

    __slots__ = ("obs", "probe", "a", "mom", "x", "index", "fired")

    def __init__(self, obs: "Observer", probe: Probe, a: Optional[Tensor], mom: Optional[Tensor], x: Optional[Tensor],
                 index: Optional[Tensor]):
        self.obs, self.probe, self.a, self.mom, self.x, self.index = obs, probe, a, mom, x, index
        self.fired = False

    def __call__(self, g: Tensor) -> None:
        obs = self.obs
        if not obs.attached:
            return
        p = self.probe
        c = p.channels
        recipe = obs.recipe
        with torch.no_grad():
            b = backward_part(recipe, g.detach().reshape(-1, c), self.x, index=self.index,
                              inv_scale=obs.inv_scale(g.device))
            parts = [b.reshape(-1)]
            if recipe.forward_abs:
                a = self.a if (not self.fired and self.a is not None) else torch.zeros(c, device=g.device)
                parts.insert(0, a)
            parts.append(torch.ones(1, device=g.device))
            p.emit(torch.cat(parts), None if self.fired else self.mom)
        self.fired = True
        self.a = self.mom = None
        obs.maybe_pending = True


class _ProbeFunction(torch.autograd.Function):
    """Compiled graphs: identity on H whose backward emits the probe's sums as sink gradients.

    Also returns the centre of the power sums it used (the stored one, or on the probe's first
    forward the batch's mean), which the caller stores.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, sink_sum: Tensor, sink_mom: Optional[Tensor], centre: Optional[Tensor],
                centre_set: Optional[Tensor], keep: Optional[Tensor], scale: Optional[Tensor], recipe_name: str,
                order: int) -> Tuple[Tensor, Optional[Tensor]]:
        recipe = RECIPES[recipe_name]
        c = t.shape[-1]
        x2 = t.detach().reshape(-1, c)
        a, mom, used = forward_sums(x2, centre, centre_set, keep, order, recipe.forward_abs)
        if used is not None:
            ctx.mark_non_differentiable(used)
        ctx.recipe_name, ctx.channels = recipe_name, c
        ctx.save_for_backward(a, mom, keep, x2 if recipe.keeps_activation else None, scale)
        return t.view_as(t), used

    @staticmethod
    def backward(ctx: Any, g: Tensor, _: Any) -> Tuple[Optional[Tensor], ...]:
        a, mom, keep, x2, scale = ctx.saved_tensors
        recipe = RECIPES[ctx.recipe_name]
        c = ctx.channels
        inv = scale.reciprocal() if scale is not None else None
        b = backward_part(recipe, g.reshape(-1, c), x2, keep=keep, inv_scale=inv, compiled=True)
        parts = ([a.reshape(1, c)] if a is not None else []) + [b]
        gsum = torch.cat([torch.cat(parts).reshape(-1), torch.ones(1, dtype=torch.float32, device=g.device)])
        return g, gsum, mom, None, None, None, None, None, None


class Observer:
    """Token masks, the pause / sampling switches and the per-forward work of every probe."""

    def __init__(self, recipe: Recipe, devices: Sequence[torch.device], scaler: Any = None):
        self.recipe = recipe
        self.devices = list(devices)
        self.scaler = scaler
        self.scaler_enabled = bool(scaler is not None and scaler.is_enabled())
        init = getattr(scaler, "_init_scale", None)
        self.scaler_init = float(init) if init is not None else (float(scaler.get_scale()) if self.scaler_enabled else 1.0)
        self.attached = True
        self.paused = 0
        self.sampling = True  # False in steps skipped by sample_every
        self.mask: _Masks = None
        self.last_mask: _Masks = None  # the mask of the last forward outside backward (eager)
        self.ckpt_masks: "weakref.WeakKeyDictionary[Any, _Masks]" = weakref.WeakKeyDictionary()
        self.unobserved: Set[str] = set()  # probes whose tensor did not require grad
        self.warned: Set[str] = set()
        self.maybe_pending = False  # eager shortcut: nothing to commit until a gradient arrived
        self.compiled_seen = False  # a compiled graph has observed: its pending sums stay allocated between steps

    # ------------------------------------------------------------------ masks

    def set_mask(self, mask: Tensor, decoder_mask: Optional[Tensor]) -> _Masks:
        enc = MaskState(mask, self.devices, "mask")
        dec = MaskState(decoder_mask, self.devices, "decoder_mask") if decoder_mask is not None else None
        prev = self.mask
        self.mask = (enc, dec)
        return prev

    def _note_checkpoint_first_pass(self) -> None:
        """Reentrant checkpointing runs a gradient-free first pass: remember the mask for its re-computation."""
        cls = _checkpoint_function()
        if cls is None:
            return
        code = cls.forward.__code__
        f: Any = sys._getframe(2)
        for _ in range(64):
            if f is None:
                return
            if f.f_code is code:
                ctx = f.f_locals.get("ctx")
                if ctx is not None:
                    self.ckpt_masks[ctx] = self.mask
                return
            f = f.f_back

    def _eager_masks(self) -> Any:
        if not _in_backward():
            self.last_mask = self.mask
            return self.mask
        node = torch._C._current_autograd_node()
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            if getattr(node, "_forward_cls", None) is _checkpoint_function():
                return self.ckpt_masks.get(node)
            return ("last", self.last_mask)
        return _SKIP  # a non-reentrant re-computation: these tensors never receive a gradient

    @staticmethod
    def _mask_for(masks: _Masks, probe: Probe, t: Tensor, strict: bool) -> Any:
        """``(index, keep)`` of ``t``'s token rows, ``(None, None)`` unmasked, or ``_SKIP``."""
        if masks is None:
            return None, None
        state = masks[1] if (probe.decoder and masks[1] is not None) else masks[0]
        shape = state.shape
        tokens = tuple(t.shape[:-1])
        if len(shape) > 1 and tokens == shape[:1]:
            return None, None  # a pooled, per-sequence tensor (e.g. a pooler on [CLS]): no padding positions in it
        if tokens != shape and not (len(tokens) == 1 and tokens[0] == math.prod(shape)):
            if not strict:
                return _SKIP
            raise ValueError(
                f"token_mask shape {shape} does not match the tokens {tokens} seen at site '{probe.site.name}' "
                f"(tensor shape {tuple(t.shape)}); pass a mask of shape [batch, sequence] for this forward, "
                "or run this forward outside the token_mask context"
            )
        return state.index.get(t.device), state.keep.get(t.device)

    def warn_unobserved(self, stacklevel: int = 3) -> None:
        """Warn once per probe whose tensor did not require grad (its site cannot be scored)."""
        new = sorted(self.unobserved - self.warned)
        if not new:
            return
        self.warned |= set(new)
        names = [f"the {k.rsplit(':', 1)[1]}put of site '{k.rsplit(':', 1)[0]}'" for k in new]
        warnings.warn(
            f"apt_salience: {', '.join(names[:4])}{' and others' if len(names) > 4 else ''} does not require grad, so "
            "its gradient is never seen and the site is not scored (its salience stays 0). If the layers below it "
            "are frozen, call model.enable_input_require_grads() (Hugging Face) or make the embedding output require "
            "grad.",
            SalienceWarning,
            stacklevel=stacklevel,
        )

    # ------------------------------------------------------------------ gradient scaling

    def _scaler_scale(self, device: torch.device) -> Optional[Tensor]:
        """The GradScaler's current scale as a tensor (None without an enabled scaler).

        Reads the scaler's attributes rather than calling its methods, which ``torch.compile``
        does not trace: ``_scale`` once ``scaler.scale()`` has run, the initial scale before.
        """
        if not self.scaler_enabled:
            return None
        scale = getattr(self.scaler, "_scale", None)
        if scale is None:  # before the first scaler.scale(): the scaler would use its initial scale
            return torch.full((), self.scaler_init, dtype=torch.float32, device=device)
        return scale.to(device=device, dtype=torch.float32)

    def inv_scale(self, device: torch.device) -> Optional[Tensor]:
        scale = self._scaler_scale(device)
        return None if scale is None else scale.reciprocal()

    # ------------------------------------------------------------------ one forward of one probe

    def observe(self, probe: Probe, t: Any) -> Optional[Tensor]:
        """Observe ``t`` for ``probe``; returns the tensor to use instead of ``t`` (compiled graphs only)."""
        compiling = torch.compiler.is_compiling()
        if not self.attached or not isinstance(t, Tensor):
            return None
        if not torch.is_grad_enabled():
            if not compiling and self.mask is not None:
                self._note_checkpoint_first_pass()
            return None
        if self.paused or not self.sampling:
            return None
        if not t.requires_grad:
            if probe.key not in self.unobserved:
                self.unobserved.add(probe.key)
                if not compiling:  # a compiled graph warns at the next step() (a warning here would break it)
                    self.warn_unobserved(stacklevel=5)
            return None
        if t.shape[-1] != probe.channels:
            raise ValueError(
                f"site '{probe.site.name}' {probe.side}put has {t.shape[-1]} channels but the tracker expects "
                f"{probe.channels}; call tracker.refresh() after changing the model's shapes"
            )
        strict = True
        if compiling:
            masks: Any = self.mask
        else:
            masks = self._eager_masks()
            if masks is _SKIP:
                return None
            if isinstance(masks, tuple) and masks and masks[0] == "last":
                masks, strict = masks[1], False
        sel = self._mask_for(masks, probe, t, strict)
        if sel is _SKIP:
            return None
        index, keep = sel
        if compiling:
            self.maybe_pending = True  # the compiled backward cannot say so itself
            self.compiled_seen = True
            g = probe.group
            centre_set = g.centre_set[probe.mpos] if probe.order else None
            out, used = _ProbeFunction.apply(t, probe.sink_sum, probe.sink_mom, probe.centre if probe.order else None,
                                             centre_set, keep, self._scaler_scale(t.device), self.recipe.name, probe.order)
            if used is not None:
                probe.centre.copy_(used)
                g.centre_set[probe.mpos] = True
            return out
        centre = None
        if probe.order:
            centre = probe.centre
            if not probe.centre_ok:
                # the first eager forward of this probe: its mean becomes the centre, unless a compiled graph set
                # one already (decided on the device, no synchronisation)
                g = probe.group
                _, first = forward_part(RECIPES["taylor"], t.detach().reshape(-1, probe.channels),
                                        torch.zeros(probe.channels, dtype=torch.float64, device=t.device), 1, index=index)
                assert first is not None
                is_set = g.centre_set[probe.mpos]
                centre.copy_(torch.where(is_set, centre, (first[1] / first[0].clamp_min(1)).float()))
                g.centre_set[probe.mpos] = True
                probe.centre_ok = True
        with torch.no_grad():
            x2 = t.detach().reshape(-1, probe.channels)
            a, mom = forward_part(self.recipe, x2, centre.double() if centre is not None else None, probe.order,
                                  index=index)
        keep_x = x2 if self.recipe.keeps_activation else None  # a view of H, never a copy
        t.register_hook(_GradHook(self, probe, a, mom, keep_x, index))
        return None
