"""Overhead of the apt_salience tracker on a BERT-base-shaped training step (CPU, fp32).

A script, not a test. Every variant runs in its own process (``benchmarks/_workload.py``);
processes are interleaved round by round (the order alternates between rounds), each reports
the median of its timed steps after warm-up, and a variant's ratio is taken against the
no-tracker process of the *same round*; the table shows the median ratio over rounds.
Peak memory is the process's peak RSS (``ru_maxrss``); the tracker's persistent state is
``tracker.state_bytes()``.

Usage (writes BENCHMARKS.md and benchmarks/results.json)::

    python benchmarks/overhead.py                 # everything (~45-60 min on 2 busy cores)
    python benchmarks/overhead.py --parts main --rounds 5 --extra-rounds 2
    python benchmarks/overhead.py --quick         # smoke run: 1 layer, 2 steps, 1 round

Parts: ``main`` (the budget table, both regimes), ``compiled`` (the same budget table with the model
under ``torch.compile``, default backend inductor, and the compile time), ``inproc`` (time inside the
hooks), ``ops`` (tensor operations per micro-batch), ``scaling`` (tokens per step and width),
``growth`` (1000 steps of a small model), ``compile`` (graph breaks, compiled scores, compile time of a tiny model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BUDGET_VARIANTS = ["none", "kurt_off", "kurt_on"]
EXTRA_VARIANTS = {"full": ["kurt_output", "weight_taylor"], "lora": ["kurt_output", "weight_taylor", "taylor_mode"]}
LABELS = {
    "none": "no tracker",
    "kurt_off": "tracker, kurtosis off",
    "kurt_on": "tracker, kurtosis on (activation moments)",
    "kurt_output": "tracker, kurtosis from outputs",
    "taylor_mode": "tracker, `salience.mode: taylor`",
    "weight_taylor": "weight-gradient Taylor (no tracker)",
}
BUDGET = {"kurt_off": 1.03, "kurt_on": 1.05}
RSS_BUDGET_MIB = 64.0


def base_spec(args: argparse.Namespace, **kw: Any) -> Dict[str, Any]:
    spec = dict(regime="full", variant="none", hidden=768, heads=12, ffn=3072, layers=args.layers,
                batch=8, seq=128, warmup=args.warmup, steps=args.steps, threads=1, compile="none")
    spec.update(kw)
    return spec


def run_one(spec: Dict[str, Any], log: List[str]) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(HERE / "_workload.py"), json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT))
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"benchmark process failed for {spec}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.time() - t0
    res["loadavg"] = os.getloadavg()[0]
    msg = (f"  {spec['regime']:4s} {spec['variant']:13s} L{spec['layers']} h{spec['hidden']} {spec['batch']}x{spec['seq']}: "
           f"median {res['median_s']*1e3:8.1f} ms (cpu {res['median_cpu_s']*1e3:8.1f})  rss {res['peak_rss_mib']:7.1f} MiB  load {res['loadavg']:.1f}")
    print(msg, flush=True)
    log.append(msg)
    return res


def interleaved(specs: List[Dict[str, Any]], rounds: int, log: List[str]) -> List[List[Dict[str, Any]]]:
    """``rounds`` rounds over ``specs``; the order alternates (ABC, CBA, ...) so drift cancels."""
    out = []
    for r in range(rounds):
        order = specs if r % 2 == 0 else list(reversed(specs))
        print(f" round {r + 1}/{rounds}", flush=True)
        res = {s["variant"] + "/" + s["regime"] + f"/{s['hidden']}/{s['batch']}x{s['seq']}": run_one(s, log) for s in order}
        out.append([res[s["variant"] + "/" + s["regime"] + f"/{s['hidden']}/{s['batch']}x{s['seq']}"] for s in specs])
    return out


def summarise(rounds: List[List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per variant: median step time, ratios to the same round's baseline, RSS deltas, state bytes."""
    by: Dict[str, List[Dict[str, Any]]] = {}
    base: List[Dict[str, Any]] = []
    for rnd in rounds:
        b = next(r for r in rnd if r["spec"]["variant"] == "none")
        base.append(b)
        for r in rnd:
            r["ratio"] = r["median_s"] / b["median_s"]
            r["cpu_ratio"] = r["median_cpu_s"] / b["median_cpu_s"]
            r["rss_delta_mib"] = r["peak_rss_mib"] - b["peak_rss_mib"]
            by.setdefault(r["spec"]["variant"], []).append(r)
    out = {}
    for v, rs in by.items():
        out[v] = {
            "n": len(rs),
            "median_ms": statistics.median(r["median_s"] for r in rs) * 1e3,
            "median_cpu_ms": statistics.median(r["median_cpu_s"] for r in rs) * 1e3,
            "cpu_ratio": statistics.median(r["cpu_ratio"] for r in rs),
            "cpu_ratio_min": min(r["cpu_ratio"] for r in rs),
            "cpu_ratio_max": max(r["cpu_ratio"] for r in rs),
            "cpu_ratios": [round(r["cpu_ratio"], 4) for r in rs],
            "ratio": statistics.median(r["ratio"] for r in rs),
            "ratio_min": min(r["ratio"] for r in rs),
            "ratio_max": max(r["ratio"] for r in rs),
            "rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
            "rss_delta_mib": statistics.median(r["rss_delta_mib"] for r in rs),
            "rss_delta_max_mib": max(r["rss_delta_mib"] for r in rs),
            "state_bytes": rs[0].get("state_bytes"),
            "tracked_channels": rs[0].get("tracked_channels"),
            "grad_bytes": rs[0].get("grad_bytes"),
            "ratios": [round(r["ratio"], 4) for r in rs],
            "compile_s": statistics.median(r.get("compile_s", 0.0) for r in rs),
            "compile_s_all": [round(r.get("compile_s", 0.0), 1) for r in rs],
        }
    return out


def part_main(args: argparse.Namespace, log: List[str], compile_backend: str = "none") -> Dict[str, Any]:
    res: Dict[str, Any] = {}
    for regime in args.regimes.split(","):
        print(f"[main] regime {regime} compile {compile_backend}", flush=True)
        extra_kw: Dict[str, Any] = {}
        if compile_backend != "none":  # the warm-up steps compile (two graphs: the first forward and the rest)
            extra_kw = dict(compile=compile_backend, warmup=max(args.warmup, args.compile_warmup))
        specs = [base_spec(args, regime=regime, variant=v, **extra_kw) for v in BUDGET_VARIANTS]
        rounds = interleaved(specs, args.rounds if compile_backend == "none" else args.compile_rounds, log)
        if args.extra_rounds and compile_backend == "none":
            extra = [base_spec(args, regime=regime, variant=v) for v in ["none"] + EXTRA_VARIANTS[regime]]
            rounds_x = interleaved(extra, args.extra_rounds, log)
        else:
            rounds_x = []
        summ = summarise(rounds)
        if rounds_x:
            sx = summarise(rounds_x)
            for v in EXTRA_VARIANTS[regime]:
                summ[v] = sx[v]
        res[regime] = {"summary": summ, "rounds": rounds, "extra_rounds": rounds_x}
    return res


def part_scaling(args: argparse.Namespace, log: List[str]) -> Dict[str, Any]:
    L = args.scaling_layers
    configs = [
        ("tokens 1x (8x128)", dict(batch=8, seq=128)),
        ("tokens 4x (32x128)", dict(batch=32, seq=128)),
        ("tokens 16x (128x128)", dict(batch=128, seq=128)),
        ("hidden 384 (6 heads, FFN 1536)", dict(hidden=384, heads=6, ffn=1536)),
        ("hidden 1024 (16 heads, FFN 4096)", dict(hidden=1024, heads=16, ffn=4096)),
    ]
    if args.quick:
        configs = configs[:2]
    out = {}
    for name, kw in configs:
        print(f"[scaling] {name}", flush=True)
        specs = [base_spec(args, layers=L, warmup=args.scaling_warmup, steps=args.scaling_steps, variant=v, **kw)
                 for v in BUDGET_VARIANTS]
        rounds = interleaved(specs, args.scaling_rounds, log)
        out[name] = {"summary": summarise(rounds), "spec": specs[0], "tokens": specs[0]["batch"] * specs[0]["seq"]}
    return out


def part_child(kind: str, args: argparse.Namespace) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE / "_checks.py"), kind] + (["--quick"] if args.quick else []),
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{kind} check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}; torch.set_num_threads(1) in every process; no GPU (no device machine is "
            "lent to this task, so there are no GPU figures)")


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    if b >= 1 << 20:
        return f"{b / (1 << 20):.2f} MiB"
    return f"{b / 1024:.1f} KiB"


def render(results: Dict[str, Any], args: argparse.Namespace, command: str) -> str:
    lines: List[str] = []
    w = lines.append
    w("# apt_salience benchmarks: tracker overhead\n")
    w(f"- Date: {results['date']}")
    w(f"- Machine: {results['machine']}")
    w(f"- Load average (1 min) during the runs: {results['load']}")
    w(f"- Command: `{command}`")
    w(f"- Workload: BERT-base-shaped `BertForSequenceClassification` built from config (hidden 768, 12 heads, FFN 3072), "
      f"{args.layers} layers, batch 8 x sequence 128, fp32, AdamW, eager attention; LoRA regime: PEFT LoRA r=8 on "
      "query/value, base weights frozen. Each variant in its own process; processes interleaved round by round "
      "(order reversed every other round); per process the median of "
      f"{args.steps} steps after {args.warmup} warm-up steps; ratio = variant median / no-tracker median of the same "
      "round, then the median over rounds (min-max in brackets). A step = forward, backward, optimizer step, "
      "zero_grad and `tracker.step()` (which publishes a reading every step: `update_frequency: 1`). "
      "The budget verdict uses the **CPU-time** ratio (`time.process_time()` per step, one thread): the 2 cores "
      "were shared with colleagues' test runs, which made wall-clock times wait up to 6x their compute; "
      "wall-time ratios are shown next to it.")
    w("- GPU: no device machine was lent to this task (checked with the device tool: not drawn), so every figure "
      "here is CPU.\n")
    if "main" in results:
        w("## Budget table\n")
        w(f"Budget: kurtosis off <= {BUDGET['kurt_off']}x, kurtosis on <= {BUDGET['kurt_on']}x, peak RSS <= "
          f"+{RSS_BUDGET_MIB:.0f} MiB, state <= 64 B per tracked channel.\n")
        w("| regime | variant | rounds | step wall / CPU (ms) | CPU-time ratio (min-max) | wall-time ratio (min-max) | peak RSS (MiB) | RSS vs none (MiB, max) | tracker state | B/channel | budget |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for regime in [r for r in ("full", "lora") if r in results["main"]]:
            summ = results["main"][regime]["summary"]
            for v in BUDGET_VARIANTS + EXTRA_VARIANTS[regime]:
                if v not in summ:
                    continue
                s = summ[v]
                bpc = (s["state_bytes"] / s["tracked_channels"]) if s.get("tracked_channels") else None
                verdict = "-"
                if v in BUDGET:
                    ok = s["cpu_ratio"] <= BUDGET[v] and s["rss_delta_mib"] <= RSS_BUDGET_MIB and (bpc is None or bpc <= 64)
                    verdict = "met" if ok else "**not met**"
                state = fmt_bytes(s["state_bytes"]) if v != "none" else "-"
                if v == "weight_taylor":
                    state = f"{fmt_bytes(s['state_bytes'])} scores" + (
                        f" + {fmt_bytes(s['grad_bytes'])} base-weight gradients" if s.get("grad_bytes") else "")
                w(f"| {'full fine-tuning' if regime == 'full' else 'LoRA q,v'} | {LABELS[v]} | {s['n']} | "
                  f"{s['median_ms']:.0f} / {s['median_cpu_ms']:.0f} | "
                  f"{s['cpu_ratio']:.3f} ({s['cpu_ratio_min']:.3f}-{s['cpu_ratio_max']:.3f}) | "
                  f"{s['ratio']:.3f} ({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) | "
                  f"{s['rss_mib']:.0f} | {s['rss_delta_mib']:+.1f} ({s['rss_delta_max_mib']:+.1f}) | {state} | "
                  f"{'-' if bpc is None else f'{bpc:.1f}'} | {verdict} |")
        w("")
        w("Per-round ratios (the raw pairs):\n")
        for regime in [r for r in ("full", "lora") if r in results["main"]]:
            summ = results["main"][regime]["summary"]
            for v, s in summ.items():
                if v != "none":
                    w(f"- {regime} / {v}: CPU {s['cpu_ratios']}; wall {s['ratios']}")
        w("")
    if "main_earlier" in results:
        w("Earlier run of the same variants (replaced above by a later re-run; kept for comparison):\n")
        w("| regime | variant | rounds | CPU-time ratio (min-max) | wall-time ratio (min-max) | RSS vs none (MiB, max) |")
        w("|---|---|---|---|---|---|")
        for regime, vs in results["main_earlier"].items():
            for v, s in vs.items():
                if v == "none":
                    continue
                w(f"| {regime} | {LABELS[v]} | {s['n']} | {s['cpu_ratio']:.3f} ({s['cpu_ratio_min']:.3f}-"
                  f"{s['cpu_ratio_max']:.3f}) | {s['ratio']:.3f} ({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) | "
                  f"{s['rss_delta_mib']:+.1f} ({s['rss_delta_max_mib']:+.1f}) |")
        w("")
    if "compiled" in results:
        w("## Compiled: `torch.compile(model)` (inductor, CPU)\n")
        w(f"The same workload and budget with the model compiled by `torch.compile` (backend inductor, one CPU "
          f"thread); {args.compile_warmup} warm-up steps compile, the timed steps run the compiled graphs; the "
          "compile time is the warm-up time beyond what those steps take compiled. Ratios: variant / no tracker of "
          "the same round, median over interleaved rounds in fresh processes (CPU time).\n")
        w("| regime | variant | rounds | step CPU (ms) | CPU-time ratio (min-max) | wall-time ratio | compile time (s, per round) | budget |")
        w("|---|---|---|---|---|---|---|---|")
        for regime in [r for r in ("full", "lora") if r in results["compiled"]]:
            summ = results["compiled"][regime]["summary"]
            for v in BUDGET_VARIANTS:
                if v not in summ:
                    continue
                s = summ[v]
                verdict = "-" if v not in BUDGET else ("met" if s["cpu_ratio"] <= BUDGET[v] else "**not met**")
                w(f"| {'full fine-tuning' if regime == 'full' else 'LoRA q,v'} | {LABELS[v]} | {s['n']} | "
                  f"{s['median_cpu_ms']:.0f} | {s['cpu_ratio']:.3f} ({s['cpu_ratio_min']:.3f}-{s['cpu_ratio_max']:.3f}) | "
                  f"{s['ratio']:.3f} | {s['compile_s']:.0f} ({', '.join(str(x) for x in s['compile_s_all'])}) | {verdict} |")
        w("")
    if "ops" in results:
        w("## Tensor operations per micro-batch\n")
        w("Counted with a `TorchDispatchMode` around each part of the tracker (eager, tiny BERT, 4 x 16 tokens with "
          "a padding mask, 8 micro-batches per step); a GPU pays one kernel launch per operation.\n")
        w("| layers | sites (probes) | forward hooks | gradient hooks | commit | close step | total |")
        w("|---|---|---|---|---|---|---|")
        for row in results["ops"]["rows"]:
            parts = [row.get(k, 0.0) for k in ("forward hooks", "gradient hooks", "commit", "close step")]
            w(f"| {row['layers']} | {row['sites']} ({row['probes']}) | " + " | ".join(f"{x:.0f}" for x in parts)
              + f" | {sum(parts):.0f} |")
        w("")
    if "inproc" in results:
        w("## Time inside the tracker (same processes, measured around the hooks)\n")
        w("Paired in one process, so the colleagues' load affects both sides alike: the wall time spent in the "
          "tracker's forward hooks, gradient hooks and `step()` as a share of the step.\n")
        w("| regime | variant | step (ms) | forward hooks (ms) | gradient hooks (ms) | step() (ms) | share |")
        w("|---|---|---|---|---|---|---|")
        for row in results["inproc"]:
            w(f"| {row['regime']} | {LABELS[row['variant']]} | {row['step_ms']:.0f} | {row['fwd_ms']:.1f} | "
              f"{row['bwd_ms']:.1f} | {row['step_fn_ms']:.1f} | {100 * row['share']:.2f}% |")
        w("")
    if "scaling" in results:
        w("## Scaling\n")
        w(f"{args.scaling_layers} encoder layer(s), full fine-tuning, {args.scaling_steps} timed steps after "
          f"{args.scaling_warmup} warm-up, {args.scaling_rounds} interleaved round(s) per row (fewer steps than the "
          "budget table to fit the 16x row in the time available; read the trend, not the third digit). "
          "Tokens scale with the batch at sequence 128 (attention cost per token constant).\n")
        w("| configuration | tokens/step | no tracker (ms) | kurtosis off: CPU (wall) ratio | kurtosis on: CPU (wall) ratio | RSS vs none, off / on (MiB) | state bytes (off / on) |")
        w("|---|---|---|---|---|---|---|")
        for name, r in results["scaling"].items():
            s = r["summary"]
            w(f"| {name} | {r['tokens']} | {s['none']['median_ms']:.0f} | {s['kurt_off']['cpu_ratio']:.3f} ({s['kurt_off']['ratio']:.3f}) | "
              f"{s['kurt_on']['cpu_ratio']:.3f} ({s['kurt_on']['ratio']:.3f}) | {s['kurt_off']['rss_delta_mib']:+.1f} / {s['kurt_on']['rss_delta_mib']:+.1f} | "
              f"{s['kurt_off']['state_bytes']} / {s['kurt_on']['state_bytes']} |")
        w("")
    if "growth" in results:
        g = results["growth"]
        w("## Memory over many steps\n")
        w(f"{g['desc']}\n")
        w(f"- tracker state bytes after step {g['first_step']}: {g['state_first']}; after step {g['steps']}: {g['state_last']}")
        w(f"- live tensor bytes reachable by the garbage collector: {g['live_first']} -> {g['live_last']}")
        w(f"- RSS: {g['rss_first_mib']:.1f} MiB -> {g['rss_last_mib']:.1f} MiB (peak {g['rss_peak_mib']:.1f} MiB)")
        w(f"- bytes per tracked channel: {g['bytes_per_channel']:.1f} (kurtosis on), state independent of batch x "
          f"sequence: {g['state_by_tokens']}\n")
    if "compile" in results:
        c = results["compile"]
        w("## torch.compile\n")
        for line in c["lines"]:
            w(f"- {line}")
        w("")
    w("## Log\n")
    w("```")
    lines.extend(results.get("log", []))
    w("```")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="main,compiled,inproc,ops,scaling,growth,compile")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--extra-rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scaling-layers", type=int, default=1)
    ap.add_argument("--scaling-steps", type=int, default=4)
    ap.add_argument("--scaling-warmup", type=int, default=1)
    ap.add_argument("--scaling-rounds", type=int, default=1)
    ap.add_argument("--regimes", default="full,lora")
    ap.add_argument("--compile-backend", default="inductor", help="backend of the 'compiled' part")
    ap.add_argument("--compile-rounds", type=int, default=3)
    ap.add_argument("--compile-warmup", type=int, default=3)
    ap.add_argument("--merge", nargs="+", help="only render BENCHMARKS.md from these results JSON files "
                    "(written by earlier runs with --json, e.g. parts run in parallel)")
    ap.add_argument("--quick", action="store_true", help="smoke run (1 layer, 2 steps, 1 round)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(HERE / "results.json"))
    args = ap.parse_args()
    if args.quick:
        args.layers, args.rounds, args.extra_rounds, args.steps, args.warmup = 1, 1, 1, 2, 1
        args.compile_rounds = 1
        args.scaling_steps, args.scaling_warmup = 1, 1
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
    if args.merge:
        merged: Dict[str, Any] = {}
        cmds = []
        for path in args.merge:
            part = json.loads(Path(path).read_text())
            cmds.append(part.get("command", "?"))
            for k, v in part.items():
                if k == "main":
                    # a later file's variants replace an earlier file's (e.g. a quieter re-run of the budget
                    # variants); the replaced figures are kept under "main_earlier" and shown too
                    for regime, r in v.items():
                        cur = merged.setdefault("main", {}).setdefault(regime, {"summary": {}})
                        for var, summ in r["summary"].items():
                            if var in cur["summary"]:
                                merged.setdefault("main_earlier", {}).setdefault(regime, {})[var] = cur["summary"][var]
                            cur["summary"][var] = summ
                elif k == "log":
                    merged.setdefault("log", []).extend(v)
                elif k == "loads":
                    merged.setdefault("loads", []).extend(v)
                elif k not in merged or k in ("inproc", "scaling", "growth", "compile", "compiled", "ops"):
                    merged[k] = v
            stored = argparse.Namespace(**part["args"])
            if "main" in part:
                for key in ("layers", "rounds", "extra_rounds", "steps", "warmup"):
                    setattr(args, key, getattr(stored, key))
            if "compiled" in part:
                for key in ("compile_rounds", "compile_warmup", "compile_backend"):
                    if key in part["args"]:
                        setattr(args, key, part["args"][key])
            if "scaling" in part:
                for key in ("scaling_layers", "scaling_steps", "scaling_warmup", "scaling_rounds"):
                    setattr(args, key, getattr(stored, key))
        loads = merged.get("loads", [])
        merged["load"] = (f"{min(loads):.1f}-{max(loads):.1f} (2 cores shared with colleagues' test runs)" if loads else "n/a")
        Path(args.out).write_text(render(merged, args, " ; ".join(cmds) + " ; then " + command))
        print(f"wrote {args.out}")
        return
    parts = args.parts.split(",")
    log: List[str] = []
    loads: List[float] = []
    results: Dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "machine": machine(), "args": vars(args)}
    t0 = time.time()
    if "main" in parts:
        results["main"] = part_main(args, log)
    if "compiled" in parts:
        results["compiled"] = part_main(args, log, compile_backend=args.compile_backend)
    if "ops" in parts:
        results["ops"] = part_child("ops", args)
    if "inproc" in parts:
        results["inproc"] = part_child("inproc", args)["rows"]
    if "scaling" in parts:
        results["scaling"] = part_scaling(args, log)
    if "growth" in parts:
        results["growth"] = part_child("growth", args)
    if "compile" in parts:
        results["compile"] = part_child("compile", args)
    loads = [float(m.rsplit("load ", 1)[1]) for m in log if "load " in m]
    results["load"] = (f"{min(loads):.1f}-{max(loads):.1f} (2 cores shared with colleagues' test runs)" if loads else "n/a")
    results["loads"] = loads
    results["command"] = command
    results["log"] = log + [f"total wall time {time.time() - t0:.0f} s"]
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    Path(args.out).write_text(render(results, args, command))
    print(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
    main()
