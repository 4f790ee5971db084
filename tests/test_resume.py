"""Checkpoint and resume: k steps, save to files, a new process loads them and runs N - k steps.

The resumed scores must equal N steps of one uninterrupted run (same data order). The model and
its optimizer are saved and restored with the tracker, as a training script would do. The run
resumes in the middle of a window (update_frequency 3, k = 4) with gradient accumulation, so the
open window, the moments and the EMA all have to travel through the file.

This file is also the script the new process runs: ``python test_resume.py resume DIR K N THREADS``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apt_salience

N_STEPS, K_STEPS, MICRO = 8, 4, 2
CONFIG: Dict[str, Any] = {
    "architecture": "custom",
    "sites": {"heads": r"blocks\.\d+\.o", "neurons": r"blocks\.\d+\.down", "head_dim": 4},
    "update_frequency": 3,
    "ema_beta": 0.85,
}
FIELDS = ("salience", "kurtosis", "outlier_aware", "density")


class Block(nn.Module):
    def __init__(self, d: int = 16, ff: int = 32):
        super().__init__()
        self.o = nn.Linear(d, d)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.o(torch.tanh(x))
        return h + self.down(F.gelu(self.up(h)))


class Net(nn.Module):
    def __init__(self, layers: int = 2, ff: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(Block(16, ff) for _ in range(layers))
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h.mean(1))


def _micro(step: int, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + i)
    x = torch.randn(4, 5, 6, generator=g) * 2 + 1  # mean != 0: the moments' shift matters
    return x, torch.randint(0, 3, (4,), generator=g)


def _run(model: nn.Module, opt: torch.optim.Optimizer, tracker: apt_salience.SalienceTracker,
         start: int, stop: int) -> List[bool]:
    published = []
    for step in range(start, stop):
        for i in range(MICRO):
            x, y = _micro(step, i)
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        published.append(tracker.step())
    return published


def _fresh(seed: int = 0) -> Tuple[nn.Module, torch.optim.Optimizer, apt_salience.SalienceTracker]:
    model = Net(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, apt_salience.attach(model, CONFIG)


def _resume_main(folder: str, k: int, n: int) -> None:
    """The new process: fresh model (other init), fresh tracker, load the three files, run k..n."""
    d = Path(folder)
    model, opt, tracker = _fresh(seed=123)
    model.load_state_dict(torch.load(d / "model.pt"))
    opt.load_state_dict(torch.load(d / "optim.pt"))
    tracker.load_state_dict(torch.load(d / "tracker.pt"))
    assert tracker.steps == k
    published = _run(model, opt, tracker, k, n)
    tracker.scores().save(d / "resumed_scores.json")
    (d / "resumed_published.json").write_text(json.dumps(published))
    tracker.detach()


# ---------------------------------------------------------------------------------------------- tests


def _compare(got: Dict[str, Any], ref: Dict[str, Any], rtol: float) -> None:
    assert got["step"] == ref["step"]
    for kind in ("head", "neuron", "hidden"):
        assert got[kind]["sites"] == ref[kind]["sites"]
        for f in FIELDS:
            g, r = torch.tensor(got[kind][f], dtype=torch.float64), torch.tensor(ref[kind][f], dtype=torch.float64)
            assert r.abs().sum() > 0, (kind, f)
            torch.testing.assert_close(g, r, rtol=rtol, atol=0.0, msg=f"{kind}.{f}")


def test_resume_in_a_new_process_equals_one_uninterrupted_run(tmp_path: Path) -> None:
    model, opt, tracker = _fresh()
    ref_published = _run(model, opt, tracker, 0, N_STEPS)
    ref = tracker.scores().to_dict()
    tracker.detach()
    assert ref_published == [False, False, True, False, False, True, False, False]

    model, opt, tracker = _fresh()
    first = _run(model, opt, tracker, 0, K_STEPS)
    assert first == ref_published[:K_STEPS]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    torch.save(tracker.state_dict(), tmp_path / "tracker.pt")
    tracker.detach()

    proc = subprocess.run([sys.executable, __file__, "resume", str(tmp_path), str(K_STEPS), str(N_STEPS),
                           str(torch.get_num_threads())],  # same intra-op threads as this process
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "resumed_published.json").read_text()) == ref_published[K_STEPS:]
    got = json.loads((tmp_path / "resumed_scores.json").read_text())
    _compare(got, ref, rtol=0.0)  # bitwise: same operations in the same order

    # guard: without the tracker state, the same N - k steps give other scores
    model, opt, fresh_tracker = _fresh()
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    opt.load_state_dict(torch.load(tmp_path / "optim.pt"))
    _run(model, opt, fresh_tracker, K_STEPS, N_STEPS)
    other = fresh_tracker.scores().to_dict()
    fresh_tracker.detach()
    assert not torch.allclose(torch.tensor(other["head"]["salience"]), torch.tensor(ref["head"]["salience"]), rtol=1e-3)


def test_state_roundtrip_keeps_published_scores_and_counters() -> None:
    model, opt, tracker = _fresh()
    _run(model, opt, tracker, 0, 4)
    state = tracker.state_dict()
    before = tracker.scores().to_dict()
    tracker.detach()
    model2, _, tracker2 = _fresh(seed=5)
    tracker2.load_state_dict(state)
    assert tracker2.steps == 4
    assert tracker2.scores().to_dict() == before  # readable at once after loading
    assert tracker2.observed_microbatches == 4 * MICRO
    assert tracker2.dropped_microbatches == 0
    assert state["config"]["update_frequency"] == 3
    assert isinstance(state["fingerprint"], str) and state["fingerprint"]
    tracker2.detach()


def _state_of(model: nn.Module) -> Dict[str, Any]:
    tracker = apt_salience.attach(model, CONFIG)
    x, y = _micro(0, 0)
    F.cross_entropy(model(x), y).backward()
    tracker.step()
    state = tracker.state_dict()
    tracker.detach()
    return state


def test_loading_into_a_model_with_more_layers_names_the_first_mismatch() -> None:
    state = _state_of(Net(layers=2))
    tracker = apt_salience.attach(Net(layers=3), CONFIG)
    try:
        with pytest.raises(apt_salience.TrackerStateError, match=r"blocks\.2\.o") as info:
            tracker.load_state_dict(state)
        assert "the state has no further site" in str(info.value)
        assert tracker.steps == 0  # nothing was loaded
    finally:
        tracker.detach()


def test_loading_into_a_model_with_other_widths_names_the_first_mismatch() -> None:
    state = _state_of(Net(layers=2, ff=32))
    tracker = apt_salience.attach(Net(layers=2, ff=24), CONFIG)
    try:
        with pytest.raises(apt_salience.TrackerStateError) as info:
            tracker.load_state_dict(state)
        msg = str(info.value)
        assert "blocks.0.down:in" in msg and "24 channels" in msg and "32 channels" in msg
    finally:
        tracker.detach()


def test_loading_with_another_config_warns_and_keeps_the_trackers_config() -> None:
    state = _state_of(Net())
    tracker = apt_salience.attach(Net(), {**CONFIG, "update_frequency": 5})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker.load_state_dict(state)
        msgs = [str(w.message) for w in caught if issubclass(w.category, apt_salience.SalienceWarning)]
        assert any("update_frequency (3 -> 5)" in m for m in msgs), msgs
        assert tracker.config.update_frequency == 5
    finally:
        tracker.detach()


def test_loading_an_open_window_from_another_world_size_warns() -> None:
    state = _state_of(Net())  # one step of a 3-step window: the window is open
    assert state["world_size"] == 1 and float(state["counters"]["win_steps"]) == 1.0
    state["world_size"] = 2  # as saved by one rank of a two-process run
    tracker = apt_salience.attach(Net(), CONFIG)
    try:
        with pytest.warns(apt_salience.SalienceWarning, match="saved by a run with 2 process"):
            tracker.load_state_dict(state)
        assert tracker.steps == 1
    finally:
        tracker.detach()


def test_loading_something_else_is_a_clear_error() -> None:
    tracker = apt_salience.attach(Net(), CONFIG)
    try:
        with pytest.raises(apt_salience.TrackerStateError, match="not an apt_salience tracker state"):
            tracker.load_state_dict({"weights": torch.zeros(3)})
    finally:
        tracker.detach()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "resume":
        torch.set_num_threads(int(sys.argv[5]))
        _resume_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} resume DIR K N THREADS")
