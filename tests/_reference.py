"""An independent brute-force oracle for the tracker.

It captures the *full* site inputs/outputs and their gradients (``retain_grad``), keeps them
all, and applies the definitions of docs/design.md directly in float64, with scipy for kurtosis. It
shares no code with ``apt_salience``.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.stats
import torch

# site-name patterns per architecture, written independently of apt_salience.architectures
SITE_PATTERNS = {
    "bert": (r".*attention\.output\.dense", r".*layer\.\d+\.output\.dense"),
    "roberta": (r".*attention\.output\.dense", r".*layer\.\d+\.output\.dense"),
    "llama": (r".*self_attn\.o_proj", r".*mlp\.down_proj"),
    "mistral": (r".*self_attn\.o_proj", r".*mlp\.down_proj"),
    "qwen2": (r".*self_attn\.o_proj", r".*mlp\.down_proj"),
    "t5": (r".*(SelfAttention|EncDecAttention)\.o", r".*DenseReluDense\.wo"),
    "t5-gated": (r".*(SelfAttention|EncDecAttention)\.o", r".*DenseReluDense\.wo"),
    "gpt2": (r".*attn\.c_proj", r".*mlp\.c_proj"),
    "opt": (r".*self_attn\.out_proj", r".*\.fc2"),
    "vit": (r".*attention\.o_proj", r".*mlp\.fc2"),
}


class Capture:
    """Forward hooks that keep every site input/output tensor (with retain_grad) of the current step."""

    def __init__(self, model: torch.nn.Module, sites: Dict[str, str]):
        self.sites = sites  # name -> kind (head | neuron | adapter)
        self.calls: List[Tuple[str, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self.mask: Optional[torch.Tensor] = None
        self.decoder_mask: Optional[torch.Tensor] = None  # for sites under a module named "decoder"
        self.handles = []
        modules = dict(model.named_modules())
        for name in sites:
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(mod, args, out):
            if not torch.is_grad_enabled():
                return
            x = args[0]
            y = out[0] if isinstance(out, tuple) else out
            x.retain_grad()
            if self.sites[name] != "adapter":
                y.retain_grad()
            mask = self.decoder_mask if (self.decoder_mask is not None and "decoder" in name.split(".")) else self.mask
            self.calls.append((name, x, y if self.sites[name] != "adapter" else None, mask))
        return hook

    def collect(self) -> Dict[str, List[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]]]:
        """After backward: per site, list of (H, G, O, GO) float64 arrays of the kept tokens."""
        out: Dict[str, list] = {n: [] for n in self.sites}
        for name, x, y, mask in self.calls:
            def flat(t):
                a = t.detach().to(torch.float64).reshape(-1, t.shape[-1])
                if mask is not None and (tuple(t.shape[:-1]) == tuple(mask.shape) or
                                         (t.dim() == 2 and t.shape[0] == mask.numel())):  # OPT flattens tokens
                    a = a[mask.reshape(-1).bool()]
                else:
                    assert mask is None or tuple(t.shape[:-1]) == tuple(mask.shape[:1]), "pooled tensors only"
                return a.numpy()
            h, g = flat(x), flat(x.grad)
            o = go = None
            if y is not None:
                o, go = flat(y), flat(y.grad)
            out[name].append((h, g, o, go))
        self.calls = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def discover_sites(model: torch.nn.Module, arch: str) -> Dict[str, str]:
    heads, neurons = SITE_PATTERNS[arch]
    sites: Dict[str, str] = {}
    for name, _ in model.named_modules():
        if ".lora_" in name or name.endswith("base_layer"):
            continue
        if re.fullmatch(heads, name):
            sites[name] = "head"
        elif re.fullmatch(neurons, name):
            sites[name] = "neuron"
    return sites


def _kurt(values: np.ndarray, excess: bool) -> float:
    values = values.reshape(-1)
    if values.size < 2 or np.var(values) <= (1e-6 * abs(values.mean())) ** 2 + 1e-300:
        return 0.0
    k = float(scipy.stats.kurtosis(values, fisher=False, bias=True))
    return max(k - 3.0, 0.0) if excess else k


def reference_readings(
    steps: Sequence[Dict[str, list]],
    sites: Dict[str, str],
    block_size: Dict[str, int],
    update_frequency: int,
    beta: float,
    mode: str = "compressed",
    kurtosis: bool = True,
    excess: bool = False,
    combine: str = "add",
    weights: Optional[Dict[str, np.ndarray]] = None,
) -> List[Dict[str, Dict[str, np.ndarray]]]:
    """The published readings (one per window) as {kind: {salience, kurtosis, outlier_aware}}.

    ``steps[t][site]`` is the list of (H, G, O, GO) of the step's micro-batches. With
    ``weights`` ({site: W [out, in]}) the kurtosis is the ``output`` source.
    """
    names = list(sites)
    kinds = [k for k in ("head", "neuron", "adapter") if k in sites.values()]
    has_hidden = any(sites[n] in ("head", "neuron") for n in names)
    ema: Dict[str, Dict[str, np.ndarray]] = {}
    readings = []
    for w0 in range(0, len(steps) - update_frequency + 1, update_frequency):
        window = steps[w0 : w0 + update_frequency]
        # per-step block salience, averaged over the window's steps
        step_vals = []
        for st in window:
            vals = {}
            hid_acc = None
            for n in names:
                h = np.concatenate([r[0] for r in st[n]])
                g = np.concatenate([r[1] for r in st[n]])
                bs = block_size[n]
                if mode == "compressed":
                    ch = np.abs(h).sum(0) * np.abs(g).sum(0)
                    blk = ch.reshape(-1, bs).sum(1)
                else:
                    blk = (h * g).sum(0).reshape(-1, bs).sum(1)
                    blk = np.abs(blk) if mode == "taylor" else blk**2
                vals[n] = blk
                if sites[n] != "adapter":
                    o = np.concatenate([r[2] for r in st[n]])
                    go = np.concatenate([r[3] for r in st[n]])
                    hc = np.abs(o).sum(0) * np.abs(go).sum(0) if mode == "compressed" else (o * go).sum(0)
                    hid_acc = hc if hid_acc is None else hid_acc + hc
            if hid_acc is not None and mode != "compressed":
                hid_acc = np.abs(hid_acc) if mode == "taylor" else hid_acc**2
            vals["__hidden__"] = hid_acc
            step_vals.append(vals)
        s_win = {n: np.mean([v[n] for v in step_vals], axis=0) for n in names}
        hid_win = np.mean([v["__hidden__"] for v in step_vals], axis=0) if has_hidden else None
        # kurtosis over the window's tokens
        k_site: Dict[str, np.ndarray] = {}
        hid_sqrt = hid_mean = None
        if kurtosis:
            hs = []
            for n in names:
                h = np.concatenate([r[0] for st in window for r in st[n]])
                bs = block_size[n]
                if weights is None:
                    k_site[n] = np.array([_kurt(h[:, b * bs : (b + 1) * bs], excess) for b in range(h.shape[1] // bs)])
                    if sites[n] != "adapter":
                        o = np.concatenate([r[2] for st in window for r in st[n]])
                        hs.append(np.array([_kurt(o[:, c], excess) for c in range(o.shape[1])]))
                else:
                    vals = weights[n] * h.mean(0)[None, :]  # W[o, c] * mean(X_c)
                    k_site[n] = np.array([_kurt(vals[:, b * bs : (b + 1) * bs], excess) for b in range(vals.shape[1] // bs)])
                    if sites[n] != "adapter":
                        hs.append(np.array([_kurt(vals[o, :], excess) for o in range(vals.shape[0])]))
            if hs:
                hid_sqrt = np.sum([np.sqrt(k) for k in hs], axis=0)
                hid_mean = np.mean(hs, axis=0)
        reading: Dict[str, Dict[str, np.ndarray]] = {}
        for kind in kinds + (["hidden"] if has_hidden else []):
            if kind == "hidden":
                s = hid_win
                sk = hid_sqrt if kurtosis else np.zeros_like(s)
                kinfo = hid_mean if kurtosis else np.zeros_like(s)
                if kurtosis and combine == "scaled":
                    sk = s.mean() * sk / sk.mean() if sk.mean() > 0 else np.zeros_like(s)
            else:
                members = [n for n in names if sites[n] == kind]
                s = np.concatenate([s_win[n] for n in members])
                if kurtosis:
                    kinfo = np.concatenate([k_site[n] for n in members])
                    parts = []
                    for n in members:
                        rk = np.sqrt(k_site[n])
                        if combine == "scaled":
                            rk = s_win[n].mean() * rk / rk.mean() if rk.mean() > 0 else np.zeros_like(rk)
                        parts.append(rk)
                    sk = np.concatenate(parts)
                else:
                    kinfo = np.zeros_like(s)
                    sk = np.zeros_like(s)
            e = ema.setdefault(kind, {"salience": np.zeros_like(s), "outlier_aware": np.zeros_like(s)})
            e["salience"] = beta * e["salience"] + (1 - beta) * s
            e["outlier_aware"] = beta * e["outlier_aware"] + (1 - beta) * (s + sk)
            reading[kind] = {"salience": e["salience"].copy(), "outlier_aware": e["outlier_aware"].copy(), "kurtosis": kinfo}
        readings.append(reading)
    return readings


def assert_close(actual: torch.Tensor, expected: np.ndarray, rel: float = 1e-4, what: str = "") -> None:
    a = actual.detach().double().numpy()
    assert a.shape == expected.shape, f"{what}: shape {a.shape} != {expected.shape}"
    scale = np.maximum(np.abs(expected), 1e-12 + 1e-6 * np.abs(expected).max())
    err = np.abs(a - expected) / scale
    assert err.max() <= rel, f"{what}: max relative error {err.max():.3g} at {int(err.argmax())} ({a.reshape(-1)[err.argmax()]} vs {expected.reshape(-1)[err.argmax()]})"


class MultiCapture:
    """Like :class:`Capture`, for several backwards through one forward and several forwards per step.

    Each forward of a site records its (masked) input H and output O; every gradient that
    reaches them is recorded separately (tensor hooks, one call per backward). ``collect()``
    returns, per site, entries in the layout :func:`reference_readings` expects, so that a
    forward counts its |H| once and each of its gradients once: ``(H, G_1, O, GO_1)`` then
    ``(H[:0], G_i, O[:0], GO_i)`` for every further gradient ``i``.
    """

    def __init__(self, model: torch.nn.Module, sites: Dict[str, str]):
        self.sites = sites
        self.mask: Optional[torch.Tensor] = None
        self.forwards: List[dict] = []
        self.handles = []
        modules = dict(model.named_modules())
        for name in sites:
            self.handles.append(modules[name].register_forward_hook(self._hook(name, modules[name])))

    def _hook(self, name: str, module: torch.nn.Module):
        def hook(mod, args, out):
            if mod is not module:
                return  # a deep copy of the model carries this hook too: not the model under test
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return  # evaluation forwards and checkpoint re-computations are not forwards of the step
            x = args[0]
            y = out[0] if isinstance(out, tuple) else out
            rec = {"name": name, "mask": self.mask, "h": x.detach().clone(), "o": None, "g": [], "go": []}
            x.register_hook(lambda g: rec["g"].append(g.detach().clone()))
            if self.sites[name] != "adapter":
                rec["o"] = y.detach().clone()
                y.register_hook(lambda g: rec["go"].append(g.detach().clone()))
            self.forwards.append(rec)
        return hook

    def collect(self) -> Dict[str, list]:
        out: Dict[str, list] = {n: [] for n in self.sites}
        for rec in self.forwards:
            mask = rec["mask"]

            def flat(t):
                a = t.detach().to(torch.float64).reshape(-1, t.shape[-1])
                if mask is not None and (tuple(t.shape[:-1]) == tuple(mask.shape) or
                                         (t.dim() == 2 and t.shape[0] == mask.numel())):
                    a = a[mask.reshape(-1).bool()]
                return a.numpy()
            if not rec["g"] and not rec["go"]:
                continue  # a forward whose gradient never came
            h = flat(rec["h"])
            o = flat(rec["o"]) if rec["o"] is not None else None
            for i in range(max(len(rec["g"]), len(rec["go"]))):
                g = flat(rec["g"][i]) if i < len(rec["g"]) else h[:0]
                go = None
                if o is not None:
                    go = flat(rec["go"][i]) if i < len(rec["go"]) else o[:0]
                out[rec["name"]].append((h if i == 0 else h[:0], g, None if o is None else (o if i == 0 else o[:0]), go))
        self.forwards = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
