"""Side checks for ``benchmarks/overhead.py``, each run in its own process: ``python benchmarks/_checks.py KIND``.

KIND: ``inproc`` (time inside the tracker's hooks, BERT-base shape), ``growth`` (1000 steps of a
small model: state, live tensors, RSS), ``compile`` (torch.compile: graph breaks, scores, compile
time), ``ops`` (tensor operations per micro-batch, by part).
Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import contextlib
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


def _timed(acc: Dict[str, float], key: str, fn: Any) -> Any:
    def wrapped(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t0
    return wrapped


def inproc(quick: bool) -> Dict[str, Any]:
    """Wall time spent in the tracker's forward hooks, gradient hooks, commits and step(), per training step."""
    from apt_salience.tracker import accumulate, observe

    torch.set_num_threads(1)
    acc = {"fwd": 0.0, "bwd": 0.0, "commit": 0.0, "step": 0.0}
    observe.Observer.observe = _timed(acc, "fwd", observe.Observer.observe)  # type: ignore[method-assign]
    observe._GradHook.__call__ = _timed(acc, "bwd", observe._GradHook.__call__)  # type: ignore[method-assign]
    accumulate.Accumulator.commit = _timed(acc, "commit", accumulate.Accumulator.commit)  # type: ignore[method-assign]
    T.SalienceTracker.step = _timed(acc, "step", T.SalienceTracker.step)  # type: ignore[method-assign]
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
            # step() includes the last commit of the step: count it once, under step()
            rows.append(dict(regime=regime, variant=variant, step_ms=tot / steps * 1e3, fwd_ms=acc["fwd"] / steps * 1e3,
                             bwd_ms=acc["bwd"] / steps * 1e3, step_fn_ms=acc["step"] / steps * 1e3,
                             share=(acc["fwd"] + acc["bwd"] + acc["step"]) / tot))
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


def _tiny_llama(layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64))


def compile_check(quick: bool) -> Dict[str, Any]:
    """torch.compile with the tracker: graph breaks with and without it, compiled scores vs eager, compile time."""
    import torch._dynamo as dynamo

    torch.set_num_threads(1)
    lines: List[str] = []
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (4, 16), generator=gen)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 12:] = 0
    makers = {"BERT": (_tiny, {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}),
              "LLaMA (GQA)": (_tiny_llama, {"input_ids": ids, "attention_mask": mask, "labels": ids})}
    for name, (make, inputs) in makers.items():
        counts = []
        for with_tracker in (False, True):
            torch.manual_seed(0)
            model = make()
            tr = apt_salience.attach(model, None) if with_tracker else None
            dynamo.reset()
            with tr.token_mask(mask) if tr is not None else contextlib.nullcontext():
                ex = dynamo.explain(model)(**inputs)
            counts.append((ex.graph_count, ex.graph_break_count))
            if tr is not None:
                tr.remove()
        lines.append(f"`torch._dynamo.explain` of a tiny {name} training forward (2 layers, padding mask through "
                     f"`token_mask`): without the tracker {counts[0][0]} graph(s), {counts[0][1]} break(s); with the "
                     f"tracker {counts[1][0]} graph(s), {counts[1][1]} break(s).")

    def train(backend: str, with_tracker: bool, steps: int = 4) -> Any:
        torch.manual_seed(0)
        model = _tiny()
        tr = apt_salience.attach(model, {"update_frequency": 2}) if with_tracker else None
        fwd = model if backend == "none" else torch.compile(model, backend=backend, fullgraph=True)
        dynamo.reset()
        t0 = time.perf_counter()
        for i in range(steps):
            with tr.token_mask(mask) if tr is not None else contextlib.nullcontext():
                fwd(**makers["BERT"][1]).loss.backward()
            model.zero_grad(set_to_none=True)
            if tr is not None:
                tr.step()
        dt = time.perf_counter() - t0
        sc = tr.scores() if tr is not None else None
        if tr is not None:
            tr.remove()
        return sc, dt

    ref, eager_s = train("none", True)
    for backend in (["aot_eager"] if quick else ["aot_eager", "inductor"]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc, dt = train(backend, True)
                _, dt0 = train(backend, False)
            worst = max(float(((getattr(sc, k).outlier_aware - getattr(ref, k).outlier_aware).abs()
                               / getattr(ref, k).outlier_aware.abs().clamp_min(1e-12)).max()) for k in ("head", "neuron", "hidden"))
            lines.append(f"`torch.compile(model, backend='{backend}', fullgraph=True)`, tiny BERT, 4 steps including "
                         f"compilation: {dt:.1f} s with the tracker, {dt0:.1f} s without (eager with the tracker: "
                         f"{eager_s * 1000:.0f} ms); scores vs eager: max relative difference {worst:.1e}.")
        except Exception as exc:  # report, do not hide
            lines.append(f"`torch.compile(model, backend='{backend}')` with the tracker: failed: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return {"lines": lines}


def op_counts(quick: bool) -> Dict[str, Any]:
    """Tensor operations the tracker dispatches per micro-batch (eager), by part, for 2 and 4 layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from apt_salience.tracker import accumulate, observe

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts: Dict[str, int] = {}

    def counted(key: str, fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            before = Count.n
            with Count():
                r = fn(*a, **k)
            counts[key] = counts.get(key, 0) + Count.n - before
            return r
        return wrapped

    observe.Observer.observe = counted("forward hooks", observe.Observer.observe)  # type: ignore[method-assign]
    observe._GradHook.__call__ = counted("gradient hooks", observe._GradHook.__call__)  # type: ignore[method-assign]
    accumulate.Accumulator.commit = counted("commit", accumulate.Accumulator.commit)  # type: ignore[method-assign]
    accumulate.Accumulator.close_step = counted("close step", accumulate.Accumulator.close_step)  # type: ignore[method-assign]
    rows = []
    for layers in (2, 4):
        counts.clear()
        torch.manual_seed(0)
        model = _tiny(layers=layers)
        model.train()
        tr = apt_salience.attach(model, {"update_frequency": 100})
        ids = torch.randint(0, 200, (4, 16))
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[0, 10:] = 0
        micro = 8
        for _ in range(micro):
            with tr.token_mask(mask):
                model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        tr.step()
        rows.append({"layers": layers, "sites": len(tr.sites), "probes": 2 * len(tr.sites),
                     **{k: v / micro for k, v in counts.items()}})
        tr.remove()
    return {"rows": rows}


if __name__ == "__main__":
    kind = sys.argv[1]
    quick = "--quick" in sys.argv
    fn = {"inproc": inproc, "growth": growth, "compile": compile_check, "ops": op_counts}[kind]
    print("RESULT " + json.dumps(fn(quick), default=str), flush=True)
