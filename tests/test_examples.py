"""The quick-start example runs and prints the blocks it promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_prints_top_and_bottom_blocks(capsys) -> None:
    scores = _load("quickstart").main(steps=4, accumulation=2)
    out = capsys.readouterr().out
    assert "step 4: reading published" in out
    assert "heads by outlier-aware density -- top:" in out and "neurons by outlier-aware density -- bottom:" in out
    assert scores.step == 4 and len(scores.head) == 3 * 4 and len(scores.neuron) == 3 * 128
    assert torch.isfinite(scores.head.density).all() and (scores.head.salience > 0).all()


def _run_example(name: str, *args: str) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _params(out: str) -> "tuple[int, int]":
    import re

    m = re.search(r"parameters ([\d,]+) -> ([\d,]+)", out)
    assert m is not None, out
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def test_prune_during_finetune_example_runs_short() -> None:
    out = _run_example("prune_during_finetune", "--steps", "40", "--start", "5", "--ramp", "15", "--alpha", "0.5")
    before, after = _params(out)
    assert after < before and "pruned: heads per layer" in out and "test accuracy masked" in out


def test_adaptive_lora_ranks_example_runs_short() -> None:
    out = _run_example("adaptive_lora_ranks", "--steps", "30", "--ramp", "20", "--growths", "2")
    assert out.count("LoRA parameters") == 2  # two growth events, printed when ranks grew
    before, after = _params(out.splitlines()[-1])
    assert after < before and "test accuracy" in out
