"""Side checks for ``benchmarks/overhead.py``, each run in its own process: ``python benchmarks/_checks.py KIND``.

KIND: ``inproc`` (time inside the tracker's hooks, BERT-base shape), ``growth`` (1000 steps of a
small model: state, live tensors, RSS), ``compile`` (torch.compile: graph breaks and scores).
Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _workload as W  # noqa: E402

import apt_salience  # noqa: E402
from apt_salience import tracker as T  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def inproc(quick: bool) -> Dict[str, Any]:
    """Wall time spent in the tracker's forward hooks, gradient hooks and step(), per training step."""
    torch.set_num_threads(1)
    acc = {"fwd": 0.0, "bwd": 0.0, "step": 0.0}
    orig_obs, orig_mgh, orig_step = T.SalienceTracker._observe, T.SalienceTracker._make_grad_hook, T.SalienceTracker.step

    def obs(self: Any, p: Any, t: Any) -> None:
        t0 = time.perf_counter()
        orig_obs(self, p, t)
        acc["fwd"] += time.perf_counter() - t0

    def mgh(self: Any, *a: Any) -> Any:
        h = orig_mgh(self, *a)

        def wrapped(g: Any) -> Any:
            t0 = time.perf_counter()
            r = h(g)
            acc["bwd"] += time.perf_counter() - t0
            return r

        return wrapped

    def st(self: Any) -> bool:
        t0 = time.perf_counter()
        r = orig_step(self)
        acc["step"] += time.perf_counter() - t0
        return r

    T.SalienceTracker._observe, T.SalienceTracker._make_grad_hook, T.SalienceTracker.step = obs, mgh, st  # type: ignore
    rows: List[Dict[str, Any]] = []
    layers, steps = (1, 1) if quick else (4, 3)
    for regime in ("full", "lora"):
        for variant in ("kurt_off", "kurt_on"):
            spec = dict(regime=regime, variant=variant, hidden=768, heads=12, ffn=3072, layers=layers, batch=8, seq=128)
            torch.manual_seed(0)
            model = W.build(spec)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            tr = apt_salience.attach(model, W.VARIANTS[variant][0])
            ids = torch.randint(0, 30522, (8, 128))
            labels = torch.randint(0, 2, (8,))
            tot = 0.0
            for i in range(1 + steps):
                if i == 1:
                    for k in acc:
                        acc[k] = 0.0
                    tot = 0.0
                t0 = time.perf_counter()
                model(input_ids=ids, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tr.step()
                tot += time.perf_counter() - t0
            tr.detach()
            rows.append(dict(regime=regime, variant=variant, step_ms=tot / steps * 1e3, fwd_ms=acc["fwd"] / steps * 1e3,
                             bwd_ms=acc["bwd"] / steps * 1e3, step_fn_ms=acc["step"] / steps * 1e3,
                             share=sum(acc.values()) / tot))
            del model, opt, tr
            gc.collect()
    return {"rows": rows}


def _tiny(hidden: int = 64, layers: int = 2) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=hidden, num_attention_heads=4, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     vocab_size=200, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg)


def _live_tensor_bytes() -> int:
    gc.collect()
    seen = set()
    total = 0
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and id(o) not in seen:
            seen.add(id(o))
            try:
                total += o.untyped_storage().nbytes()
            except Exception:  # pragma: no cover - exotic tensor subclasses
                pass
    return total


def growth(quick: bool) -> Dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tr = apt_salience.attach(model, {"update_frequency": 4})
    g = torch.Generator().manual_seed(0)
    steps = 100 if quick else 1000
    first = 100 if not quick else 10
    out: Dict[str, Any] = {"steps": steps, "first_step": first,
                           "desc": f"Tiny BERT (hidden 64, 2 layers), kurtosis on, update_frequency 4, {steps} steps of "
                                   "batch 4 x 16 with two micro-batches each (gradient accumulation), one in three with "
                                   "a padding mask; measured in one process."}
    for i in range(1, steps + 1):
        for m in range(2):
            ids = torch.randint(0, 200, (4, 16), generator=g)
            labels = torch.randint(0, 2, (4,), generator=g)
            if i % 3 == 0:
                mask = torch.ones(4, 16, dtype=torch.long)
                mask[:, 12:] = 0
                with tr.token_mask(mask):
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tr.step()
        if i == first:
            out["state_first"], out["live_first"], out["rss_first_mib"] = tr.state_bytes(), _live_tensor_bytes(), rss_mib()
    out["state_last"], out["live_last"], out["rss_last_mib"] = tr.state_bytes(), _live_tensor_bytes(), rss_mib()
    out["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["bytes_per_channel"] = tr.state_bytes() / tr.tracked_channels
    by_tokens = {}
    for b, s in ((2, 8), (8, 48)):
        t2 = apt_salience.attach(model, None)
        model(input_ids=torch.randint(0, 200, (b, s)), labels=torch.randint(0, 2, (b,))).loss.backward()
        t2.step()
        by_tokens[f"{b}x{s}"] = t2.state_bytes()
        t2.detach()
        model.zero_grad(set_to_none=True)
    out["state_by_tokens"] = ", ".join(f"{k}: {v} B" for k, v in by_tokens.items())
    tr.detach()
    return out


def compile_check(quick: bool) -> Dict[str, Any]:
    """Graph breaks caused by the tracker's hooks under torch.compile, and whether the scores still match eager."""
    import torch._dynamo as dynamo

    torch.set_num_threads(1)
    lines: List[str] = []
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])

    def explain(with_tracker: bool) -> Any:
        torch.manual_seed(0)
        model = _tiny()
        tr = apt_salience.attach(model, None) if with_tracker else None
        dynamo.reset()
        ex = dynamo.explain(model)(input_ids=ids, labels=labels)
        if tr is not None:
            tr.detach()
        return ex

    e0, e1 = explain(False), explain(True)
    lines.append(f"`torch._dynamo.explain` of a tiny BERT forward (2 layers, torch {torch.__version__}): without the "
                 f"tracker {e0.graph_count} graph(s), {e0.graph_break_count} break(s); with the tracker "
                 f"{e1.graph_count} graph(s), {e1.graph_break_count} break(s).")
    reasons: Dict[str, int] = {}
    for r in e1.break_reasons:
        key = str(getattr(r, "reason", r)).splitlines()[0][:160]
        reasons[key] = reasons.get(key, 0) + 1
    for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:6]:
        lines.append(f"break reason ({v}x): {k}")

    def train(backend: str, steps: int = 3) -> Any:
        torch.manual_seed(0)
        model = _tiny()
        tr = apt_salience.attach(model, {"ema_beta": 0.0})
        fwd = model if backend == "none" else torch.compile(model, backend=backend)
        dynamo.reset()
        t0 = time.perf_counter()
        for _ in range(steps):
            fwd(input_ids=ids, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
            tr.step()
        dt = time.perf_counter() - t0
        sc = tr.scores()
        obs = tr.observed_microbatches
        tr.detach()
        return sc, obs, dt

    ref, ref_obs, _ = train("none")
    for backend in (["aot_eager"] if quick else ["aot_eager", "inductor"]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc, obs, dt = train(backend)
            same = all(
                torch.allclose(getattr(sc, k).outlier_aware, getattr(ref, k).outlier_aware, rtol=1e-4, atol=1e-6)
                for k in ("head", "neuron", "hidden")
            )
            lines.append(f"`torch.compile(model, backend='{backend}')` training with the tracker attached: "
                         f"{obs} of {ref_obs} micro-batches observed (eager: {ref_obs}); scores "
                         f"{'match eager (rtol 1e-4)' if same else 'DIFFER from eager'}; 3 steps incl. compilation "
                         f"{dt:.1f} s.")
        except Exception as exc:  # report, do not hide
            lines.append(f"`torch.compile(model, backend='{backend}')` with the tracker: failed: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return {"lines": lines}


if __name__ == "__main__":
    kind = sys.argv[1]
    quick = "--quick" in sys.argv
    fn = {"inproc": inproc, "growth": growth, "compile": compile_check}[kind]
    print("RESULT " + json.dumps(fn(quick), default=str), flush=True)
