"""Retraining-free compression that keeps accuracy: layer-wise reconstruction after pruning.

:func:`reconstruct` takes a :class:`~apt_salience.selection.Selection` and a few calibration
batches, re-fits what is left of every head site (attention output projection) and neuron site
(FFN down projection) so that the site's output on the calibration tokens stays as close as
possible to the dense model's, and then prunes the model physically
(:func:`~apt_salience.pruning.prune_model`). It modifies the model in place.

For one site with weight ``W`` (``[d_out, d_in]``), bias ``b``, kept input channels ``S`` and
calibration tokens ``t`` (padding excluded):

* ``z_t = [x'_t[S], 1]``: the kept channels of the site's input *in the pruned model* (every site
  that runs before this one already pruned and re-fitted), plus a constant when the site has a
  bias;
* ``y*_t``: the target, by default (``target="dense"``) the dense model's output of this site for
  the same input tokens (the dense model's own input ``x_t``): ``y*_t = W x_t + b``;
* ``least_squares``: the new ``[W'_S, b']`` minimises
  ``sum_t ||y*_t - W'_S z_t - b'||^2 + lambda ||W'_S - W_S||^2`` (ridge towards the original
  weights, the bias is not damped), ``lambda = damping * mean(diag(sum_t x'_t[S] x'_t[S]^T))``;
  solved from the streamed ``G = sum_t z_t z_t^T`` and ``C = sum_t z_t y*_t^T`` in float64 on the
  site's device. State per site: ``(|S|+1)^2 + (|S|+1) d_out`` numbers; activations are never kept
  beyond the batch that produced them;
* ``bias``: only the bias moves, by the mean residual ``mean_t(y*_t - W_S x'_t[S] - b)`` (with
  ``target="pruned"`` this is ``W_{not S} mean_t x'_t[not S]``, FLAP's compensation). O(d) state.

Both never raise the site's squared error on the calibration tokens (the original weights are a
feasible point of each problem). Sites are processed in the order the model calls them, each on
the activations of the model pruned and re-fitted below it.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from apt_salience.reconstruct import reconstruct
    >>> from apt_salience.selection import BlockLayout, Selection
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> sel = Selection(torch.arange(8) % 4 != 0, torch.arange(128) % 2 == 0, None, 0., 1., 1.,
    ...                 BlockLayout.from_model(model))
    >>> g = torch.Generator().manual_seed(0)
    >>> batches = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g)} for _ in range(4)]
    >>> report = reconstruct(model, sel, batches)
    >>> model.encoder.layer[0].intermediate.dense.out_features, report.prune.heads_removed
    (32, 2)
    >>> all(s.error_after <= s.error_before for s in report.sites)
    True
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .architectures import ARCHITECTURES, detect_architecture, layout_sites, linear_dims, linear_weight
from .pruning import PruneReport, prune_model
from .selection import Selection

__all__ = ["reconstruct", "ReconstructReport", "SiteReconstruction", "ReconstructWarning", "METHODS", "TARGETS"]

logger = logging.getLogger("apt_salience")

#: What :func:`reconstruct` re-fits: the kept weights and the bias, or the bias only.
METHODS: Tuple[str, ...] = ("least_squares", "bias")
#: What the re-fitted site's output is made close to (see :func:`reconstruct`).
TARGETS: Tuple[str, ...] = ("dense", "pruned")

_Fit = Tuple[nn.Module, Tensor, Optional[Tensor]]  # (site module, new weight in its own layout, new bias)
TokenMaskArg = Union[None, str, Callable[[Mapping[str, Any]], Optional[Tensor]]]


class ReconstructWarning(UserWarning):
    """The fit is under-determined (fewer calibration tokens than kept channels) or otherwise weak."""


@dataclass(frozen=True)
class SiteReconstruction:
    """What :func:`reconstruct` did at one site, measured on the calibration tokens.

    ``error_before``: mean over tokens of ``||y* - y||^2`` with the original kept weights (plain
    pruning) on the pruned model's input; ``error_after``: the same with the re-fitted weights;
    ``target_energy``: mean ``||y*||^2`` (so ``error / target_energy`` is a relative error);
    ``name``, ``kind``: the site; ``channels`` / ``kept_channels``: its input channels before / after;
    ``tokens``: the calibration tokens it was fitted on.
    """

    name: str
    kind: str
    channels: int
    kept_channels: int
    tokens: int
    error_before: float
    error_after: float
    target_energy: float

    @property
    def relative_error_before(self) -> float:
        return self.error_before / self.target_energy if self.target_energy > 0 else 0.0

    @property
    def relative_error_after(self) -> float:
        return self.error_after / self.target_energy if self.target_energy > 0 else 0.0


@dataclass(frozen=True)
class ReconstructReport:
    """The result of :func:`reconstruct`: per-site errors, the pruning report, cost.

    ``sites`` in the order they were re-fitted (the order the model calls them); ``passes``: the
    (partial) forward passes run over the calibration batches; ``seconds``: wall time of the whole
    call, pruning included; ``method``, ``target``, ``damping``, ``batches``: the arguments it ran with;
    ``prune``: the :class:`~apt_salience.pruning.PruneReport` of the final physical pruning.
    """

    method: str
    target: str
    damping: float
    batches: int
    sites: Tuple[SiteReconstruction, ...]
    prune: PruneReport
    passes: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method, "target": self.target, "damping": self.damping, "batches": self.batches,
            "passes": self.passes, "seconds": self.seconds,
            "sites": [dict(vars(s)) for s in self.sites],
            "params_before": self.prune.params_before, "params_after": self.prune.params_after,
        }


# ---------------------------------------------------------------------------------------------
# Plan: which sites, which kept channels


@dataclass
class _Site:
    name: str  # name in the model
    kind: str
    module: nn.Module
    keep: Tensor  # long [k]: kept input channels
    d_in: int
    d_out: int
    decoder: bool
    weight: Tensor  # original [d_out, d_in], detached view
    bias: Optional[Tensor]
    device: torch.device


def _plan(model: nn.Module, selection: Selection) -> List[_Site]:
    if selection.hidden is not None and not bool(selection.hidden.all()):
        raise ValueError(
            f"selection prunes {int((~selection.hidden.bool()).sum())} hidden dimension(s); reconstruct re-fits heads and "
            "neurons for every output channel and does not support hidden-dimension pruning: select with "
            "kinds=('head', 'neuron')"
        )
    arch = detect_architecture(model) or selection.layout.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"reconstruct ends with prune_model, which needs a model of a preset architecture ({', '.join(ARCHITECTURES)}); "
            f"this model is {arch!r}"
        )
    modules = dict(model.named_modules())
    out: List[_Site] = []
    masks = {kind: selection.site_masks(kind) for kind in ("head", "neuron")}
    for kind, name, real, mod, _, bs in layout_sites(modules, selection.layout, "selection"):
        if hasattr(mod, "base_layer"):
            raise ValueError(
                f"selection: site '{real}' is a PEFT LoRA layer; reconstruct and prune_model need plain layers: "
                "call model.merge_and_unload() first"
            )
        d_in, d_out = linear_dims(mod) or (0, 0)  # layout_sites checked the shapes
        w = linear_weight(mod).detach()
        b = getattr(mod, "bias", None)
        b = b.detach() if isinstance(b, Tensor) else None
        ch = masks[kind][name].bool().cpu().repeat_interleave(bs).nonzero().squeeze(1)
        out.append(_Site(real, kind, mod, ch.to(w.device), d_in, d_out, "decoder" in real.split("."), w, b, w.device))
    if not out:
        raise ValueError("selection has no head or neuron sites; nothing to reconstruct")
    return out


# ---------------------------------------------------------------------------------------------
# Calibration batches and token masks


def _check_batches(batches: Any) -> List[Mapping[str, Any]]:
    if isinstance(batches, Mapping) or isinstance(batches, Tensor) or batches is None:
        raise TypeError(
            f"batches must be a sequence of dicts (keyword arguments of model(**batch)), got {type(batches).__name__}; "
            "wrap a single batch in a list"
        )
    try:
        out = list(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of dicts, got {type(batches).__name__}") from None
    if not out:
        raise ValueError("batches is empty: give at least one calibration batch (a dict for model(**batch))")
    for i, b in enumerate(out):
        if not isinstance(b, Mapping):
            raise TypeError(f"batches[{i}] must be a dict of model inputs, got {type(b).__name__}")
        if not b:
            raise ValueError(f"batches[{i}] is an empty dict; it must hold the model inputs (e.g. input_ids)")
    return out


def _batch_masks(batch: Mapping[str, Any], i: int, token_mask: TokenMaskArg) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(main mask, decoder mask) as bool tensors, or None for 'every token'."""
    main: Any
    if token_mask is None:
        main = None
    elif isinstance(token_mask, str):
        if token_mask in batch:
            main = batch[token_mask]
        elif token_mask == "attention_mask":
            main = None
        else:
            raise ValueError(f"token_mask={token_mask!r}: batches[{i}] has no such field (fields: {sorted(batch)})")
    elif callable(token_mask):
        main = token_mask(batch)
    else:
        raise TypeError(
            f"token_mask must be None, a batch field name or a callable(batch) -> mask, got {type(token_mask).__name__}"
        )
    dec = batch.get("decoder_attention_mask")
    res: List[Optional[Tensor]] = []
    for what, m in (("token mask", main), ("decoder_attention_mask", dec)):
        if m is None:
            res.append(None)
            continue
        if not isinstance(m, Tensor) or m.dim() == 0:
            raise ValueError(f"the {what} of batches[{i}] must be a [batch, sequence] tensor, got {type(m).__name__}")
        res.append(m.detach() if m.dtype == torch.bool else m.detach() != 0)
    return res[0], res[1]


def _tokens(t: Tensor, mask: Optional[Tensor], site: str, batch: int, decoder: bool = False) -> Tensor:
    """The site tensor's kept token rows, ``[n, channels]``."""
    x = t.detach().reshape(-1, t.shape[-1])
    if mask is None:
        return x
    lead = tuple(t.shape[:-1])
    if lead == tuple(mask.shape) or (len(lead) == 1 and lead[0] == mask.numel()):
        return x[mask.reshape(-1).to(x.device)]
    if len(mask.shape) > 1 and lead == tuple(mask.shape[:1]):
        return x  # pooled, per-sequence tensor: no padding in it
    fix = ("add the decoder's mask to the batch as 'decoder_attention_mask' (e.g. labels != -100)" if decoder else
           "give a [batch, sequence] mask matching the model's tokens (token_mask=) or token_mask=None")
    raise ValueError(
        f"token mask of batches[{batch}] has shape {tuple(mask.shape)} but site '{site}' sees tokens of shape {lead}; {fix}"
    )


# ---------------------------------------------------------------------------------------------
# Passes over the model


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the site of interest has been read."""


def _first_tensor(args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Optional[Tensor]:
    for a in args:
        if isinstance(a, Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, Tensor):
            return a
    return None


class _Hooks:
    """Owns every hook handle of one pass; removed in ``finally`` (idempotent)."""

    def __init__(self) -> None:
        self.handles: List[Any] = []

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def _call(model: nn.Module, batch: Mapping[str, Any]) -> bool:
    """Run the model; True when a capture hook stopped it."""
    try:
        model(**batch)
    except _Stop:
        return True
    return False


def _weight_param(module: nn.Module) -> Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def _param_layout(module: nn.Module, w: Tensor) -> Tensor:
    """``w`` ([out, in]) in the layout of the module's own weight (transformers' Conv1D stores [in, out])."""
    return w.t().contiguous() if type(module).__name__ == "Conv1D" else w


@contextlib.contextmanager
def _fitted(fits: Mapping[str, "_Fit"]) -> Iterator[None]:
    """Inside the block the fitted sites compute with their new weights; the old tensors are put back in ``finally``."""
    swapped: List[Tuple[Tensor, Tensor]] = []
    try:
        for mod, w, b in fits.values():
            for p, new in ((_weight_param(mod), w), (getattr(mod, "bias", None), b)):
                if new is not None and isinstance(p, Tensor):
                    swapped.append((p, p.data))
                    p.data = new
        yield
    finally:
        for p, old in reversed(swapped):
            p.data = old


def _execution_order(model: nn.Module, sites: List[_Site], batch: Mapping[str, Any]) -> List[_Site]:
    calls: List[str] = []
    hooks = _Hooks()
    try:
        for s in sites:
            hooks.handles.append(s.module.register_forward_pre_hook(lambda m, a, n=s.name: calls.append(n)))
        model(**batch)
    finally:
        hooks.remove()
    by_name = {s.name: s for s in sites}
    for s in sites:
        c = calls.count(s.name)
        if c != 1:
            raise ValueError(
                f"site '{s.name}' is called {c} times by one forward of batches[0]; reconstruct needs every head and "
                "neuron site called exactly once per forward (shared or unused layers are not supported)"
            )
    return [by_name[n] for n in calls]


# ---------------------------------------------------------------------------------------------
# Per-site accumulation and solve


class _LeastSquares:
    """Streams ``G = sum z z^T``, ``C = sum z y^T``, ``sum ||y||^2`` in float64 on the site's device."""

    def __init__(self, site: _Site):
        k = site.keep.numel() + (site.bias is not None)
        self.site = site
        self.G = torch.zeros(k, k, dtype=torch.float64, device=site.device)
        self.C = torch.zeros(k, site.d_out, dtype=torch.float64, device=site.device)
        self.yy = torch.zeros((), dtype=torch.float64, device=site.device)
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        z = x.to(self.site.device, torch.float64).index_select(1, self.site.keep)
        if self.site.bias is not None:
            z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], 1)
        y = y.to(self.site.device, torch.float64)
        self.G.addmm_(z.t(), z)
        self.C.addmm_(z.t(), y)
        self.yy += (y * y).sum()
        self.n += z.shape[0]

    def _sse(self, wa: Tensor) -> float:
        # sum_t ||y_t - wa z_t||^2 = sum ||y||^2 - 2 tr(wa C) + tr(wa G wa^T)
        return max(0.0, float(self.yy - 2 * (wa * self.C.t()).sum() + ((wa @ self.G) * wa).sum()))

    def solve(self, damping: float) -> Tuple[Tensor, Optional[Tensor], float, float]:
        s = self.site
        k = s.keep.numel()
        w0 = s.weight.to(torch.float64).index_select(1, s.keep)
        wa0 = torch.cat([w0, s.bias.to(torch.float64)[:, None]], 1) if s.bias is not None else w0
        before = self._sse(wa0)
        R = self.C - self.G @ wa0.t()  # (G + L) delta = R  <=>  (G + L) wa^T = C + L wa0^T
        lam = damping * float(self.G.diagonal()[:k].mean()) if k else 0.0
        if lam > 0:
            A = self.G.clone()
            A.diagonal()[:k] += lam
            L, info = torch.linalg.cholesky_ex(A)
            delta = torch.cholesky_solve(R, L) if int(info) == 0 else torch.linalg.pinv(A, hermitian=True) @ R
        else:  # the minimiser closest to the original weights
            delta = torch.linalg.pinv(self.G, hermitian=True) @ R
        wa = wa0 + delta.t()
        after = self._sse(wa)
        if not bool(torch.isfinite(wa).all()):
            raise ValueError(f"the least-squares solution of site '{s.name}' is not finite; increase damping")
        if after > before:  # rounding only (the original weights are feasible): keep them
            wa, after = wa0, before
        w_new = torch.zeros(s.d_out, s.d_in, dtype=torch.float64, device=s.device)
        w_new[:, s.keep] = wa[:, :k]
        b_new = wa[:, k] if s.bias is not None else None
        return w_new, b_new, before, after


class _BiasShift:
    """Streams ``sum x'[S]``, ``sum y*`` and the plain-pruning squared error (O(d) state)."""

    def __init__(self, site: _Site):
        self.site = site
        self.w0 = site.weight.to(torch.float64).index_select(1, site.keep)
        self.b0 = site.bias.to(torch.float64) if site.bias is not None else None
        self.sr = torch.zeros(site.d_out, dtype=torch.float64, device=site.device)
        self.sse = torch.zeros((), dtype=torch.float64, device=site.device)
        self.yy = torch.zeros((), dtype=torch.float64, device=site.device)
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        z = x.to(self.site.device, torch.float64).index_select(1, self.site.keep)
        y = y.to(self.site.device, torch.float64)
        r = y - z @ self.w0.t()
        if self.b0 is not None:
            r -= self.b0
        self.sr += r.sum(0)
        self.sse += (r * r).sum()
        self.yy += (y * y).sum()
        self.n += z.shape[0]

    def solve(self, damping: float) -> Tuple[Tensor, Optional[Tensor], float, float]:
        s = self.site
        assert self.b0 is not None
        shift = self.sr / max(self.n, 1)
        before = float(self.sse)
        after = max(0.0, before - self.n * float((shift * shift).sum()))
        w_new = torch.zeros(s.d_out, s.d_in, dtype=torch.float64, device=s.device)
        w_new[:, s.keep] = self.w0
        return w_new, self.b0 + shift, before, after


# ---------------------------------------------------------------------------------------------


def _check_finite(t: Tensor, what: str, site: str, batch: int) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"non-finite values (NaN/inf) in the {what} of site '{site}' on batches[{batch}]; check the calibration "
            "batches and the model (fp16 overflow?). The model was not changed"
        )


def reconstruct(
    model: nn.Module,
    selection: Selection,
    batches: Iterable[Mapping[str, Any]],
    *,
    method: str = "least_squares",
    damping: float = 0.01,
    target: str = "dense",
    token_mask: TokenMaskArg = "attention_mask",
) -> ReconstructReport:
    """Re-fit the kept weights of every head and neuron site on calibration batches, then prune; in place.

    This function modifies the model in place: the sites' kept weights (and biases) are replaced by
    their re-fit, then :func:`~apt_salience.pruning.prune_model` removes what ``selection`` drops.
    On any error nothing is changed (every check and every fit happens before the first write).

    Sites are re-fitted one after the other in the order the model calls them; each site's inputs
    are the *pruned* model's activations (every site called before it already pruned and
    re-fitted), so the fit also absorbs the error the layers below left. The target is the dense
    model's output of the site on its dense input (``target="dense"``, default), or the site's own
    unpruned output on the pruned model's input (``target="pruned"``: removes only this site's
    pruning error, and sites that keep all their blocks are left alone).

    Args:
        model: the dense model ``selection`` was made from (a Hugging Face model of a preset
            :func:`~apt_salience.pruning.prune_model` supports). Run in eval mode without gradients;
            its training flag is restored.
        selection: what to keep (:func:`~apt_salience.selection.select_blocks` with
            ``kinds=("head", "neuron")``, or built by hand).
        batches: a few calibration batches, each a dict for ``model(**batch)`` on the model's device
            (labels are allowed and ignored; an iterator is read once into a list). Each site runs
            two forward passes per batch, stopped at the site (one with ``target="pruned"``), plus one
            full pass of ``batches[0]`` to find the order the sites are called in.
        method: ``"least_squares"`` (kept columns and bias re-fitted) or ``"bias"`` (bias only; needs
            sites with a bias, e.g. BERT; LLaMA-family sites have none).
        damping: ``>= 0``; the ridge ``damping * mean(diag(X_S^T X_S))`` pulls the least-squares fit
            towards the original weights (0: the exact least-squares minimiser closest to them).
        target: ``"dense"`` or ``"pruned"`` (see above).
        token_mask: which tokens count: ``"attention_mask"`` (default: the batch's ``attention_mask``
            where it has one, every token otherwise), another batch field name (required in every
            batch), a callable ``batch -> [batch, sequence] mask`` (0/False = padding) or None
            (every token). Sites under a module named ``decoder`` use the batch's
            ``decoder_attention_mask`` when present.

    Returns:
        a :class:`ReconstructReport` (per-site errors before / after on the calibration tokens, the
        :class:`~apt_salience.pruning.PruneReport`, passes and seconds).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from apt_salience import BlockLayout, Selection, reconstruct
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...     num_key_value_heads=2, intermediate_size=16, vocab_size=50)).eval()
        >>> sel = Selection(torch.tensor([True, True, False, True]), torch.arange(16) < 10, None, 0., 1., 1.,
        ...                 BlockLayout.from_model(model))
        >>> ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
        >>> r = reconstruct(model, sel, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
        >>> [s.kind for s in r.sites], model.model.layers[0].mlp.down_proj.in_features
        (['head', 'neuron'], 10)
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be an apt_salience Selection, got {type(selection).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if not (token_mask is None or isinstance(token_mask, str) or callable(token_mask)):
        raise TypeError(
            f"token_mask must be None, a batch field name or a callable(batch) -> mask, got {type(token_mask).__name__}"
        )
    data = _check_batches(batches)
    sites = _plan(model, selection)
    if method == "bias":
        no_bias = [s.name for s in sites if s.bias is None]
        if no_bias:
            raise ValueError(
                f"method='bias' needs a bias at every site; {len(no_bias)} site(s) have none (e.g. '{no_bias[0]}'). "
                "Use method='least_squares'"
            )
    masks = [_batch_masks(b, i, token_mask) for i, b in enumerate(data)]

    was_training = model.training
    model.eval()
    fits: Dict[str, _Fit] = {}  # site name -> (module, new weight, new bias) in the parameters' layout and dtype
    records: List[SiteReconstruction] = []
    passes = 1
    try:
        with torch.no_grad():
            order = _execution_order(model, sites, data[0])
            for site in order:
                if target == "pruned" and site.keep.numel() == site.d_in:
                    continue  # nothing pruned here and the target is this site's own output: unchanged
                acc: Union[_LeastSquares, _BiasShift] = _LeastSquares(site) if method == "least_squares" else _BiasShift(site)
                for j, batch in enumerate(data):
                    mask = masks[j][1] if site.decoder and masks[j][1] is not None else masks[j][0]
                    got: Dict[str, Tensor] = {}
                    if target == "dense":
                        passes += 1
                        _capture(model, site, batch, j, got, output=True)
                    passes += 1
                    with _fitted(fits):
                        _capture(model, site, batch, j, got, output=target == "pruned", inputs=True)
                    x = _tokens(got["input"], mask, site.name, j, site.decoder)
                    y = _tokens(got["output"], mask, site.name, j, site.decoder)
                    if x.shape[0] != y.shape[0]:
                        raise ValueError(f"site '{site.name}': input and target token counts differ on batches[{j}]")
                    _check_finite(x, "input", site.name, j)
                    _check_finite(y, "output", site.name, j)
                    acc.add(x, y)
                if acc.n == 0:
                    raise ValueError(
                        f"no calibration tokens reach site '{site.name}' (the token mask excludes every token)"
                    )
                if method == "least_squares" and acc.n < site.keep.numel() + 1 and damping == 0:
                    warnings.warn(
                        f"apt_salience.reconstruct: site '{site.name}' has {acc.n} calibration tokens for "
                        f"{site.keep.numel()} kept channels; the fit is under-determined. Use more batches or damping > 0",
                        ReconstructWarning,
                        stacklevel=2,
                    )
                w_new, b_new, before, after = acc.solve(float(damping))
                dt = site.weight.dtype
                fits[site.name] = (site.module, _param_layout(site.module, w_new.to(dt)),
                                   None if b_new is None else b_new.to(dt))
                n = acc.n
                records.append(SiteReconstruction(site.name, site.kind, site.d_in, int(site.keep.numel()), n,
                                                  before / n, after / n, float(acc.yy) / n))
                logger.info("apt_salience.reconstruct: %s (%s, %d/%d kept, %d tokens): error %.4g -> %.4g",
                            site.name, site.kind, site.keep.numel(), site.d_in, n, before / n, after / n)
                del acc
    finally:
        model.train(was_training)

    report = _commit(model, selection, sites, fits)
    return ReconstructReport(method, target, float(damping), len(data), tuple(records), report, passes,
                             time.perf_counter() - t0)


def _capture(model: nn.Module, site: _Site, batch: Mapping[str, Any], j: int, got: Dict[str, Tensor], *,
             output: bool, inputs: bool = False) -> None:
    """One forward pass, stopped at ``site``: read its input and/or output."""
    hooks = _Hooks()

    def pre(module: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        x = _first_tensor(args, kwargs)
        if x is None:
            raise ValueError(f"site '{site.name}' was called without a tensor input")
        got["input"] = x
        if not output:
            raise _Stop

    def post(module: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> None:
        y = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(y, Tensor):
            raise ValueError(f"site '{site.name}' returned a {type(y).__name__}, not a tensor")
        got["output"] = y
        raise _Stop

    try:
        if inputs:
            hooks.handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        if output:
            hooks.handles.append(site.module.register_forward_hook(post, with_kwargs=True))
        if not _call(model, batch):
            raise ValueError(f"site '{site.name}' was not called by the model's forward on batches[{j}]")
    finally:
        hooks.remove()


def _commit(model: nn.Module, selection: Selection, sites: List[_Site],
            fits: Mapping[str, _Fit]) -> PruneReport:
    """Write the fits into the (dense) modules, then prune; on an error before pruning starts, restore."""
    saved: List[Tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for s in sites:
                if s.name not in fits:
                    continue
                _, w, b = fits[s.name]
                dst = _weight_param(s.module)
                saved.append((dst, dst.detach().clone()))
                dst.copy_(w)
                if b is not None:
                    bias = getattr(s.module, "bias")
                    saved.append((bias, bias.detach().clone()))
                    bias.copy_(b)
        return prune_model(model, selection)
    except BaseException:
        with torch.no_grad():
            for dst, old in reversed(saved):
                if dst.shape == old.shape:
                    dst.copy_(old)
        raise
