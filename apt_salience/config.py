"""``config.yaml`` -> a frozen, validated :class:`SalienceConfig`.

Every key is optional; an unknown key, a wrong type or an out-of-range value is
a :class:`ConfigError` (a ``ValueError``) that names the key, the value and
what is allowed, raised before anything touches the model.

Example:
    >>> from apt_salience import load_config
    >>> cfg = load_config({"update_frequency": 4, "kurtosis": {"excess": True}})
    >>> cfg.update_frequency, cfg.kurtosis.excess, cfg.ema_beta
    (4, True, 0.85)
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union, cast

import yaml

__all__ = [
    "ConfigError",
    "SalienceConfig",
    "KurtosisConfig",
    "SalienceModeConfig",
    "SitesConfig",
    "PruningConfig",
    "load_config",
    "pruning_config",
    "PRESET_NAMES",
]

#: Architecture presets accepted by ``architecture`` (besides ``auto`` and ``custom``).
#: Kept in sync with :mod:`apt_salience.architectures` (checked by a test).
PRESET_NAMES = ("bert", "roberta", "llama", "mistral", "qwen2", "t5", "gpt2", "opt", "vit")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names key, value and what is allowed."""


@dataclass(frozen=True)
class KurtosisConfig:
    """The outlier (kurtosis) term of the outlier-aware salience (``kurtosis:`` in ``config.yaml``).

    Attributes:
        enabled: add ``sqrt(Kurt)`` to the salience.
        source: ``activation`` (the site's input over tokens) or ``output`` (``W[o, c] * mean(X_c)``).
        excess: subtract 3 and clamp at 0.
        combine: ``add`` (the paper) or ``scaled`` (scale-free within each site).
    """

    enabled: bool = True
    source: str = "activation"  # activation | output
    excess: bool = False
    combine: str = "add"  # add | scaled


@dataclass(frozen=True)
class SalienceModeConfig:
    """Which per-step salience is accumulated (``salience:``).

    Attributes:
        mode: ``compressed`` (APT), ``taylor`` or ``fisher``.
    """

    mode: str = "compressed"  # compressed | taylor | fisher


@dataclass(frozen=True)
class SitesConfig:
    """Regular expressions (``re.fullmatch`` on module names) selecting the hooked sites (``sites:``).

    Attributes:
        heads: attention output projections (None: the preset's).
        neurons: FFN down projections (None: the preset's).
        adapters: LoRA B layers (None: the preset's, the LoRA B layers).
        head_dim: channels per head (None: from the model config).
    """

    heads: Optional[str] = None
    neurons: Optional[str] = None
    adapters: Optional[str] = None
    head_dim: Optional[int] = None


@dataclass(frozen=True)
class PruningConfig:
    """The ``pruning:`` section: settings of :class:`~apt_salience.AdaptivePruner`, the Trainer callback and ``prune``.

    ``ramp_steps`` None means: the :class:`~apt_salience.integrations.huggingface.AdaptivePruningCallback`
    and ``apt-salience prune`` derive it from the length of training
    (:func:`apt_salience.pruner.auto_ramp_steps`); :class:`~apt_salience.AdaptivePruner` needs a number.

    Attributes:
        keep_ratio: the final kept share of the pruned kinds' parameters.
        start_step: the pruner step at which the schedule starts.
        ramp_steps: ``T`` of the cubic schedule.
        alpha: the mask step per reading.
        kinds: the kinds pruned.
        score: the ranked field (``outlier_aware`` or ``salience``).
        allocation: the ``select_blocks`` allocation.
        calibration: the ``select_blocks`` calibration.
        min_per_site: blocks of every site always kept.
        unobserved: ``keep`` or ``prune`` the blocks of sites the tracker never observed.
    """

    keep_ratio: float = 0.5
    start_step: int = 0
    ramp_steps: Optional[int] = None
    alpha: float = 0.01
    kinds: Tuple[str, ...] = ("head", "neuron")
    score: str = "outlier_aware"  # outlier_aware | salience
    allocation: str = "global"
    calibration: str = "none"
    min_per_site: int = 1
    unobserved: str = "keep"  # keep | prune: the blocks of sites the tracker never observed (frozen layers below)


@dataclass(frozen=True)
class SalienceConfig:
    """The validated configuration of a :class:`~apt_salience.SalienceTracker`.

    Build it with :func:`load_config`; fields mirror the keys of ``config.yaml``.

    Attributes:
        update_frequency: optimizer steps per reading.
        ema_beta: the EMA's ``beta``.
        uncertainty_beta: the AdaLoRA uncertainty's ``beta`` (None: off).
        sample_every: observe every k-th optimizer step.
        sync: ``auto`` (merge across torch.distributed ranks) or ``off``.
        architecture: ``auto``, a preset name or ``custom``.
        salience: :class:`SalienceModeConfig`.
        kurtosis: :class:`KurtosisConfig`.
        sites: :class:`SitesConfig`.
        pruning: :class:`PruningConfig`.
    """

    update_frequency: int = 1
    ema_beta: float = 0.85
    uncertainty_beta: Optional[float] = None
    sample_every: int = 1
    sync: str = "auto"  # auto | off
    architecture: str = "auto"
    salience: SalienceModeConfig = field(default_factory=SalienceModeConfig)
    kurtosis: KurtosisConfig = field(default_factory=KurtosisConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict, the same shape as ``config.yaml`` (round-trips through :func:`load_config`)."""
        d = dataclasses.asdict(self)
        d["pruning"]["kinds"] = list(self.pruning.kinds)  # YAML has lists, not tuples
        return d


_SECTIONS: Dict[str, type] = {
    "salience": SalienceModeConfig,
    "kurtosis": KurtosisConfig,
    "sites": SitesConfig,
    "pruning": PruningConfig,
}
_CHOICES: Dict[str, tuple] = {
    "sync": ("auto", "off"),
    "architecture": ("auto", "custom") + PRESET_NAMES,
    "salience.mode": ("compressed", "taylor", "fisher"),
    "kurtosis.source": ("activation", "output"),
    "kurtosis.combine": ("add", "scaled"),
    "pruning.score": ("outlier_aware", "salience"),
    "pruning.unobserved": ("keep", "prune"),
}

#: Block kinds the pruner may prune (``pruning.kinds``).
PRUNABLE = ("head", "neuron", "hidden")


def _unknown_key(key: str, valid: Any, where: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown config key '{where}{key}'.{hint} Valid keys{' under ' + where.rstrip('.') if where else ''}: "
        + ", ".join(valid)
    )


def _integer(value: Any) -> Optional[int]:
    """``value`` as an int when it is an integer number (Python or numpy, never a bool), else None."""
    if isinstance(value, (bool, _np_bool_types())) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _real(value: Any) -> Optional[float]:
    """``value`` as a float when it is a real number (Python or numpy, never a bool), else None."""
    if isinstance(value, (bool, _np_bool_types())) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _np_bool_types() -> Tuple[type, ...]:
    """numpy's bool type when numpy is loaded (a config may come from numpy code), else nothing."""
    np = sys.modules.get("numpy")
    return (np.bool_,) if np is not None else ()


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, (bool, _np_bool_types())):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    return bool(value)


def _check_int(key: str, value: Any, minimum: int) -> int:
    number = _integer(value)
    if number is None:
        raise ConfigError(f"config key '{key}' must be an integer >= {minimum}, got {value!r}")
    if number < minimum:
        raise ConfigError(f"config key '{key}' must be an integer >= {minimum}, got {value}")
    return number


def _check_beta(key: str, value: Any) -> float:
    number = _real(value)
    if number is None:
        raise ConfigError(f"config key '{key}' must be a number with 0 <= {key} < 1, got {value!r}")
    if not (0.0 <= number < 1.0):
        raise ConfigError(f"config key '{key}' must satisfy 0 <= {key} < 1, got {value}")
    return number


def _check_choice(key: str, value: Any) -> str:
    return _one_of(f"config key '{key}'", value, _CHOICES[key])


def _check_regex(key: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config key '{key}' must be a regular expression string, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"config key '{key}' is not a valid regular expression ({exc}): {value!r}") from None
    return value


def _validate_section(name: str, raw: Any) -> Any:
    if name == "pruning":
        return _validate_pruning(raw, PruningConfig(), lambda key: f"config key 'pruning.{key}'", unknown_prefix="pruning.")
    cls = _SECTIONS[name]
    if raw is None:
        return cls()
    if isinstance(raw, cls):
        raw = dataclasses.asdict(cast(Any, raw))
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key '{name}' must be a mapping of keys to values, got {raw!r}")
    valid = {f.name for f in dataclasses.fields(cls)}
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in valid:
            raise _unknown_key(str(key), valid, f"{name}.")
        if full in _CHOICES:
            out[key] = _check_choice(full, value)
        elif key in ("enabled", "excess"):
            out[key] = _check_bool(full, value)
        elif key == "head_dim":
            out[key] = None if value is None else _check_int(full, value, 1)
        else:  # the site regexes
            out[key] = _check_regex(full, value)
    return cls(**out)


def _registry(key: str) -> Tuple[str, ...]:
    from . import selection  # the registries can be extended at run time: read them now

    return tuple(sorted(selection.ALLOCATIONS if key == "allocation" else selection.CALIBRATIONS))


def _one_of(where: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} got {value!r}; allowed: {', '.join(allowed)}.{hint}")
    return value


def _pruning_value(key: str, value: Any, where: str) -> Any:
    """One validated ``pruning`` value; ``where`` names it in the error ("config key 'pruning.alpha'" or "alpha")."""
    if key in ("keep_ratio", "alpha"):
        number = _real(value)
        if number is None or not 0 < number <= 1:
            raise ConfigError(f"{where} must be a number with 0 < {key} <= 1, got {value!r}")
        return number
    if key in ("start_step", "min_per_site"):
        whole = _integer(value)
        if whole is None or whole < 0:
            raise ConfigError(f"{where} must be an integer >= 0, got {value!r}")
        return whole
    if key == "ramp_steps":
        if value is None:
            return None
        whole = _integer(value)
        if whole is None or whole < 1:
            raise ConfigError(f"{where} must be an integer >= 1 (or null: derived from the training length), "
                              f"got {value!r}")
        return whole
    if key == "kinds":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or any(k not in PRUNABLE for k in items) \
                or len(set(items)) != len(items):
            raise ConfigError(f"{where} must be a non-empty list of distinct kinds from {', '.join(PRUNABLE)}, "
                              f"got {value!r}")
        return tuple(k for k in PRUNABLE if k in items)  # canonical order
    if key in ("score", "unobserved"):
        return _one_of(where, value, _CHOICES[f"pruning.{key}"])
    return _one_of(where, value, _registry(key))  # allocation, calibration


def _validate_pruning(raw: Any, base: PruningConfig, where: Any, unknown_prefix: Optional[str]) -> PruningConfig:
    if raw is None:
        return base
    if isinstance(raw, PruningConfig):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key 'pruning' must be a mapping of keys to values, got {raw!r}")
    valid = {f.name for f in dataclasses.fields(PruningConfig)}
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            if unknown_prefix is None:
                raise TypeError(f"unknown pruning option {key!r}; valid: {', '.join(sorted(valid))}")
            raise _unknown_key(str(key), valid, unknown_prefix)
        out[key] = _pruning_value(key, value, where(key))
    return dataclasses.replace(base, **out)


def pruning_config(base: Optional[PruningConfig] = None, **overrides: Any) -> PruningConfig:
    """``base`` (default: the defaults) with the given keyword arguments validated and applied; None means unchanged.

    Errors name the argument, the value and what is allowed.

    Args:
        base: the section to start from (e.g. ``load_config(path).pruning``).
        **overrides: ``keep_ratio``, ``start_step``, ``ramp_steps``, ``alpha``, ``kinds``, ``score``,
            ``allocation``, ``calibration``, ``min_per_site``, ``unobserved``.

    Example:
        >>> pruning_config(keep_ratio=0.4, ramp_steps=None).keep_ratio
        0.4
        >>> pruning_config(alpha=2)
        Traceback (most recent call last):
        ...
        apt_salience.config.ConfigError: alpha must be a number with 0 < alpha <= 1, got 2
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    return _validate_pruning(given, base or PruningConfig(), lambda key: key, unknown_prefix=None)


def _validate(raw: Mapping[str, Any]) -> SalienceConfig:
    valid = {f.name for f in dataclasses.fields(SalienceConfig)}
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in valid:
            raise _unknown_key(str(key), valid, "")
        if key in _SECTIONS:
            out[key] = _validate_section(key, value)
        elif key in ("update_frequency", "sample_every"):
            out[key] = _check_int(key, value, 1)
        elif key == "ema_beta":
            out[key] = _check_beta(key, value)
        elif key == "uncertainty_beta":
            out[key] = None if value is None else _check_beta(key, value)
        elif key == "sync" and value is False:
            # YAML 1.1 (PyYAML) reads an unquoted ``sync: off`` as the boolean false
            out[key] = "off"
        else:
            out[key] = _check_choice(key, value)
    cfg = SalienceConfig(**out)
    if cfg.architecture == "custom" and not (cfg.sites.heads or cfg.sites.neurons or cfg.sites.adapters):
        raise ConfigError(
            "config key 'architecture' is 'custom' but no sites are given: set at least one of "
            "'sites.heads', 'sites.neurons', 'sites.adapters' (regular expressions matched against module names)"
        )
    if cfg.sites.heads and cfg.architecture == "custom" and cfg.sites.head_dim is None:
        raise ConfigError(
            "config key 'sites.head_dim' is required when 'architecture' is 'custom' and 'sites.heads' is set "
            "(the number of input channels of the head site that make one attention head)"
        )
    return cfg


ConfigLike = Union[None, str, "os.PathLike[str]", Mapping[str, Any], SalienceConfig]


def load_config(config: ConfigLike = None) -> SalienceConfig:
    """Return a validated :class:`SalienceConfig` from ``None`` (defaults), a YAML path, a dict or a config.

    Args:
        config: None (the defaults), a path to a YAML file, a dict with the keys of ``config.yaml``, or a
            :class:`SalienceConfig` (validated again).

    Example:
        >>> load_config(None).kurtosis.source
        'activation'
        >>> load_config({"ema_beta": 1.5})
        Traceback (most recent call last):
        ...
        apt_salience.config.ConfigError: config key 'ema_beta' must satisfy 0 <= ema_beta < 1, got 1.5
    """
    if config is None:
        return SalienceConfig()
    if isinstance(config, SalienceConfig):
        # a SalienceConfig built by hand has not been validated yet: check every field
        return _validate(config.to_dict())
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file '{path}': {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"cannot read config file '{path}': not UTF-8 text (byte {exc.start}: {exc.reason})"
            ) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"malformed YAML in config file '{path}'{where}: {problem}") from None
        if raw is None:
            return SalienceConfig()
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, got {type(raw).__name__}")
        try:
            return _validate(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if isinstance(config, Mapping):
        return _validate(config)
    raise ConfigError(
        f"config must be None, a path to a YAML file, a dict or a SalienceConfig; got {type(config).__name__}"
    )
