"""AdaptivePruningCallback in a real transformers.Trainer (CPU, tiny BERT from a config, no downloads).

Run A: 8 optimizer steps, the ramp over steps 0..4 with alpha 0.5 (every mask hard by step 6), a
checkpoint at step 4 (mid-way: masks moving). Run B: a fresh model and callback resume from A's
checkpoint-4; its final masks and pruned weights must equal A's. Run C: a PEFT LoRA model with
tune_ranks=True.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Dict, Tuple

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import apt_salience
from apt_salience.integrations.huggingface import PRUNER_STATE_FILE, AdaptivePruningCallback
from apt_salience.config import ConfigError
from tests.test_hf_callback import _data, _model  # the same tiny BERT and data as the SalienceCallback's test

MAX_STEPS, SAVE_STEPS = 8, 4
PRUNE = dict(keep_ratio=0.5, ramp_steps=4, alpha=0.5)


def _args(out: Path, save: bool = True) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=2, learning_rate=1e-3,
        save_strategy="steps" if save else "no", save_steps=SAVE_STEPS, logging_strategy="steps",
        logging_steps=1000, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)


def _train(out: Path, seed: int, resume: Any = None, model: Any = None,
           **kw: Any) -> Tuple[Trainer, AdaptivePruningCallback]:
    callback = AdaptivePruningCallback(**{**PRUNE, **kw})
    trainer = Trainer(model=model if model is not None else _model(seed), args=_args(out), train_dataset=_data(),
                      callbacks=[callback])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("hf_prune")
    dense_params = sum(p.numel() for p in _model().parameters())
    a = _train(out, seed=0)
    checkpoint = out / f"checkpoint-{SAVE_STEPS}"
    # another output_dir: the callback is told where the checkpoint is (SalienceCallback's resume_from)
    b = _train(tmp_path_factory.mktemp("hf_prune_b"), seed=99, resume=str(checkpoint), resume_from=str(checkpoint))
    return {"out": out, "a": a, "b": b, "dense_params": dense_params, "checkpoint": checkpoint}


def test_train_alone_prunes_and_saves_a_loadable_model(runs: Dict[str, Any]) -> None:
    trainer, cb = runs["a"]
    assert trainer.state.global_step == MAX_STEPS
    assert cb.report is not None and cb.pruner is not None and cb.pruner.finalized
    params = sum(p.numel() for p in trainer.model.parameters())
    assert params == cb.report.params_after < runs["dense_params"] == cb.report.params_before
    sel = cb.pruner.final_selection
    assert sel is not None and sel.params_kept <= 0.5 * sel.params_total
    saved = runs["out"] / "pruned"
    assert cb.saved_to == str(saved)
    loaded = apt_salience.load_pruned(saved)
    torch.testing.assert_close(_logits(loaded), _logits(trainer.model), atol=1e-5, rtol=0)
    assert (runs["checkpoint"] / PRUNER_STATE_FILE).is_file()


def test_logs_the_budget_and_the_kept_share_at_each_reading(runs: Dict[str, Any]) -> None:
    trainer, cb = runs["a"]
    logged = {e["step"]: e for e in trainer.state.log_history if "pruning/budget" in e}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))  # one reading per step (update_frequency 1)
    for step, e in logged.items():
        t = min(step, 4)
        assert e["pruning/budget"] == pytest.approx(0.5 + 0.5 * (1 - t / 4) ** 3)  # the cubic schedule, by hand
        assert e["pruning/kept_share"] <= e["pruning/budget"] + 1e-9 and 0 < e["pruning/alive_share"] <= 1
        assert "salience/head/mean_salience" in e  # the SalienceCallback's scalars are there too


def test_resume_from_a_checkpoint_gives_the_same_final_masks(runs: Dict[str, Any]) -> None:
    (_, cb_a), (trainer_b, cb_b) = runs["a"], runs["b"]
    assert cb_b.loaded_from == str(runs["checkpoint"])
    sa, sb = cb_a.pruner.final_selection, cb_b.pruner.final_selection
    assert sa is not None and sb is not None
    assert torch.equal(sa.head, sb.head) and torch.equal(sa.neuron, sb.neuron)
    assert cb_a.report.shapes == cb_b.report.shapes
    for (na, pa), (nb, pb) in zip(runs["a"][0].model.state_dict().items(), trainer_b.model.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


def test_tune_ranks_grows_lora_then_merges_and_prunes(tmp_path: Path) -> None:
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0,
                                                          task_type="SEQ_CLS"))
    initial = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    trainer, cb = _train(tmp_path, seed=0, model=model, tune_ranks=True,
                         tuner_options={"num_growths": 2, "budget": 3 * initial})
    assert cb.tuner is not None and len(cb.tuner.events) == 2
    assert all(e["parameters"] <= 3 * initial for e in cb.tuner.events) and cb.tuner.events[-1]["parameters"] > initial
    grown = [e for e in trainer.state.log_history if "tuning/lora_parameters" in e]
    assert grown and max(e["tuning/lora_parameters"] for e in grown) > initial
    assert cb.report is not None and cb.report.params_after < cb.report.params_before
    loaded = apt_salience.load_pruned(tmp_path / "pruned")
    torch.testing.assert_close(_logits(loaded), _logits(trainer.model), atol=1e-5, rtol=0)
    # resuming with grown ranks: restore them before the Trainer loads the checkpoint's weights
    fresh = peft.get_peft_model(_model(5), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                           lora_dropout=0.0, task_type="SEQ_CLS"))
    ranks = AdaptivePruningCallback.restore_ranks(fresh, tmp_path / f"checkpoint-{SAVE_STEPS}")
    assert ranks and apt_salience.tuning.lora_ranks(fresh) == ranks and max(ranks.values()) > 2


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"keep_ratio must be a number with 0 < keep_ratio <= 1, got 0"):
        AdaptivePruningCallback(keep_ratio=0)
    with pytest.raises(ConfigError, match=r"config key 'pruning.alpha'"):
        AdaptivePruningCallback(config={"pruning": {"alpha": 3}})
    with pytest.raises(TypeError, match="tuner_options"):
        AdaptivePruningCallback(tuner_options={"bugdet": 3})
    with pytest.raises(TypeError, match="attaches its own tracker"):
        AdaptivePruningCallback(tracker=None)
