"""Adaptive LoRA ranks (APT's tuner): :class:`AdaptiveTuner`, adapter importance, the growth rule, growing layers.

* Adapter importance: the sum of the per-rank salience of the ``adapter`` kind over the ranks
  of one LoRA layer (:func:`adapter_importance`, :func:`rank_adapters`).
* Growth rule (APT Section 4.3): when the tuning budget goes from ``Delta_t`` to ``Delta_t'``, the
  most important half of the adapters get ``r' = floor(r * Delta_t' / Delta_t)`` (:func:`grown_rank`,
  :func:`plan_rank_growth`). ``r'`` scales a layer's LoRA parameters by at most ``Delta_t' / Delta_t``,
  so growing any subset of the adapters this way never takes the total past ``Delta_t'``.
* :func:`grow_lora_rank` appends ``N(0, sigma^2)`` rows to ``lora_A`` and zero columns to
  ``lora_B``: the layer computes exactly what it computed before. The scaling is kept (``lora_alpha``
  is adjusted so that ``alpha / r`` stays the same). The grown weights are new Parameters.
* :class:`AdaptiveTuner` does all of it in the training loop: at its growth steps (spread evenly
  over the early, pruning stage of training) the tuning budget rises linearly to its final value,
  the top-salient adapters grow, the given optimizer takes the new Parameters in place of the old
  ones (their optimizer state kept, zero-padded), and the tracker is refreshed.

Example:
    >>> from apt_salience.tuning import grown_rank
    >>> grown_rank(8, new_budget=30, old_budget=20)
    12
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .scores import BlockScores, SalienceScores

__all__ = [
    "AdaptiveTuner",
    "TUNER_STATE_VERSION",
    "lora_parameter_count",
    "replace_parameters",
    "adapter_importance",
    "rank_adapters",
    "grown_rank",
    "plan_rank_growth",
    "grow_lora_rank",
    "apply_rank_plan",
    "lora_ranks",
    "rebuild_optimizer",
]


def _layer_name(site: str) -> Tuple[str, str]:
    """``a.b.lora_B.default`` -> (``a.b``, ``default``)."""
    if ".lora_B." not in site:
        return site, "default"
    layer, adapter = site.rsplit(".lora_B.", 1)
    return layer, adapter


def _adapter_scores(scores: SalienceScores) -> BlockScores:
    if not isinstance(scores, SalienceScores):
        raise TypeError(f"scores must be an apt_salience SalienceScores, got {type(scores).__name__}")
    if scores.adapter is None:
        raise ValueError(
            "the scores have no adapter kind: attach the tracker to a model with LoRA adapters (PEFT lora_B layers, "
            "or set sites.adapters in the config)"
        )
    return scores.adapter


def adapter_importance(scores: SalienceScores, score: str = "salience") -> Dict[str, float]:
    """``{LoRA layer name: sum over its ranks of the adapter score}``, in model order.

    Args:
        scores: a reading with the ``adapter`` kind.
        score: the summed field (``salience``, ``outlier_aware``, ``density``, ``kurtosis``).

    Example:
        >>> import torch
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.tensor([1., 2., 5.]), kurtosis=torch.zeros(3),
        ...     outlier_aware=torch.tensor([1., 2., 5.]), param_count=torch.ones(3),
        ...     sites=[("m.q.lora_B.default", 2), ("m.v.lora_B.default", 1)])
        >>> adapter_importance(SalienceScores(step=1, adapter=b))
        {'m.q': 3.0, 'm.v': 5.0}
    """
    b = _adapter_scores(scores)
    if score not in ("salience", "outlier_aware", "density", "kurtosis"):
        raise ValueError(f"score must be one of salience, outlier_aware, density, kurtosis; got {score!r}")
    return {_layer_name(site)[0]: total for site, total in b.site_totals(score).items()}


def rank_adapters(scores: SalienceScores, score: str = "salience") -> List[Tuple[str, float]]:
    """Adapters sorted by importance, most important first (ties in model order).

    Args:
        scores: a reading with the ``adapter`` kind.
        score: the summed field.
    """
    imp = adapter_importance(scores, score)
    order = sorted(range(len(imp)), key=lambda i: -list(imp.values())[i])
    items = list(imp.items())
    return [items[i] for i in order]


def grown_rank(rank: int, new_budget: float, old_budget: float) -> int:
    """APT's growth rule ``r' = floor(r * Delta_t' / Delta_t)`` (never below ``rank``).

    Args:
        rank: ``r``, the current rank.
        new_budget: ``Delta_t'``.
        old_budget: ``Delta_t`` (> 0).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    for name, v in (("new_budget", new_budget), ("old_budget", old_budget)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    return max(rank, int(math.floor(rank * float(new_budget) / float(old_budget) + 1e-9)))


def plan_rank_growth(
    scores: SalienceScores,
    new_budget: float,
    old_budget: float,
    *,
    ranks: Optional[Mapping[str, int]] = None,
    fraction: float = 0.5,
    score: str = "salience",
) -> Dict[str, int]:
    """New rank of every adapter: the top ``fraction`` (by importance) grow by :func:`grown_rank`, the rest stay.

    ``ranks`` defaults to the ranks the scores saw (blocks per adapter site). The number that
    grows is ``max(1, floor(n * fraction))``.

    Args:
        scores: a reading with the ``adapter`` kind.
        new_budget: ``Delta_t'``.
        old_budget: ``Delta_t``.
        ranks: ``{LoRA layer: current rank}``; default: the blocks per adapter site in the scores.
        fraction: the share of adapters that grow, in (0, 1].
        score: the field summed into each adapter's importance.

    Example:
        >>> import torch
        >>> from apt_salience.scores import BlockScores, SalienceScores
        >>> b = BlockScores.build(salience=torch.tensor([1., 1., 9., 9., 0., 0., 3., 3.]), kurtosis=torch.zeros(8),
        ...     outlier_aware=torch.zeros(8), param_count=torch.ones(8),
        ...     sites=[(f"m.{n}.lora_B.default", 2) for n in "abcd"])
        >>> plan_rank_growth(SalienceScores(step=1, adapter=b), new_budget=3, old_budget=2)
        {'m.a': 2, 'm.b': 3, 'm.c': 2, 'm.d': 3}
    """
    b = _adapter_scores(scores)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    current = {_layer_name(site)[0]: n for site, n in b.sites}
    if ranks is not None:
        unknown = [k for k in ranks if k not in current]
        if unknown:
            raise ValueError(f"ranks names adapters the scores do not have: {unknown[:3]} (known: {list(current)[:3]} ...)")
        current.update({k: int(v) for k, v in ranks.items()})
    ordered = rank_adapters(scores, score)
    n_grow = max(1, int(math.floor(len(ordered) * fraction + 1e-9)))
    grow = {name for name, _ in ordered[:n_grow]}
    return {name: grown_rank(r, new_budget, old_budget) if name in grow else r for name, r in current.items()}


def _lora_parts(layer: nn.Module, adapter_name: str) -> Tuple[nn.Linear, nn.Linear]:
    la, lb = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not isinstance(la, nn.ModuleDict) or not isinstance(lb, nn.ModuleDict):
        raise TypeError(f"layer must be a PEFT LoRA layer (with lora_A / lora_B ModuleDicts), got {type(layer).__name__}")
    if adapter_name not in la:
        raise ValueError(f"layer has no adapter {adapter_name!r} (adapters: {list(la.keys())})")
    a, b = la[adapter_name], lb[adapter_name]
    if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        raise TypeError(f"grow_lora_rank supports Linear LoRA adapters; got {type(a).__name__} / {type(b).__name__}")
    dora = getattr(layer, "use_dora", {})
    if isinstance(dora, dict) and dora.get(adapter_name):
        raise ValueError("grow_lora_rank does not support DoRA adapters")
    return a, b


def lora_ranks(model: nn.Module, adapter_name: str = "default") -> Dict[str, int]:
    """``{LoRA layer name: current rank}`` of every PEFT LoRA layer holding ``adapter_name``.

    Args:
        model: a PEFT LoRA model.
        adapter_name: the PEFT adapter.
    """
    out: Dict[str, int] = {}
    for name, m in model.named_modules():
        la = getattr(m, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and adapter_name in la:
            a = la[adapter_name]
            if isinstance(a, nn.Linear):
                out[name] = int(a.out_features)
    return out


def grow_lora_rank(
    layer: nn.Module,
    new_rank: int,
    *,
    adapter_name: str = "default",
    std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Grow a PEFT LoRA layer's rank to ``new_rank`` without changing its output; modifies the layer in place.

    New rows of ``lora_A`` are drawn from ``N(0, std^2)`` (``std`` defaults to the standard
    deviation of the current ``lora_A`` weights, or ``1/sqrt(in_features)`` if that is 0); new
    columns of ``lora_B`` are zero. ``r`` is updated and ``lora_alpha`` rescaled so that the
    scaling stays what it was. The weights become new Parameters: rebuild the optimizer.

    Args:
        layer: a PEFT LoRA layer (modified in place).
        new_rank: the rank to grow to (>= the current one).
        adapter_name: the PEFT adapter.
        std: the standard deviation of the new ``lora_A`` rows (default: see above).
        generator: the random generator of the new rows.

    Example:
        >>> import torch, peft
        >>> from torch import nn
        >>> from apt_salience.tuning import grow_lora_rank
        >>> net = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5)), peft.LoraConfig(r=2, target_modules=["0"],
        ...                           init_lora_weights=False))
        >>> x = torch.randn(3, 6); before = net(x)
        >>> grow_lora_rank(net.base_model.model[0], 5)
        >>> net.base_model.model[0].lora_A["default"].weight.shape, torch.allclose(net(x), before, atol=1e-6)
        (torch.Size([5, 6]), True)
    """
    a, b = _lora_parts(layer, adapter_name)
    r = int(a.out_features)
    if isinstance(new_rank, bool) or not isinstance(new_rank, int) or new_rank < r:
        raise ValueError(f"new_rank must be an int >= the current rank {r}, got {new_rank!r}")
    if new_rank == r:
        return
    if std is None:
        s = float(a.weight.detach().float().std()) if a.weight.numel() > 1 else 0.0
        std = s if s > 0 and math.isfinite(s) else 1.0 / math.sqrt(a.in_features)
    elif isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
        raise ValueError(f"std must be a number >= 0, got {std!r}")
    extra = new_rank - r
    with torch.no_grad():
        wa = a.weight.detach()
        rows = torch.randn(extra, a.in_features, generator=generator, dtype=torch.float32) * std
        new_a = torch.cat([wa, rows.to(device=wa.device, dtype=wa.dtype)], 0)
        wb = b.weight.detach()
        new_b = torch.cat([wb, torch.zeros(b.out_features, extra, device=wb.device, dtype=wb.dtype)], 1)
    a.weight = nn.Parameter(new_a, requires_grad=a.weight.requires_grad)
    b.weight = nn.Parameter(new_b, requires_grad=b.weight.requires_grad)
    a.out_features = new_rank
    b.in_features = new_rank
    r_dict = getattr(layer, "r", None)
    if isinstance(r_dict, dict):
        r_dict[adapter_name] = new_rank
    scaling = getattr(layer, "scaling", None)
    alpha = getattr(layer, "lora_alpha", None)
    if isinstance(scaling, dict) and isinstance(alpha, dict) and adapter_name in scaling:
        rs = getattr(layer, "use_rslora", {})
        denom = math.sqrt(new_rank) if isinstance(rs, dict) and rs.get(adapter_name) else new_rank
        alpha[adapter_name] = scaling[adapter_name] * denom


def apply_rank_plan(model: nn.Module, plan: Mapping[str, int], *, adapter_name: str = "default",
                    std: Optional[float] = None, generator: Optional[torch.Generator] = None) -> List[str]:
    """Grow every LoRA layer named in ``plan`` to its planned rank; returns the names that grew.

    Modifies the model in place.

    Args:
        model: a PEFT LoRA model (modified in place).
        plan: ``{LoRA layer name: new rank}`` (:func:`plan_rank_growth`).
        adapter_name: the PEFT adapter.
        std: the standard deviation of the new ``lora_A`` rows (default: each layer's own).
        generator: the random generator of the new rows.
    """
    from .masks import resolve_module

    modules = dict(model.named_modules())
    grown: List[str] = []
    todo = []
    for name, rank in plan.items():
        real, layer = resolve_module(modules, name)
        a, _ = _lora_parts(layer, adapter_name)
        if rank < a.out_features:
            raise ValueError(f"plan shrinks '{real}' from rank {a.out_features} to {rank}; only growth is supported")
        todo.append((real, layer, rank, a.out_features))
    for real, layer, rank, r in todo:
        if rank > r:
            grow_lora_rank(layer, int(rank), adapter_name=adapter_name, std=std, generator=generator)
            grown.append(real)
    return grown


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyper-parameters over ``model``'s trainable parameters.

    Each old parameter group keeps its settings and those of its parameters that are still in the
    model (with their optimizer state); trainable parameters it did not know (grown or pruned
    weights) join the first group with fresh state.

    Args:
        optimizer: the optimizer to rebuild (not modified).
        model: the model whose trainable parameters the new optimizer holds.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    live = [p for p in model.parameters() if p.requires_grad]
    live_ids = {id(p) for p in live}
    known: set = set()
    groups: List[Dict[str, Any]] = []
    for g in optimizer.param_groups:
        params = [p for p in g["params"] if id(p) in live_ids]
        known.update(id(p) for p in params)
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    new = [p for p in live if id(p) not in known]
    if groups:
        groups[0]["params"] = groups[0]["params"] + new
    groups = [g for g in groups if g["params"]]
    # every group carries all its hyper-parameters; lr is passed for optimizers that require it
    extra = {"lr": optimizer.defaults["lr"]} if "lr" in optimizer.defaults else {}
    opt = type(optimizer)(groups, **extra)
    for g in groups:
        for p in g["params"]:
            if p in optimizer.state:
                opt.state[p] = optimizer.state[p]
    return opt


# ---------------------------------------------------------------------------------------------
# Optimizer surgery


def replace_parameters(optimizer: torch.optim.Optimizer, replacements: Mapping[Tensor, Tensor]) -> int:
    """Put each new Parameter in the place of the old one in ``optimizer``'s param groups, keeping its state.

    State tensors of the old parameter's shape are zero-padded to the new shape (the old values stay
    in the leading corner, where :func:`grow_lora_rank` keeps the old weights); scalars (Adam's
    ``step``) are kept. A parameter whose state has other tensors (a factored optimizer) starts with
    fresh state, with a warning. Modifies the optimizer in place; returns how many parameters were
    replaced (old parameters the optimizer does not hold are skipped).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (also a wrapper that forwards ``param_groups`` / ``state``).
        replacements: ``{old Parameter: new Parameter}``; each new one at least as large in every dimension.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> old = nn.Parameter(torch.ones(2, 3)); opt = torch.optim.Adam([old])
        >>> old.grad = torch.ones(2, 3); opt.step()
        >>> new = nn.Parameter(torch.zeros(4, 3))
        >>> replace_parameters(opt, {old: new}), opt.param_groups[0]["params"][0] is new
        (1, True)
        >>> opt.state[new]["exp_avg"][:, 0].tolist()
        [0.10000000149011612, 0.10000000149011612, 0.0, 0.0]
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for old, new in replacements.items():
        if old.dim() != new.dim() or any(a > b for a, b in zip(old.shape, new.shape)):
            raise ValueError(f"cannot replace a parameter of shape {tuple(old.shape)} by one of shape {tuple(new.shape)}")
    done = 0
    by_id = {id(o): (o, n) for o, n in replacements.items()}
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if id(p) not in by_id:
                continue
            old, new = by_id[id(p)]
            params[i] = new
            done += 1
            st = optimizer.state.pop(old, None)
            if not st:
                continue
            moved: Dict[str, Any] = {}
            fresh = False
            for k, v in st.items():
                if isinstance(v, Tensor) and v.dim() > 0:
                    if tuple(v.shape) != tuple(old.shape):
                        fresh = True
                        break
                    pad = torch.zeros(new.shape, dtype=v.dtype, device=v.device)
                    pad[tuple(slice(0, n) for n in old.shape)] = v
                    moved[k] = pad
                else:
                    moved[k] = v.clone() if isinstance(v, Tensor) else v
            if fresh:
                warnings.warn(f"apt_salience: the optimizer state of a grown parameter (shape {tuple(old.shape)}) has "
                              "tensors of other shapes; that parameter starts with fresh optimizer state",
                              UserWarning, stacklevel=2)
            else:
                optimizer.state[new] = moved
    return done


def lora_parameter_count(model: nn.Module, adapter_name: str = "default") -> int:
    """Number of LoRA weights (``lora_A`` + ``lora_B`` of ``adapter_name``) in ``model``, from the current shapes.

    Args:
        model: a PEFT LoRA model.
        adapter_name: the PEFT adapter counted.
    """
    total = 0
    for m in model.modules():
        la, lb = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if isinstance(la, nn.ModuleDict) and isinstance(lb, nn.ModuleDict) and adapter_name in la:
            a, b = la[adapter_name], lb[adapter_name]
            if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
                total += int(a.weight.numel()) + int(b.weight.numel())
    return total


def _lora_layers(model: nn.Module, adapter_name: str) -> Dict[str, nn.Module]:
    out: Dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        la = getattr(m, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and adapter_name in la and isinstance(la[adapter_name], nn.Linear):
            out[name] = m
    return out


TUNER_STATE_VERSION = 1


class AdaptiveTuner:
    """APT's adaptive tuner: grows the ranks of the most salient LoRA adapters during the early stage of training.

    Call :meth:`step` once per optimizer step, after ``tracker.step()`` (and ``pruner.step()``).

    Growth steps (our reading of APT, which adds tuning parameters early in fine-tuning, while it
    prunes): ``num_growths`` events spread evenly over ``[start_step, start_step + ramp_steps]``, at
    ``start_step + round(k * ramp_steps / num_growths)``, ``k = 1 .. num_growths`` (or the explicit
    ``growth_steps``). At event ``k`` the tuning budget is ``Delta_k = Delta_0 + (budget - Delta_0) * k /
    num_growths`` LoRA parameters (a linear rise to ``budget``); the top ``fraction`` of the adapters by
    importance (the sum of their ranks' salience in the latest reading) grow to
    ``r' = floor(r * Delta_k / Delta)``, ``Delta`` being the LoRA parameters the model has now. The total
    never exceeds ``Delta_k <= budget`` (checked at every event). An event whose step has no reading
    yet waits for the next step that has one.

    At each growth, the grown layers compute exactly what they computed before (new ``lora_A`` rows
    ``N(0, sigma^2)``, new ``lora_B`` columns zero), the optimizer holds the new Parameters in place of
    the old ones with their state zero-padded (:func:`replace_parameters`; a learning-rate scheduler
    keeps working), and ``tracker.refresh()`` re-reads the adapter sites. Modifies the model and the
    optimizer in place.

    Args:
        model: a PEFT LoRA model (the tracker's model).
        tracker: an attached :class:`~apt_salience.SalienceTracker` with the ``adapter`` kind.
        optimizer: the optimizer that trains the LoRA weights.
        budget: the most LoRA parameters (``lora_A`` + ``lora_B`` weights) the model may hold; default
            4x the parameters at construction.
        ramp_steps: the length of the growth stage (required unless ``growth_steps`` is given).
        start_step: where it starts (tuner steps, one per optimizer step).
        num_growths: growth events over the stage.
        growth_steps: explicit steps of the events (increasing, >= 1); overrides the even spread.
        fraction: the share of adapters that grow at an event (APT: the top half).
        score: the adapter score summed over ranks (``salience``, ``outlier_aware``, ...).
        adapter_name: the PEFT adapter.
        init_std: the standard deviation of new ``lora_A`` rows (default: that of the layer's rows).
        seed: seed of the new rows.

    Example:
        >>> import torch, peft, apt_salience
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"]))
        >>> tracker = apt_salience.attach(model)
        >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        >>> tuner = apt_salience.AdaptiveTuner(model, tracker, opt, ramp_steps=4, num_growths=2)
        >>> for step in range(4):
        ...     model(input_ids=torch.randint(0, 100, (2, 7)), labels=torch.tensor([0, 1])).loss.backward()
        ...     opt.step(); opt.zero_grad(); _ = tracker.step(); _ = tuner.step()
        >>> [e["step"] for e in tuner.events], tuner.lora_parameters <= tuner.budget
        ([2, 4], True)
        >>> tracker.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        tracker: Any,
        optimizer: torch.optim.Optimizer,
        *,
        budget: Optional[int] = None,
        ramp_steps: Optional[int] = None,
        start_step: int = 0,
        num_growths: int = 4,
        growth_steps: Optional[Sequence[int]] = None,
        fraction: float = 0.5,
        score: str = "salience",
        adapter_name: str = "default",
        init_std: Optional[float] = None,
        seed: int = 0,
    ) -> None:
        from .tracker import SalienceTracker

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(tracker, SalienceTracker):
            raise TypeError(f"tracker must be an apt_salience SalienceTracker, got {type(tracker).__name__}")
        if not tracker.attached or tracker.model is not model:
            raise ValueError("tracker must be attached to this model (apt_salience.attach(model, config))")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        layers = _lora_layers(model, adapter_name)
        if not layers:
            raise ValueError(f"the model has no PEFT LoRA layers with adapter {adapter_name!r}; AdaptiveTuner grows "
                             "LoRA ranks (wrap the model with peft.get_peft_model first)")
        for name, layer in layers.items():
            _lora_parts(layer, adapter_name)  # DoRA / non-Linear adapters are refused here, before anything changes
        initial = lora_parameter_count(model, adapter_name)
        if budget is None:
            budget = 4 * initial
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < initial:
            raise ValueError(f"budget must be an int >= the LoRA parameters the model has now ({initial}), got {budget!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if growth_steps is None:
            if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
                raise ValueError(f"ramp_steps must be an int >= 1 (the length of the growth stage) unless growth_steps "
                                 f"is given, got {ramp_steps!r}")
            if isinstance(num_growths, bool) or not isinstance(num_growths, int) or num_growths < 1:
                raise ValueError(f"num_growths must be an int >= 1, got {num_growths!r}")
            steps = sorted({max(1, start_step + round(k * ramp_steps / num_growths)) for k in range(1, num_growths + 1)})
        else:
            steps = list(growth_steps)
            if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps) \
                    or steps != sorted(set(steps)):
                raise ValueError(f"growth_steps must be a non-empty increasing list of ints >= 1, got {growth_steps!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if score not in ("salience", "outlier_aware", "density", "kurtosis"):
            raise ValueError(f"score must be one of salience, outlier_aware, density, kurtosis; got {score!r}")
        if init_std is not None and (isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or init_std < 0):
            raise ValueError(f"init_std must be a number >= 0, got {init_std!r}")
        self.model = model
        self.tracker = tracker
        self.optimizer = optimizer
        self.budget = int(budget)
        self.initial_parameters = initial
        self.growth_steps: List[int] = steps
        self.fraction = float(fraction)
        self.score = score
        self.adapter_name = adapter_name
        self.init_std = init_std
        self._gen = torch.Generator().manual_seed(int(seed))
        self._step = 0
        self._next = 0
        #: one dict per growth event: step, target budget, parameters after, layers grown
        self.events: List[Dict[str, Any]] = []

    @property
    def steps(self) -> int:
        """Calls to :meth:`step` so far."""
        return self._step

    @property
    def lora_parameters(self) -> int:
        """LoRA parameters the model holds now."""
        return lora_parameter_count(self.model, self.adapter_name)

    def ranks(self) -> Dict[str, int]:
        """``{LoRA layer name: current rank}``."""
        return lora_ranks(self.model, self.adapter_name)

    def target(self, k: int) -> int:
        """The tuning budget ``Delta_k`` of growth event ``k`` (1-based).

        Args:
            k: the event, 1 to ``len(growth_steps)`` (larger values give ``budget``).
        """
        n = len(self.growth_steps)
        return int(self.initial_parameters + (self.budget - self.initial_parameters) * min(k, n) // n)

    def step(self) -> bool:
        """Advance one optimizer step; grow ranks when a growth step has come. True when ranks grew."""
        self._step += 1
        if self._next >= len(self.growth_steps) or self._step < self.growth_steps[self._next]:
            return False
        scores = self._reading()
        if scores is None:
            return False  # wait for a reading (e.g. right after a tracker refresh)
        k = self._next + 1
        self._next = k
        grown = self._grow(scores, self.target(k))
        self.events.append({"step": self._step, "target": self.target(k), "parameters": self.lora_parameters,
                            "grown": grown})
        return bool(grown)

    def _reading(self) -> Optional[SalienceScores]:
        from .tracker import TrackerStateError

        try:
            scores = self.tracker.scores()
        except TrackerStateError:
            return None
        return scores if scores.adapter is not None else None

    def _grow(self, scores: SalienceScores, target: int) -> List[str]:
        layers = _lora_layers(self.model, self.adapter_name)
        parts = {n: _lora_parts(m, self.adapter_name) for n, m in layers.items()}
        ranks = {n: int(a.out_features) for n, (a, _) in parts.items()}
        cost = {n: int(a.in_features + b.out_features) for n, (a, b) in parts.items()}  # parameters per rank
        # the tracker is attached to this model: the scores' adapter names are this model's layer names
        plan = plan_rank_growth(scores, new_budget=float(target), old_budget=float(self.lora_parameters),
                                ranks=ranks, fraction=self.fraction, score=self.score)
        new_ranks = {n: max(ranks[n], int(plan.get(n, ranks[n]))) for n in ranks}
        total = sum(new_ranks[n] * cost[n] for n in ranks)
        for name, _ in reversed(rank_adapters(scores, self.score)):  # never past the budget (the floor rule
            while total > target and new_ranks[name] > ranks[name]:  # already guarantees it)
                new_ranks[name] -= 1
                total -= cost[name]
        grown: List[str] = []
        replacements: Dict[Tensor, Tensor] = {}
        for name, r in new_ranks.items():
            if r <= ranks[name]:
                continue
            a, b = parts[name]
            old_a, old_b = a.weight, b.weight
            grow_lora_rank(layers[name], r, adapter_name=self.adapter_name, std=self.init_std, generator=self._gen)
            replacements[old_a], replacements[old_b] = a.weight, b.weight
            grown.append(name)
        if replacements:
            replace_parameters(self.optimizer, replacements)
            self.tracker.refresh()
        return grown

    def state_dict(self) -> Dict[str, Any]:
        """The ranks, the position in the growth schedule and the seed state (resume exactly)."""
        return {"version": TUNER_STATE_VERSION, "step": self._step, "next": self._next, "ranks": self.ranks(),
                "budget": self.budget, "initial_parameters": self.initial_parameters,
                "growth_steps": list(self.growth_steps), "generator": self._gen.get_state(),
                "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the model's LoRA layers are grown to the saved ranks (optimizer updated,
        tracker refreshed). Call it before loading the model's and the optimizer's own state dicts (their shapes
        are the grown ones), and before ``tracker.load_state_dict``. Modifies the model and the optimizer in place.

        Args:
            state: what :meth:`state_dict` returned.
        """
        if not isinstance(state, Mapping) or state.get("version") != TUNER_STATE_VERSION:
            raise ValueError("not an apt_salience tuner state")
        layers = _lora_layers(self.model, self.adapter_name)
        saved = {str(k): int(v) for k, v in dict(state["ranks"]).items()}
        missing = sorted(set(saved) - set(layers))
        if missing:
            raise ValueError(f"the tuner state names LoRA layers this model does not have: {missing[:3]}")
        todo = {}
        for name, r in saved.items():
            a, _ = _lora_parts(layers[name], self.adapter_name)
            if r < a.out_features:
                raise ValueError(f"the tuner state has rank {r} for '{name}', below its rank {a.out_features} here")
            if r > a.out_features:
                todo[name] = r
        replacements: Dict[Tensor, Tensor] = {}
        for name, r in todo.items():
            a, b = _lora_parts(layers[name], self.adapter_name)
            old_a, old_b = a.weight, b.weight
            grow_lora_rank(layers[name], r, adapter_name=self.adapter_name, std=0.0)
            replacements[old_a], replacements[old_b] = a.weight, b.weight
        if replacements:
            replace_parameters(self.optimizer, replacements)
            self.tracker.refresh()
        self._step = int(state["step"])
        self._next = int(state["next"])
        self.budget = int(state["budget"])
        self.initial_parameters = int(state["initial_parameters"])
        self.growth_steps = [int(s) for s in state["growth_steps"]]
        self._gen.set_state(state["generator"])
        self.events = [dict(e) for e in state.get("events", [])]

    def __repr__(self) -> str:
        return (f"AdaptiveTuner(budget={self.budget}, growth_steps={self.growth_steps}, steps={self._step}, "
                f"lora_parameters={self.lora_parameters})")
