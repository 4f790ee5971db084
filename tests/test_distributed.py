"""Multi-process statistics: two CPU ranks (gloo) must publish what one process publishes on the union.

One spawn of two worker processes runs every scenario in sequence (the start-up of two Python processes
with torch and transformers dominates the cost), writes each rank's results to a file, and the tests
below compare them with single-process references computed here:

* DDP, a tiny BERT, two micro-batches per rank per step (``no_sync`` on the first), update_frequency 2,
  4 optimizer steps -> 2 readings; the reference is one process that feeds each step's four
  micro-batches concatenated into one batch (the loss is a per-example *sum*, so dL/dH per token does
  not depend on how the examples are grouped; the reference's SGD learning rate is divided by the world
  size because DDP averages the parameter gradients over ranks).
* FSDP2 (``fully_shard`` per encoder layer and on the root) and FSDP1 (``use_orig_params=True``, one
  unit per encoder layer, ``no_sync`` on the first micro-batch): the same run, the same reference. In
  both the tracker is attached to the plain model before wrapping; the hooked Linears see full
  activations (only parameters are sharded).
* A non-finite micro-batch on rank 1 only: dropped, counted globally (rank 0 warns about it too).
* ``sync: off``: rank 0 steps alone (would block if a collective were issued) and publishes local scores.
* The Trainer under DDP (accelerate reuses the process group): both ranks agree, each writes its own
  tracker file into the checkpoint, and a resumed run ends with the uninterrupted run's scores.
* Different block layouts on the two ranks (2 vs 3 encoder layers): both ranks raise, within the
  process group's timeout, before any flat all-reduce.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F

import apt_salience
from apt_salience.scores import KINDS

WORLD = 2
STEPS = 4
MICRO = 2  # micro-batches per rank per step
BATCH, SEQ, VOCAB = 2, 8, 100
LR = 0.5
TRACK = {"update_frequency": 2, "ema_beta": 0.85}
FIELDS = ("salience", "kurtosis", "outlier_aware", "density")


def _bert(layers: int = 2) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg)


def _micro(step: int, rank: int, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + 100 * step + 10 * rank + i)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.randint(0, 2, (BATCH,), generator=g)


def _loss(model: torch.nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=ids).logits, y, reduction="sum")


def _readings(tracker: apt_salience.SalienceTracker, published: List[bool]) -> Dict[str, Any]:
    return {"published": published, "scores": tracker.scores().to_dict(), "steps": tracker.steps}


# ---------------------------------------------------------------------------------------------- workers


def _train_sharded(rank: int, wrap: str) -> Dict[str, Any]:
    model = _bert()
    tracker = apt_salience.attach(model, TRACK)  # attach to the plain model, before wrapping
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net: torch.nn.Module = DDP(model)
    elif wrap == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.bert.modeling_bert import BertLayer

        net = FSDP(model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
                   device_id=torch.device("cpu"))
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        net = model
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    published = []
    for step in range(STEPS):
        for i in range(MICRO):
            last = i == MICRO - 1
            ctx = net.no_sync() if (wrap in ("ddp", "fsdp1") and not last) else contextlib.nullcontext()
            with ctx:
                _loss(net, *_micro(step, rank, i)).backward()
        opt.step()
        opt.zero_grad()
        published.append(tracker.step())
    out = _readings(tracker, published)
    tracker.detach()
    return out


def _nonfinite(rank: int) -> Dict[str, Any]:
    model = _bert()
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    _loss(model, *_micro(50, rank, 0)).backward()
    if rank == 1:
        (_loss(model, *_micro(50, rank, 1)) * float("nan")).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        published = tracker.step()
    msgs = [str(w.message) for w in caught if issubclass(w.category, apt_salience.SalienceWarning)]
    out = {"published": [published], "scores": tracker.scores().to_dict(), "warnings": msgs,
           "local_dropped": tracker.dropped_microbatches}
    tracker.detach()
    return out


def _sync_off(rank: int, dist: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if rank == 0:  # rank 1 issues no collective meanwhile: a collective here would block until the timeout
        model = _bert()
        tracker = apt_salience.attach(model, {"update_frequency": 1, "sync": "off"})
        _loss(model, *_micro(60, 0, 0)).backward()
        out = {"published": [tracker.step()], "scores": tracker.scores().to_dict()}
        tracker.detach()
    dist.barrier()
    return out


def _hf_trainer(rank: int, outdir: str) -> Dict[str, Any]:
    """The Trainer under DDP (accelerate picks up the process group): uninterrupted vs resumed at step 3."""
    import io

    from transformers import Trainer, TrainingArguments

    from apt_salience.integrations.huggingface import SalienceCallback, state_file_name

    g = torch.Generator().manual_seed(7)
    data = [{"input_ids": torch.randint(1, VOCAB, (SEQ,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(32)]
    out = os.path.join(outdir, "trainer")
    args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=1e-3, save_strategy="steps", save_steps=3, logging_steps=1000,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    res: Dict[str, Any] = {}
    for name, resume in (("full", None), ("resumed", os.path.join(out, "checkpoint-3"))):
        callback = SalienceCallback({"update_frequency": 2})
        trainer = Trainer(model=_bert(), args=args, train_dataset=data, callbacks=[callback])
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train(resume_from_checkpoint=resume)
        assert callback.tracker is not None
        res[name] = {"scores": callback.tracker.scores().to_dict(), "steps": callback.tracker.steps,
                     "wrapped": type(trainer.model_wrapped).__name__, "loaded_from": callback.loaded_from,
                     "logged": sorted(e["step"] for e in trainer.state.log_history if "salience/head/mean_salience" in e)}
        if name == "full":
            res["files"] = sorted(f for f in os.listdir(os.path.join(out, "checkpoint-3")) if f.startswith("apt_"))
            res["expected_file"] = state_file_name(rank, WORLD)
    return res


def _mismatch(rank: int) -> Dict[str, Any]:
    model = _bert(layers=2 if rank == 0 else 3)
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    _loss(model, *_micro(70, rank, 0)).backward()
    start = time.monotonic()
    try:
        tracker.step()
    except apt_salience.TrackerStateError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    finally:
        tracker.detach()
    return {"error": None}


def _worker(rank: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))  # the last three for the Trainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    results: Dict[str, Any] = {}
    scenarios = [
        ("ddp", lambda: _train_sharded(rank, "ddp")),
        ("fsdp2", lambda: _train_sharded(rank, "fsdp2")),
        ("fsdp1", lambda: _train_sharded(rank, "fsdp1")),
        ("nonfinite", lambda: _nonfinite(rank)),
        ("sync_off", lambda: _sync_off(rank, dist)),
        ("trainer", lambda: _hf_trainer(rank, outdir)),
        ("mismatch", lambda: _mismatch(rank)),  # last: a failure here cannot disturb the others
    ]
    try:
        for name, fn in scenarios:
            try:
                results[name] = fn()
            except Exception:
                results[name] = {"exception": traceback.format_exc()}
            torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, Any]]:
    import torch.multiprocessing as mp

    outdir = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError("the two-rank run did not finish within 150 s (a collective hung)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------- references


def _reference_training() -> Dict[str, Any]:
    model = _bert()
    tracker = apt_salience.attach(model, TRACK)
    opt = torch.optim.SGD(model.parameters(), lr=LR / WORLD)  # DDP / FSDP average gradients over ranks
    published = []
    for step in range(STEPS):
        batches = [_micro(step, r, i) for r in range(WORLD) for i in range(MICRO)]
        ids = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        _loss(model, ids, y).backward()  # all of the step's micro-batches as one batch
        opt.step()
        opt.zero_grad()
        published.append(tracker.step())
    out = _readings(tracker, published)
    tracker.detach()
    return out


def _reference_one_step(batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, Any]:
    model = _bert()
    tracker = apt_salience.attach(model, {"update_frequency": 1})
    for ids, y in batches:
        _loss(model, ids, y).backward()
    published = tracker.step()
    out = {"published": [published], "scores": tracker.scores().to_dict()}
    tracker.detach()
    return out


def _ok(res: Dict[str, Any], name: str) -> Dict[str, Any]:
    got = res.get(name)
    assert got is not None, f"scenario {name} did not run"
    assert "exception" not in got, got.get("exception")
    return got


def _assert_close(got: Dict[str, Any], ref: Dict[str, Any], rtol: float) -> None:
    assert got["published"] == ref["published"]
    for kind in KINDS:
        g, r = got["scores"].get(kind), ref["scores"].get(kind)
        assert (g is None) == (r is None), kind
        if r is None:
            continue
        assert g["sites"] == r["sites"]
        for f in FIELDS:
            gt, rt = torch.tensor(g[f], dtype=torch.float64), torch.tensor(r[f], dtype=torch.float64)
            assert rt.abs().sum() > 0, (kind, f)  # the comparison is not vacuous
            torch.testing.assert_close(gt, rt, rtol=rtol, atol=rtol * float(rt.abs().max()), msg=f"{kind}.{f}")


def _assert_identical(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    for kind in KINDS:
        assert a["scores"].get(kind) == b["scores"].get(kind), kind


@pytest.fixture(scope="module")
def reference() -> Dict[str, Any]:
    return _reference_training()


def test_reference_publishes_every_second_step(reference: Dict[str, Any]) -> None:
    assert reference["published"] == [False, True, False, True]
    assert reference["steps"] == STEPS


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2", "fsdp1"])
def test_ranks_equal_one_process_on_the_union(ranks: List[Dict[str, Any]], reference: Dict[str, Any], wrap: str) -> None:
    r0, r1 = _ok(ranks[0], wrap), _ok(ranks[1], wrap)
    _assert_identical(r0, r1)  # the ranks agree exactly
    _assert_close(r0, reference, rtol=1e-5)
    assert r0["steps"] == STEPS


def test_a_rank_alone_differs_from_the_union(reference: Dict[str, Any]) -> None:
    # guards the test above: without the sync, a rank's own data gives visibly different scores
    model = _bert()
    tracker = apt_salience.attach(model, TRACK)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        for i in range(MICRO):
            _loss(model, *_micro(step, 0, i)).backward()
        opt.step()
        opt.zero_grad()
        tracker.step()
    mine = torch.tensor(tracker.scores().head.salience.tolist())
    tracker.detach()
    union = torch.tensor(reference["scores"]["head"]["salience"])
    assert not torch.allclose(mine, union, rtol=1e-2)


def test_nonfinite_microbatch_on_one_rank_is_dropped_and_counted_globally(ranks: List[Dict[str, Any]]) -> None:
    r0, r1 = _ok(ranks[0], "nonfinite"), _ok(ranks[1], "nonfinite")
    _assert_identical(r0, r1)
    ref = _reference_one_step([_micro(50, 0, 0), _micro(50, 1, 0)])  # the two finite micro-batches
    _assert_close(r0, ref, rtol=1e-5)
    assert (r0["local_dropped"], r1["local_dropped"]) == (0, 1)
    for r in (r0, r1):  # both ranks report the global count
        assert any("1 micro-batch(es)" in m and "1 in total" in m for m in r["warnings"]), r["warnings"]


def test_sync_off_publishes_local_scores_without_collectives(ranks: List[Dict[str, Any]]) -> None:
    r0 = _ok(ranks[0], "sync_off")
    _ok(ranks[1], "sync_off")
    _assert_close(r0, _reference_one_step([_micro(60, 0, 0)]), rtol=1e-5)


def test_layout_mismatch_raises_on_every_rank(ranks: List[Dict[str, Any]]) -> None:
    for rank in range(WORLD):
        got = _ok(ranks[rank], "mismatch")
        assert got["error"] is not None, f"rank {rank} did not raise"
        assert "differ across ranks" in got["error"]
        assert "bert.encoder.layer.2" in got["error"]  # names the first mismatch
        assert got["seconds"] < 30  # failed fast, not through the process group's timeout


def test_trainer_under_ddp_agrees_across_ranks_and_resumes_exactly(ranks: List[Dict[str, Any]]) -> None:
    r0, r1 = _ok(ranks[0], "trainer"), _ok(ranks[1], "trainer")
    for r in (r0, r1):
        assert r["full"]["wrapped"] == "DistributedDataParallel"
        assert r["full"]["steps"] == r["resumed"]["steps"] == 6
        assert r["full"]["logged"] == r["resumed"]["logged"] == [2, 4, 6]
        assert r["resumed"]["loaded_from"] is not None and r["resumed"]["loaded_from"].endswith("checkpoint-3")
        assert r["files"] == ["apt_salience_tracker_rank0.pt", "apt_salience_tracker_rank1.pt"]
    assert (r0["expected_file"], r1["expected_file"]) == ("apt_salience_tracker_rank0.pt", "apt_salience_tracker_rank1.pt")
    _assert_identical(r0["full"], r1["full"])
    _assert_identical(r0["resumed"], r1["resumed"])
    _assert_close({**r0["resumed"], "published": []}, {**r0["full"], "published": []}, rtol=1e-5)
