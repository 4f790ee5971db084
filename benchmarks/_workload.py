"""One benchmark run in its own process: build the model, train a few steps, report JSON.

Used by ``benchmarks/overhead.py`` (``python benchmarks/_workload.py '<json spec>'``); not a test.
The spec keys: regime (full|lora), variant, hidden, heads, ffn, layers, batch, seq, warmup, steps,
threads, compile (none|eager|inductor).
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch

VARIANTS = {
    # name: (tracker config or None, weight-gradient Taylor?)
    "none": (None, False),
    "kurt_off": ({"kurtosis": {"enabled": False}}, False),
    "kurt_on": ({"kurtosis": {"enabled": True, "source": "activation"}}, False),
    "kurt_output": ({"kurtosis": {"enabled": True, "source": "output"}}, False),
    "taylor_mode": ({"salience": {"mode": "taylor"}, "kurtosis": {"enabled": False}}, False),
    "weight_taylor": (None, True),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(spec: Dict[str, Any]) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=spec["hidden"], num_attention_heads=spec["heads"], intermediate_size=spec["ffn"],
        num_hidden_layers=spec["layers"], max_position_embeddings=max(512, spec["seq"]), num_labels=2,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    cfg._attn_implementation = "eager"  # same attention kernel in every variant
    model = BertForSequenceClassification(cfg)
    if spec["regime"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
    return model


def weight_taylor_setup(model: torch.nn.Module, regime: str) -> List[torch.nn.Linear]:
    """What a user does for |sum W * dL/dW|: every encoder Linear base weight gets a gradient."""
    linears = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".encoder.layer." in name and "lora_" not in name:
            linears.append((name, mod))
            if regime == "lora":
                mod.weight.requires_grad_(True)  # frozen base weights now need .grad: one more buffer each
    return linears


def weight_taylor_scores(linears, heads: int, acc: Dict[str, torch.Tensor]) -> None:
    """Per-head (attention output projection) and per-neuron (FFN down projection) |sum W * dW|, accumulated."""
    with torch.no_grad():
        for name, mod in linears:
            g = mod.weight.grad
            if g is None:
                continue
            if name.endswith("attention.output.dense") or name.endswith("attention.output.dense.base_layer"):
                v = (mod.weight * g).sum(0).view(heads, -1).sum(-1).abs()
            elif name.endswith(".output.dense") or name.endswith(".output.dense.base_layer"):
                v = (mod.weight * g).sum(0).abs()
            else:
                continue
            if name in acc:
                acc[name] += v
            else:
                acc[name] = v.clone()


def run(spec: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(spec.get("threads", 1))
    torch.manual_seed(0)
    import apt_salience

    cfg, wtaylor = VARIANTS[spec["variant"]]
    model = build(spec)
    model.train()
    linears = weight_taylor_setup(model, spec["regime"]) if wtaylor else []
    params = [p for p in model.parameters() if p.requires_grad]
    if wtaylor and spec["regime"] == "lora":  # the optimizer still trains the adapters only
        params = [p for n, p in model.named_parameters() if p.requires_grad and ("lora_" in n or "classifier" in n)]
    opt = torch.optim.AdamW(params, lr=1e-5)
    tracker = apt_salience.attach(model, cfg) if cfg is not None else None
    fwd: Callable[..., Any] = model
    if spec.get("compile", "none") != "none":
        fwd = torch.compile(model, backend=spec["compile"])
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, 30522, (spec["batch"], spec["seq"]), generator=g), torch.randint(0, 2, (spec["batch"],), generator=g))
        for _ in range(2)
    ]
    acc: Dict[str, torch.Tensor] = {}
    times: List[float] = []
    cpu: List[float] = []
    warm: List[float] = []  # wall time of the warm-up steps (they include compilation under torch.compile)
    gc.collect()
    for i in range(spec["warmup"] + spec["steps"]):
        ids, labels = batches[i % 2]
        t0, c0 = time.perf_counter(), time.process_time()
        out = fwd(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        if wtaylor:
            weight_taylor_scores(linears, spec["heads"], acc)
        opt.zero_grad(set_to_none=True)
        if wtaylor:
            model.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.step()
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= spec["warmup"]:
            times.append(t1 - t0)
            cpu.append(c1 - c0)
        else:
            warm.append(t1 - t0)
    res: Dict[str, Any] = {
        "spec": spec,
        "times": times,
        "median_s": statistics.median(times),
        "cpu": cpu,
        "median_cpu_s": statistics.median(cpu),
        "warmup_s": warm,
        # compilation time: the warm-up steps beyond what they would take at the compiled speed
        "compile_s": max(0.0, sum(warm) - len(warm) * statistics.median(times)) if spec.get("compile", "none") != "none" else 0.0,
        "peak_rss_mib": peak_rss_mib(),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
    }
    if tracker is not None:
        res["state_bytes"] = tracker.state_bytes()
        res["tracked_channels"] = tracker.tracked_channels
        res["observed"] = tracker.observed_microbatches
    if wtaylor:
        res["state_bytes"] = sum(v.numel() * v.element_size() for v in acc.values())
        res["grad_bytes"] = sum(m.weight.numel() * m.weight.element_size() for _, m in linears) if spec["regime"] == "lora" else 0
    return res


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
