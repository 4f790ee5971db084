"""Publication: from the accumulated window to one :class:`~apt_salience.SalienceScores` reading.

Per block kind, with the pure functions of :mod:`apt_salience.salience`: the window's mean
per-step salience (``win_blocks / window steps``), the window's kurtosis
(:func:`~apt_salience.salience.kurtosis_of_moments`, pooled over a head's channels; for hidden
dimensions the ``sqrt(Kurt)`` of every contributing site summed), the outlier-aware combination
(:func:`~apt_salience.salience.outlier_aware_salience`), the EMA
(:func:`~apt_salience.salience.ema_update`), the uncertainty when ``uncertainty_beta`` is set, and
density (:func:`~apt_salience.salience.normalize_scores`, in ``BlockScores.build``) over the
parameter counts of the tracker's :class:`~apt_salience.layout.BlockLayout` (current module shapes).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..architectures import linear_weight
from ..config import SalienceConfig
from ..layout import BlockLayout
from ..moments import batch_moments
from ..salience import ema_update, kurtosis_of_moments, outlier_aware_salience
from ..scores import BlockScores, SalienceScores
from .accumulate import Accumulator, Probe

__all__ = ["block_kurtosis", "publish_reading"]


def block_kurtosis(acc: Accumulator, pairs: Sequence[Tuple[Probe, Optional[Probe]]], config: SalienceConfig,
                   d_model: int) -> Tuple[Dict[str, Tensor], Optional[Tensor], Optional[Tensor]]:
    """Per-kind block kurtosis of the window, and for hidden: (sum over sites of sqrt K, mean over sites of K).

    Args:
        acc: the tracker's accumulator.
        pairs: the (input, output) probes of every site.
        config: the tracker's config (its ``kurtosis`` section).
        d_model: the hidden size (0: no hidden kind).
    """
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
                k_in = kurtosis_of_moments(m_in, group_size=pin.block_size, excess=cfg.excess)
                k_out = (kurtosis_of_moments(acc.window_moments(pout), excess=cfg.excess)
                         if pout is not None and pout.order else None)
            else:
                w = linear_weight(site.module).detach().float()
                vals = w * m_in.mean.float().to(w.device)  # [out, in]: W[o, c] * mean(X_c)
                k_in = kurtosis_of_moments(batch_moments(vals), group_size=pin.block_size, excess=cfg.excess)
                k_out = kurtosis_of_moments(batch_moments(vals.t()), excess=cfg.excess) if pout is not None else None
            per_kind[site.kind].append(k_in.to(home))
            if k_out is not None and hid_sqrt is not None and hid_mean is not None:
                k_out = k_out.to(home)
                hid_sqrt += k_out.sqrt()
                hid_mean += k_out
                n_hidden_sites += 1
    if hid_mean is not None and n_hidden_sites:
        hid_mean /= n_hidden_sites
    return {k: torch.cat(v) for k, v in per_kind.items() if v}, hid_sqrt, hid_mean


def publish_reading(acc: Accumulator, layout: BlockLayout, pairs: Sequence[Tuple[Probe, Optional[Probe]]],
                    config: SalienceConfig, n_steps: float, step: int, *, fingerprint: str,
                    unobserved_sites: Sequence[str] = ()) -> SalienceScores:
    """Fold the window into the EMA (``acc.ema``, updated in place) and build the reading.

    ``layout`` is the tracker's :meth:`~apt_salience.layout.BlockLayout.from_sites` layout: the
    sites of each kind and their per-block parameter counts.

    Args:
        acc: the tracker's accumulator (its EMA is updated).
        layout: the layout of the tracked sites.
        pairs: the (input, output) probes of every site.
        config: the tracker's config.
        n_steps: optimizer steps that observed something in the window.
        step: optimizer steps seen.
        fingerprint: the tracker's layout fingerprint.
        unobserved_sites: sites whose tensors never required grad.
    """
    beta = config.ema_beta
    kinds_k: Dict[str, Tensor] = {}
    hid_sqrt = hid_mean = None
    if config.kurtosis.enabled:
        kinds_k, hid_sqrt, hid_mean = block_kurtosis(acc, pairs, config, layout.d_model)
    result: Dict[str, BlockScores] = {}
    with torch.no_grad():
        for kind in acc.counts:
            sites = list(layout.sites[kind])
            s_win = acc.win_blocks[acc.kind_slice(kind)] / n_steps
            if config.kurtosis.enabled:
                if kind == "hidden":
                    assert hid_sqrt is not None and hid_mean is not None
                    sqrt_k, k_info = hid_sqrt, hid_mean
                else:
                    k_info = kinds_k[kind]
                    sqrt_k = k_info.sqrt()
                s_hat = outlier_aware_salience(s_win, sqrt_k, combine=config.kurtosis.combine, sites=sites)
            else:
                k_info = torch.zeros_like(s_win)
                s_hat = s_win
            ema = acc.ema[kind]
            ema["salience"].copy_(ema_update(ema["salience"], s_win, beta))
            ema["outlier_aware"].copy_(ema_update(ema["outlier_aware"], s_hat, beta))
            unc: Optional[Tensor] = None
            if config.uncertainty_beta is not None:  # AdaLoRA: U <- b2 U + (1 - b2) |I - I_bar| (updated I_bar)
                ema["uncertainty"].copy_(ema_update(ema["uncertainty"], (s_hat - ema["outlier_aware"]).abs(),
                                                    config.uncertainty_beta))
                unc = ema["uncertainty"]
            result[kind] = BlockScores.build(
                salience=ema["salience"], kurtosis=k_info, outlier_aware=ema["outlier_aware"],
                param_count=layout.param_count[kind], sites=sites, uncertainty=unc,
            )
    return SalienceScores(step, result.get("head"), result.get("neuron"), result.get("hidden"), result.get("adapter"),
                          d_model=layout.d_model, layout=layout, window_steps=n_steps, config=config,
                          fingerprint=fingerprint, unobserved_sites=tuple(unobserved_sites))
