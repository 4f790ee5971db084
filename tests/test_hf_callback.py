"""SalienceCallback in a real transformers.Trainer (CPU, tiny BERT from a config, no downloads).

Run A: 6 optimizer steps, gradient_accumulation_steps=2, update_frequency 2, checkpoints at steps
3 and 6 (step 3 is in the middle of a window). Run B: a fresh model, callback and Trainer resume
from A's checkpoint-3 and finish the 6 steps; its final scores must equal A's.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

import apt_salience
import transformers
from apt_salience.integrations.huggingface import STATE_FILE, SalienceCallback
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

MAX_STEPS, SAVE_STEPS, ACCUM, BATCH = 6, 3, 2, 2
TRACK = {"update_frequency": 2}
FIELDS = ("salience", "kurtosis", "outlier_aware", "density")


def _model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2))


def _data() -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(1, 100, (8,), generator=g), "labels": torch.tensor(i % 2)} for i in range(16)]


def _args(out: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, learning_rate=1e-3, save_strategy="steps", save_steps=SAVE_STEPS,
        logging_strategy="steps", logging_steps=1000,  # only the readings make the Trainer log
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )


def _train(out: Path, seed: int, resume: Any = None) -> Tuple[Trainer, SalienceCallback]:
    callback = SalienceCallback(TRACK)
    trainer = Trainer(model=_model(seed), args=_args(out), train_dataset=_data(), callbacks=[callback])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("hf")
    trainer_a, cb_a = _train(out, seed=0)
    result: Dict[str, Any] = {"out": out, "a": (trainer_a, cb_a)}
    result["a_scores"] = cb_a.tracker.scores() if cb_a.tracker is not None else None
    trainer_b, cb_b = _train(out, seed=99, resume=str(out / f"checkpoint-{SAVE_STEPS}"))
    result["b"] = (trainer_b, cb_b)
    return result


def _salience_logs(trainer: Trainer) -> Dict[int, Dict[str, float]]:
    return {e["step"]: e for e in trainer.state.log_history if any(k.startswith("salience/") for k in e)}


def test_one_tracker_step_per_optimizer_step(runs: Dict[str, Any]) -> None:
    trainer, cb = runs["a"]
    assert trainer.state.global_step == MAX_STEPS
    assert cb.tracker is not None and cb.tracker.steps == MAX_STEPS
    assert cb.tracker.observed_microbatches == MAX_STEPS * ACCUM  # every micro-batch, committed once
    assert runs["a_scores"].step == MAX_STEPS
    assert not cb.tracker.attached  # the callback detaches the tracker it attached
    assert not any(m._forward_hooks for m in trainer.model.modules())


def test_scalars_are_logged_at_every_reading(runs: Dict[str, Any]) -> None:
    trainer, _ = runs["a"]
    logs = _salience_logs(trainer)
    assert sorted(logs) == [2, 4, 6]  # update_frequency 2: readings at steps 2, 4, 6
    last = logs[6]
    scores = runs["a_scores"]
    for kind in ("head", "neuron", "hidden"):
        blocks = getattr(scores, kind)
        assert last[f"salience/{kind}/mean_outlier_aware"] == pytest.approx(float(blocks.outlier_aware.double().mean()), rel=1e-6)
        assert last[f"salience/{kind}/mean_salience"] == pytest.approx(float(blocks.salience.double().mean()), rel=1e-6)
        share = sum(1 for v in blocks.salience.tolist() if v <= 1e-3 * sum(blocks.salience.tolist()) / len(blocks))
        assert last[f"salience/{kind}/near_zero_share"] == pytest.approx(share / len(blocks))
    assert "loss" in last  # the Trainer's own log entry, extended


def test_tracker_state_is_saved_in_every_checkpoint(runs: Dict[str, Any]) -> None:
    out: Path = runs["out"]
    for step in (SAVE_STEPS, MAX_STEPS):
        state = torch.load(out / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert state["steps"] == step
    mid = torch.load(out / f"checkpoint-{SAVE_STEPS}" / STATE_FILE, weights_only=True)
    assert float(mid["counters"]["win_steps"]) == 1.0  # saved with an open window


def test_resumed_run_ends_with_the_uninterrupted_runs_scores(runs: Dict[str, Any]) -> None:
    trainer_b, cb_b = runs["b"]
    assert cb_b.loaded_from == str(runs["out"] / f"checkpoint-{SAVE_STEPS}")
    assert trainer_b.state.global_step == MAX_STEPS
    assert cb_b.tracker is not None and cb_b.tracker.steps == MAX_STEPS
    a, b = runs["a_scores"].to_dict(), cb_b.tracker.scores().to_dict()
    assert b["step"] == a["step"] == MAX_STEPS
    for kind in ("head", "neuron", "hidden"):
        for f in FIELDS:
            ta, tb = torch.tensor(a[kind][f], dtype=torch.float64), torch.tensor(b[kind][f], dtype=torch.float64)
            assert ta.abs().sum() > 0
            torch.testing.assert_close(tb, ta, rtol=1e-5, atol=0.0, msg=f"{kind}.{f}")
    assert sorted(_salience_logs(trainer_b)) == [2, 4, 6]  # 2 from the restored history, 4 and 6 new


def _short_run(out: Path, data: List[Dict[str, torch.Tensor]], mask_padding: bool) -> Dict[str, Any]:
    callback = SalienceCallback({"update_frequency": 1}, mask_padding=mask_padding)
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, learning_rate=1e-3, save_strategy="no",
                             logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=_model(0), args=args, train_dataset=data, callbacks=[callback])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    assert callback.tracker is not None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in trainer.model.modules())  # all removed
    return callback.tracker.scores().to_dict()


def test_mask_padding_excludes_padding_tokens(tmp_path: Path) -> None:
    plain = [{**d, "attention_mask": torch.ones(8, dtype=torch.long)} for d in _data()]
    padded = [{"input_ids": torch.cat([d["input_ids"], torch.zeros(4, dtype=torch.long)]),
               "attention_mask": torch.cat([torch.ones(8, dtype=torch.long), torch.zeros(4, dtype=torch.long)]),
               "labels": d["labels"]} for d in _data()]
    ref = _short_run(tmp_path / "plain", plain, mask_padding=True)
    masked = _short_run(tmp_path / "masked", padded, mask_padding=True)
    unmasked = _short_run(tmp_path / "unmasked", padded, mask_padding=False)
    for kind in ("head", "neuron", "hidden"):
        for f in FIELDS:
            r = torch.tensor(ref[kind][f], dtype=torch.float64)
            torch.testing.assert_close(torch.tensor(masked[kind][f], dtype=torch.float64), r, rtol=1e-4,
                                       atol=1e-6 * float(r.abs().max()), msg=f"{kind}.{f}")
    # guard: without the mask the padding tokens' activations enter |H| and the moments
    assert not torch.allclose(torch.tensor(unmasked["head"]["salience"]), torch.tensor(ref["head"]["salience"]),
                              rtol=1e-2)


def test_resume_without_a_tracker_state_warns(tmp_path: Path) -> None:
    callback = SalienceCallback(TRACK)
    args = _args(tmp_path)
    state = transformers.TrainerState()
    state.global_step = 3
    with pytest.warns(apt_salience.SalienceWarning, match="no tracker state"):
        callback.on_train_begin(args, state, transformers.TrainerControl(), model=_model())
    assert callback.loaded_from is None and callback.tracker is not None and callback.tracker.steps == 0
    callback.tracker.detach()


def test_remove_takes_the_callbacks_hooks_off_and_is_idempotent(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    def hooks(m: torch.nn.Module) -> int:
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

    model = _model()
    callback = SalienceCallback(TRACK, mask_padding=True)
    callback.on_train_begin(_args(tmp_path), TrainerState(), TrainerControl(), model=model)
    assert callback.tracker is not None and callback.tracker.attached and hooks(model) > 0
    callback.remove()
    callback.remove()
    assert hooks(model) == 0 and not callback.tracker.attached
    given = apt_salience.attach(model, TRACK)  # a tracker passed in is the caller's: it stays attached
    tracker_hooks = hooks(model)
    other = SalienceCallback(tracker=given, mask_padding=True)
    other.on_train_begin(_args(tmp_path), TrainerState(), TrainerControl(), model=model)
    assert hooks(model) > tracker_hooks > 0
    other.remove()
    assert given.attached and hooks(model) == tracker_hooks
    given.remove()
    assert hooks(model) == 0


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="tracker must be a SalienceTracker"):
        SalienceCallback(tracker="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="near_zero"):
        SalienceCallback(near_zero=-1)
    with pytest.raises(apt_salience.ConfigError):
        SalienceCallback({"update_frequency": 0})
    model = _model()
    tracker = apt_salience.attach(model)
    try:
        with pytest.raises(ValueError, match="either config"):
            SalienceCallback({"update_frequency": 2}, tracker=tracker)
        with pytest.raises(FileNotFoundError, match="resume_from"):
            SalienceCallback(tracker=tracker, resume_from="/nonexistent").on_train_begin(
                _args(Path("/tmp")), transformers.TrainerState(), transformers.TrainerControl(), model=model)
    finally:
        tracker.detach()


def test_importing_apt_salience_does_not_import_transformers() -> None:
    code = ("import sys, apt_salience, apt_salience.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
