"""Publication: from the accumulated window to one :class:`~apt_salience.SalienceScores` reading.

Per block kind: the window's mean per-step salience (``win_blocks / window steps``), the
window's kurtosis (pooled over a head's channels; for hidden dimensions the ``sqrt(Kurt)`` of
every contributing site summed), the outlier-aware combination and the EMA (the pure functions
:func:`~apt_salience.salience.outlier_aware_salience` and :func:`~apt_salience.salience.ema_update`),
parameter counts from the current module shapes, and density.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..architectures import Site, linear_weight
from ..config import SalienceConfig
from ..moments import batch_moments, kurtosis_from_moments, pool_moments
from ..salience import ema_update, outlier_aware_salience
from ..scores import BlockScores, SalienceScores
from .accumulate import Accumulator, Probe

__all__ = ["block_kurtosis", "publish_reading", "site_lists"]


def site_lists(sites: Sequence[Site], d_model: int) -> Tuple[Dict[str, List[Tuple[str, int]]], Dict[str, List[float]]]:
    """Per kind: ``(site name, blocks)`` in model order, and each block's parameter count."""
    lists: Dict[str, List[Tuple[str, int]]] = {k: [] for k in ("head", "neuron", "adapter")}
    counts: Dict[str, List[float]] = {k: [] for k in ("head", "neuron", "adapter")}
    for s in sites:
        lists[s.kind].append((s.name, s.num_blocks))
        counts[s.kind] += [s.block_param_count] * s.num_blocks
    if d_model:
        hidden_count = sum(s.num_blocks * s.block_param_count for s in sites if s.writes_hidden) / d_model
        counts["hidden"] = [hidden_count] * d_model
        lists["hidden"] = [("hidden", d_model)]
    return lists, counts


def block_kurtosis(acc: Accumulator, pairs: Sequence[Tuple[Probe, Optional[Probe]]], config: SalienceConfig,
                   d_model: int) -> Tuple[Dict[str, Tensor], Optional[Tensor], Optional[Tensor]]:
    """Per-kind block kurtosis of the window, and for hidden: (sum over sites of sqrt K, mean over sites of K)."""
    cfg = config.kurtosis
    home = acc.home
    per_kind: Dict[str, List[Tensor]] = {k: [] for k in ("head", "neuron", "adapter")}
    hid_sqrt = hid_mean = None
    if d_model:
        hid_sqrt = torch.zeros(d_model, dtype=torch.float64, device=home)
        hid_mean = torch.zeros_like(hid_sqrt)
    n_hidden_sites = 0
    with torch.no_grad():
        for pin, pout in pairs:
            site = pin.site
            m_in = acc.window_moments(pin)
            if cfg.source == "activation":
                k_in = kurtosis_from_moments(pool_moments(m_in, pin.block_size), excess=cfg.excess)
                k_out = (kurtosis_from_moments(acc.window_moments(pout), excess=cfg.excess)
                         if pout is not None and pout.order else None)
            else:
                w = linear_weight(site.module).detach().float()
                vals = w * m_in.mean.float().to(w.device)  # [out, in]: W[o, c] * mean(X_c)
                k_in = kurtosis_from_moments(pool_moments(batch_moments(vals), pin.block_size), excess=cfg.excess)
                k_out = kurtosis_from_moments(batch_moments(vals.t()), excess=cfg.excess) if pout is not None else None
            per_kind[site.kind].append(k_in.to(home))
            if k_out is not None and hid_sqrt is not None and hid_mean is not None:
                k_out = k_out.to(home)
                hid_sqrt += k_out.sqrt()
                hid_mean += k_out
                n_hidden_sites += 1
    if hid_mean is not None and n_hidden_sites:
        hid_mean /= n_hidden_sites
    return {k: torch.cat(v) for k, v in per_kind.items() if v}, hid_sqrt, hid_mean


def publish_reading(acc: Accumulator, sites: Sequence[Site], pairs: Sequence[Tuple[Probe, Optional[Probe]]],
                    config: SalienceConfig, d_model: int, n_steps: float, step: int, meta: Dict[str, Any]) -> SalienceScores:
    """Fold the window into the EMA (``acc.ema``, updated in place) and build the reading."""
    beta = config.ema_beta
    kinds_k: Dict[str, Tensor] = {}
    hid_sqrt = hid_mean = None
    if config.kurtosis.enabled:
        kinds_k, hid_sqrt, hid_mean = block_kurtosis(acc, pairs, config, d_model)
    lists, counts = site_lists(sites, d_model)
    result: Dict[str, BlockScores] = {}
    with torch.no_grad():
        for kind in acc.counts:
            s_win = acc.win_blocks[acc.kind_slice(kind)] / n_steps
            if config.kurtosis.enabled:
                if kind == "hidden":
                    assert hid_sqrt is not None and hid_mean is not None
                    sqrt_k, k_info = hid_sqrt, hid_mean
                else:
                    k_info = kinds_k[kind]
                    sqrt_k = k_info.sqrt()
                s_hat = outlier_aware_salience(s_win, sqrt_k, combine=config.kurtosis.combine, sites=lists[kind])
            else:
                k_info = torch.zeros_like(s_win)
                s_hat = s_win
            ema = acc.ema[kind]
            ema["salience"].copy_(ema_update(ema["salience"], s_win, beta))
            ema["outlier_aware"].copy_(ema_update(ema["outlier_aware"], s_hat, beta))
            if config.uncertainty_beta is not None:  # AdaLoRA: U <- b2 U + (1 - b2) |I - I_bar| (updated I_bar)
                ema["uncertainty"].copy_(ema_update(ema["uncertainty"], (s_hat - ema["outlier_aware"]).abs(),
                                                    config.uncertainty_beta))
            result[kind] = BlockScores.build(
                salience=ema["salience"], kurtosis=k_info, outlier_aware=ema["outlier_aware"],
                param_count=torch.tensor(counts[kind], dtype=torch.float64), sites=lists[kind],
            )
    return SalienceScores(step=step, d_model=d_model, meta=meta, **result)
