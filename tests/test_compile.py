"""The tracker under torch.compile: no graph break added, the eager scores, and every safety property.

Compiled runs are compared with eager runs of the same seed and scenario (the eager path is
checked against the brute-force oracle elsewhere). Most tests use the ``aot_eager`` backend
(the same graph capture and autograd as ``inductor``, without code generation); one uses
``inductor``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch

import apt_salience
from tests._models import ARCHS, make_batch, make_model
from tests.test_tracker_behaviour import scores_equal


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _lora(arch: str, layers: int) -> torch.nn.Module:
    import peft  # a test dependency: a missing peft must fail, not skip
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"]
    return peft.get_peft_model(make_model(arch, layers=layers), peft.LoraConfig(r=4, target_modules=targets))


def _model(case: str, layers: int) -> Tuple[torch.nn.Module, str]:
    if case.startswith("peft-"):
        arch = case.split("-", 1)[1]
        return _lora(arch, layers), arch
    return make_model(case, layers=layers), case


def _breaks(model: torch.nn.Module, inputs: Dict[str, torch.Tensor], ctx: Any = None) -> int:
    torch._dynamo.reset()
    with ctx if ctx is not None else contextlib.nullcontext():
        return int(torch._dynamo.explain(model)(**inputs).graph_break_count)


@pytest.mark.parametrize("case", ARCHS + ["peft-bert"])
def test_no_graph_break_is_added(case: str) -> None:
    layers = 2 if case in ("bert", "llama") else 1
    model, arch = _model(case, layers)
    inputs, mask = make_batch(arch, torch.Generator().manual_seed(0))
    alone = _breaks(model, inputs)
    tracker = apt_salience.attach(model)
    with_tracker = _breaks(model, inputs, tracker.token_mask(mask) if mask is not None else None)
    assert with_tracker == alone, f"{case}: {alone} graph breaks alone, {with_tracker} with the tracker"
    if case in ("bert", "llama"):
        assert alone == 0
    tracker.remove()


# ----------------------------------------------------------------------------- one scenario, eager vs compiled

def _scenario(model: torch.nn.Module, tracker: Any, arch: str, run: Callable[..., Any], *, steps: int = 4,
              micro: int = 2, poison_step: Optional[int] = None, stray_forward: bool = False,
              scaler: Any = None, optimizer: Any = None) -> List[apt_salience.SalienceScores]:
    """Steps of ``micro`` masked micro-batches; optionally one poisoned micro-batch, a forward whose
    backward never comes, a GradScaler. ``run`` is the (compiled or eager) model."""
    gen = torch.Generator().manual_seed(0)
    readings = []
    for step in range(steps):
        for m in range(micro):
            inputs, mask = make_batch(arch, gen)
            with tracker.token_mask(mask) if mask is not None else contextlib.nullcontext():
                loss = run(**inputs).loss
            if poison_step == step and m == 1:
                loss = loss * math.inf
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if stray_forward:
            inputs, mask = make_batch(arch, gen)
            with tracker.token_mask(mask) if mask is not None else contextlib.nullcontext():
                run(**inputs)  # gradient enabled, never backpropagated: not counted
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        model.zero_grad(set_to_none=True)
        if tracker.step():
            readings.append(tracker.scores())
    return readings


def _pair(case: str, layers: int, backend: str, config: Dict[str, Any], compile_kw: Optional[Dict[str, Any]] = None,
          prepare: Callable[[torch.nn.Module], None] = lambda m: None, **scenario: Any) -> Tuple[Any, Any, List, List]:
    runs = []
    for compiled in (False, True):
        model, arch = _model(case, layers)
        prepare(model)
        tracker = apt_salience.attach(model, config, scaler=scenario.get("scaler_factory", lambda: None)())
        sc = dict(scenario)
        factory = sc.pop("scaler_factory", None)
        if factory is not None:
            sc["scaler"] = tracker._obs.scaler
        opt_factory = sc.pop("optimizer_factory", None)
        if opt_factory is not None:
            sc["optimizer"] = opt_factory(model)
        run = torch.compile(model, backend=backend, **(compile_kw or {})) if compiled else model
        runs.append((tracker, _scenario(model, tracker, arch, run, **sc)))
        tracker.remove()
    (t_eager, r_eager), (t_comp, r_comp) = runs
    assert len(r_eager) == len(r_comp) > 0
    return t_eager, t_comp, r_eager, r_comp


def _same(r_eager: List, r_comp: List, rtol: float, kinds: Tuple[str, ...] = ("head", "neuron", "hidden")) -> None:
    for a, b in zip(r_eager, r_comp):
        scores_equal(a, b, rtol=rtol, kinds=kinds)


def test_compiled_scenario_equals_eager_with_every_safety_property() -> None:
    """Masks, accumulation, update_frequency 2, a poisoned micro-batch (dropped whole, counted), a forward
    whose gradient never comes (ignored), GradScaler with a growing scale (divided out)."""
    t_eager, t_comp, r_eager, r_comp = _pair(
        "bert", 1, "aot_eager", {"update_frequency": 2}, compile_kw={"fullgraph": True}, steps=4, poison_step=1,
        stray_forward=True,
        scaler_factory=lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1),
        optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    assert t_comp.dropped_microbatches == t_eager.dropped_microbatches == 1
    assert t_comp.observed_microbatches == t_eager.observed_microbatches == 7
    _same(r_eager, r_comp, rtol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fullgraph_training_steps_equal_eager(arch: str) -> None:
    """``torch.compile(model, fullgraph=True)`` trains (SGD) with the tracker attached: no host sync, no break."""
    t_eager, t_comp, r_eager, r_comp = _pair(
        arch, 2, "aot_eager", {"update_frequency": 2}, compile_kw={"fullgraph": True}, steps=4,
        optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.05))
    assert t_comp.observed_microbatches == 8
    _same(r_eager, r_comp, rtol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_compiled_gradient_checkpointing_counts_each_activation_once(reentrant: bool) -> None:
    def prepare(m: torch.nn.Module) -> None:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            m.enable_input_require_grads()
        m.train()

    plain = make_model("bert", layers=1)
    t_plain = apt_salience.attach(plain, {"update_frequency": 2})
    r_plain = _scenario(plain, t_plain, "bert", plain, steps=2)
    t_plain.remove()
    model = make_model("bert", layers=1)
    prepare(model)
    tracker = apt_salience.attach(model, {"update_frequency": 2})
    r_comp = _scenario(model, tracker, "bert", torch.compile(model, backend="aot_eager"), steps=2)
    assert tracker.observed_microbatches == t_plain.observed_microbatches == 4
    _same(r_plain, r_comp, rtol=1e-4)
    tracker.remove()


@pytest.mark.parametrize("case, config", [
    ("llama", {}), ("t5", {}), ("gpt2", {}), ("opt", {}), ("vit", {}), ("peft-llama", {}),
    ("bert", {"salience": {"mode": "taylor"}, "kurtosis": {"source": "output"}}),
    ("bert", {"salience": {"mode": "fisher"}, "kurtosis": {"excess": True, "combine": "scaled"}, "sample_every": 2}),
])
def test_compiled_presets_equal_eager(case: str, config: Dict[str, Any]) -> None:
    kinds: Tuple[str, ...] = ("head", "neuron", "hidden") + (("adapter",) if case.startswith("peft") else ())
    _, _, r_eager, r_comp = _pair(case, 1, "aot_eager", {"update_frequency": 2, **config}, steps=4 if config else 2)
    _same(r_eager, r_comp, rtol=1e-4, kinds=kinds)


def test_attach_to_an_already_compiled_model() -> None:
    model = make_model("bert", layers=1)
    compiled = torch.compile(model, backend="aot_eager")
    tracker = apt_salience.attach(compiled, {"update_frequency": 2})  # sites found under '_orig_mod.'
    r_comp = _scenario(model, tracker, "bert", compiled, steps=2)
    tracker.remove()
    eager = make_model("bert", layers=1)
    t_eager = apt_salience.attach(eager, {"update_frequency": 2})
    r_eager = _scenario(eager, t_eager, "bert", eager, steps=2)
    t_eager.remove()
    _same(r_eager, r_comp, rtol=1e-4)


def test_compiled_then_eager_on_one_tracker_equals_eager() -> None:
    """A run that leaves the compiled graph (a recompile limit, an evaluation in eager) keeps its statistics."""
    runs = []
    for mixed in (False, True):
        model = make_model("bert", layers=1)
        tracker = apt_salience.attach(model, {"update_frequency": 4})
        compiled = torch.compile(model, backend="aot_eager") if mixed else model
        gen = torch.Generator().manual_seed(0)
        for step in range(4):
            run = compiled if (mixed and step < 2) else model
            for _ in range(2):
                inputs, mask = make_batch("bert", gen)
                with tracker.token_mask(mask):
                    run(**inputs).loss.backward()
            model.zero_grad(set_to_none=True)
            tracker.step()
        runs.append(tracker.scores())
        tracker.remove()
    scores_equal(runs[0], runs[1], rtol=1e-4)


def test_traced_reductions_equal_eager_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU compiled graphs call the tracker's reduction operators; the traced whole-tensor
    expressions (what an accelerator's graph compiles) are exercised here on the CPU."""
    from apt_salience.tracker import kernels

    monkeypatch.setattr(kernels, "CPU_OPS", False)
    model = make_model("bert", layers=1)
    inputs, mask = make_batch("bert", torch.Generator().manual_seed(0))
    tracker = apt_salience.attach(model)
    assert _breaks(model, inputs, tracker.token_mask(mask)) == 0
    tracker.remove()
    _, _, r_eager, r_comp = _pair("bert", 1, "aot_eager", {"update_frequency": 2}, compile_kw={"fullgraph": True}, steps=2)
    _same(r_eager, r_comp, rtol=1e-4)


def test_reduction_operators_pass_opcheck() -> None:
    """The custom operators' shapes, dtypes and schemas are consistent (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(12, 5, generator=gen), torch.randn(12, 5, generator=gen)
    keep = torch.arange(12) % 3 != 0
    centre = torch.zeros(5)
    for flag in (torch.tensor(True), torch.tensor(False)):
        for order, abs_sum in ((4, True), (1, False), (0, True)):
            torch.library.opcheck(torch.ops.apt_salience.forward_sums.default, (x, centre, flag, keep, order, abs_sum))
    torch.library.opcheck(torch.ops.apt_salience.grad_abs_sum.default, (g, keep))
    torch.library.opcheck(torch.ops.apt_salience.grad_prod_sum.default, (x, g, None))


def test_inductor_publishes_the_eager_scores() -> None:
    _, _, r_eager, r_comp = _pair("bert", 1, "inductor", {"update_frequency": 2}, steps=2)
    _same(r_eager, r_comp, rtol=2e-3)


@pytest.mark.parametrize("decompose", [True, False])
def test_inductor_fuses_the_reductions_unless_told_not_to(monkeypatch: pytest.MonkeyPatch, decompose: bool) -> None:
    """Under inductor the reduction operators are decomposed into expressions that inductor fuses (its
    generated code calls no ``apt_salience`` operator); with ``INDUCTOR_DECOMPOSE = False`` they stay opaque."""
    from torch._inductor.utils import run_and_get_code

    from apt_salience.tracker import kernels

    monkeypatch.setattr(kernels, "INDUCTOR_DECOMPOSE", decompose)
    model = make_model("bert", layers=1)
    inputs, mask = make_batch("bert", torch.Generator().manual_seed(0))
    tracker = apt_salience.attach(model, {"kurtosis": {"enabled": True}})
    compiled = torch.compile(model, backend="inductor")

    def step() -> None:
        with tracker.token_mask(mask):
            compiled(**inputs).loss.backward()

    # no compiled-graph caches: they key on the captured graph, not on inductor's decomposition table
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    try:
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            _, code = run_and_get_code(step)
    finally:
        tracker.remove()
    source = "\n".join(code)
    assert source, "inductor generated no code"
    assert ("apt_salience" in source) is (not decompose)


_COMPILED_BEFORE = r"""
import torch, apt_salience
from apt_salience.tracker import kernels
from tests._models import make_batch, make_model

torch.compile(lambda t: (t * 2).sum(), backend="inductor")(torch.ones(3))  # inductor's tables are now cached
model = make_model("bert", layers=1)
inputs, mask = make_batch("bert", torch.Generator().manual_seed(0))
tracker = apt_salience.attach(model)
with tracker.token_mask(mask):
    torch.compile(model, backend="inductor")(**inputs).loss.backward()
tracker.step()
from torch._inductor.decomposition import select_decomp_table
assert torch.ops.apt_salience.forward_sums.default in select_decomp_table()
assert float(tracker.scores().head.salience.sum()) > 0
print("OK")
"""


def test_inductor_used_before_attaching_still_compiles_the_tracker(tmp_path: Any) -> None:
    """Inductor caches a copy of its decomposition table at its first compile; the tracker's decompositions,
    added later, must reach that copy (else inductor refuses an operator with a decomposition and a fallback)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", _COMPILED_BEFORE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
