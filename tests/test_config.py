"""config.yaml -> frozen SalienceConfig: defaults, round trips and every error path."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Set

import pytest
import yaml

from apt_salience import ConfigError, SalienceConfig, load_config
from apt_salience.config import PRESET_NAMES, KurtosisConfig, PruningConfig, SalienceModeConfig, SitesConfig, pruning_config

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


def _field_paths(cls: type, prefix: str = "") -> Set[str]:
    out: Set[str] = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out.add(prefix + f.name)
            out |= _field_paths(type(default), prefix + f.name + ".")
        else:
            out.add(prefix + f.name)
    return out


def _key_paths(d: Dict[str, Any], prefix: str = "") -> Set[str]:
    out: Set[str] = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _key_paths(v, prefix + k + ".")
    return out


# ----------------------------------------------------------------------------- defaults and the repository file
def test_defaults_match_the_design() -> None:
    cfg = load_config(None)
    assert cfg == SalienceConfig()
    assert (cfg.update_frequency, cfg.ema_beta, cfg.uncertainty_beta, cfg.sample_every, cfg.sync, cfg.architecture) == (
        1, 0.85, None, 1, "auto", "auto")
    assert cfg.salience == SalienceModeConfig("compressed")
    assert cfg.kurtosis == KurtosisConfig(enabled=True, source="activation", excess=False, combine="add")
    assert cfg.sites == SitesConfig(None, None, None, None)
    assert cfg.pruning == PruningConfig(keep_ratio=0.5, start_step=0, ramp_steps=None, alpha=0.01,
                                        kinds=("head", "neuron"), score="outlier_aware", allocation="global",
                                        calibration="none", min_per_site=1)


def test_config_is_frozen() -> None:
    cfg = load_config({"ema_beta": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ema_beta = 0.1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kurtosis.excess = True  # type: ignore[misc]


def test_repository_config_yaml_loads_and_equals_defaults() -> None:
    assert REPO_CONFIG.is_file()
    assert load_config(REPO_CONFIG) == SalienceConfig()
    assert load_config(str(REPO_CONFIG)) == SalienceConfig()


def test_every_dataclass_field_is_a_key_of_config_yaml() -> None:
    raw = yaml.safe_load(REPO_CONFIG.read_text(encoding="utf-8"))
    fields = _field_paths(SalienceConfig)
    keys = _key_paths(raw)
    assert fields - keys == set(), f"fields missing from config.yaml: {sorted(fields - keys)}"
    assert keys - fields == set(), f"config.yaml keys that are no field: {sorted(keys - fields)}"
    assert {"kurtosis.excess", "sites.head_dim", "salience.mode", "ema_beta"} <= fields  # the walk really recursed


def test_presets_match_the_architecture_table() -> None:
    from apt_salience.architectures import ARCHITECTURES

    assert set(PRESET_NAMES) == set(ARCHITECTURES)


# ----------------------------------------------------------------------------- loading and round trips
def test_dict_and_partial_sections() -> None:
    cfg = load_config({"update_frequency": 4, "kurtosis": {"excess": True}, "sites": {"head_dim": 16}})
    assert cfg.update_frequency == 4
    assert cfg.kurtosis == KurtosisConfig(excess=True)
    assert cfg.sites.head_dim == 16 and cfg.sites.heads is None
    assert cfg.ema_beta == 0.85
    assert load_config({"kurtosis": None}).kurtosis == KurtosisConfig()
    assert load_config({"ema_beta": 0}).ema_beta == 0.0 and isinstance(load_config({"ema_beta": 0}).ema_beta, float)


FULL = {
    "update_frequency": 3,
    "ema_beta": 0.5,
    "uncertainty_beta": 0.9,
    "sample_every": 2,
    "sync": "off",
    "architecture": "custom",
    "salience": {"mode": "fisher"},
    "kurtosis": {"enabled": False, "source": "output", "excess": True, "combine": "scaled"},
    "sites": {"heads": r".*\.attn\.o", "neurons": r".*\.mlp\.down", "adapters": r".*\.lora_B\.[^.]+", "head_dim": 8},
    "pruning": {"keep_ratio": 0.4, "start_step": 10, "ramp_steps": 100, "alpha": 0.05, "kinds": ["head", "hidden"],
                "score": "salience", "allocation": "uniform", "calibration": "site_mean", "min_per_site": 0,
                "unobserved": "prune"},
}


def test_yaml_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "full.yaml"
    p.write_text(yaml.safe_dump(FULL), encoding="utf-8")
    cfg = load_config(p)
    assert cfg.to_dict() == FULL  # YAML -> dataclass -> dict
    q = tmp_path / "again.yaml"
    q.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    assert load_config(q) == cfg  # dict -> YAML -> dataclass
    assert load_config(cfg.to_dict()) == cfg
    assert load_config(SalienceConfig().to_dict()) == SalienceConfig()


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing here\n", encoding="utf-8")
    assert load_config(p) == SalienceConfig()


def test_unquoted_yaml_off_for_sync(tmp_path: Path) -> None:
    """YAML 1.1 reads `sync: off` as false; the documented spelling must still work."""
    p = tmp_path / "sync.yaml"
    p.write_text("sync: off\n", encoding="utf-8")
    assert yaml.safe_load(p.read_text()) == {"sync": False}
    assert load_config(p).sync == "off"


def test_a_config_object_is_validated_too() -> None:
    good = SalienceConfig(ema_beta=0.5)
    assert load_config(good) == good
    with pytest.raises(ConfigError, match=r"'ema_beta' must satisfy 0 <= ema_beta < 1, got 2.0"):
        load_config(SalienceConfig(ema_beta=2.0))
    with pytest.raises(ConfigError, match=r"'kurtosis.source' got 'inputs'"):
        load_config(SalienceConfig(kurtosis=KurtosisConfig(source="inputs")))


def test_sections_may_be_given_as_dataclasses() -> None:
    cfg = load_config({"kurtosis": KurtosisConfig(excess=True)})
    assert cfg.kurtosis.excess is True


# ----------------------------------------------------------------------------- errors
def test_unknown_top_level_key_lists_valid_keys_and_suggests() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config({"ema_bta": 0.5})
    msg = str(ei.value)
    assert "unknown config key 'ema_bta'" in msg
    assert "Did you mean 'ema_beta'?" in msg
    for f in dataclasses.fields(SalienceConfig):
        assert f.name in msg
    assert isinstance(ei.value, ValueError)


def test_unknown_nested_key_lists_section_keys_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'kurtosis.exces'\. Did you mean 'excess'\? "
                                          r"Valid keys under kurtosis: combine, enabled, excess, source"):
        load_config({"kurtosis": {"exces": True}})
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'\. Valid keys: "):
        load_config({"zzz": 1})  # nothing close: no suggestion


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "typo.yaml"
    p.write_text("update_frequncy: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(p)) + r": unknown config key 'update_frequncy'\. "
                                          r"Did you mean 'update_frequency'\?"):
        load_config(p)


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"update_frequency": 0}, r"'update_frequency' must be an integer >= 1, got 0"),
        ({"update_frequency": "4"}, r"'update_frequency' must be an integer >= 1, got '4'"),
        ({"update_frequency": 2.5}, r"'update_frequency' must be an integer >= 1, got 2.5"),
        ({"update_frequency": True}, r"'update_frequency' must be an integer >= 1, got True"),
        ({"sample_every": -1}, r"'sample_every' must be an integer >= 1, got -1"),
        ({"ema_beta": 1.0}, r"'ema_beta' must satisfy 0 <= ema_beta < 1, got 1.0"),
        ({"ema_beta": -0.1}, r"'ema_beta' must satisfy 0 <= ema_beta < 1, got -0.1"),
        ({"ema_beta": float("nan")}, r"'ema_beta' must satisfy 0 <= ema_beta < 1, got nan"),
        ({"ema_beta": "high"}, r"'ema_beta' must be a number with 0 <= ema_beta < 1, got 'high'"),
        ({"uncertainty_beta": 1.5}, r"'uncertainty_beta' must satisfy 0 <= uncertainty_beta < 1, got 1.5"),
        ({"sync": "of"}, r"'sync' got 'of'; allowed: auto, off\. Did you mean 'off'\?"),
        ({"sync": True}, r"'sync' got True; allowed: auto, off"),
        ({"architecture": "lama"}, r"'architecture' got 'lama'; allowed: auto, custom, bert, .*Did you mean 'llama'\?"),
        ({"salience": {"mode": "taylr"}}, r"'salience.mode' got 'taylr'; allowed: compressed, taylor, fisher\. Did you mean 'taylor'\?"),
        ({"kurtosis": {"source": 3}}, r"'kurtosis.source' got 3; allowed: activation, output"),
        ({"kurtosis": {"combine": "mul"}}, r"'kurtosis.combine' got 'mul'; allowed: add, scaled"),
        ({"kurtosis": {"enabled": "yes"}}, r"'kurtosis.enabled' must be true or false, got 'yes'"),
        ({"kurtosis": {"excess": 1}}, r"'kurtosis.excess' must be true or false, got 1"),
        ({"kurtosis": 3}, r"'kurtosis' must be a mapping of keys to values, got 3"),
        ({"sites": {"head_dim": 0}}, r"'sites.head_dim' must be an integer >= 1, got 0"),
        ({"sites": {"head_dim": 64.0}}, r"'sites.head_dim' must be an integer >= 1, got 64.0"),
        ({"sites": {"heads": "("}}, r"'sites.heads' is not a valid regular expression .*: '\('"),
        ({"sites": {"neurons": 5}}, r"'sites.neurons' must be a regular expression string, got 5"),
        ({"sites": {"adapters": ""}}, r"'sites.adapters' must be a regular expression string, got ''"),
        ({"architecture": "custom"}, r"'architecture' is 'custom' but no sites are given"),
        ({"architecture": "custom", "sites": {"heads": "x"}}, r"'sites.head_dim' is required when 'architecture' is 'custom'"),
        ({1: 2}, r"unknown config key '1'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw: Dict[Any, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(raw)


def test_custom_architecture_with_sites_is_valid() -> None:
    cfg = load_config({"architecture": "custom", "sites": {"heads": r".*\.o", "head_dim": 4}})
    assert cfg.architecture == "custom" and cfg.sites.heads == r".*\.o" and cfg.sites.head_dim == 4
    assert load_config({"architecture": "custom", "sites": {"neurons": r".*\.fc2"}}).sites.head_dim is None


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("update_frequency: 2\nkurtosis:\n  enabled: [true\nema_beta: 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "malformed YAML" in msg and str(p) in msg
    m = re.search(r"line (\d+)", msg)
    assert m is not None and int(m.group(1)) in (3, 4)  # the unclosed list opens on line 3, the parser fails on 4

    q = tmp_path / "tabs.yaml"
    q.write_text("ema_beta: 0.5\n\tsync: off\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(q)) + r"' line 2"):
        load_config(q)


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"cannot read config file '" + re.escape(str(missing)) + "'"):
        load_config(missing)
    with pytest.raises(ConfigError, match=r"cannot read config file '" + re.escape(str(tmp_path)) + "'"):
        load_config(tmp_path)  # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"cannot read config file '" + re.escape(str(binary)) + "': not UTF-8 text"):
        load_config(binary)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(p)) + r"' must hold a mapping of keys to values, got list"):
        load_config(p)


def test_wrong_config_type() -> None:
    with pytest.raises(ConfigError, match=r"config must be None, a path to a YAML file, a dict or a SalienceConfig; got int"):
        load_config(5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the pruning: section
@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"keep_ratio": 0}, r"'pruning.keep_ratio' must be a number with 0 < keep_ratio <= 1, got 0"),
        ({"keep_ratio": 1.2}, r"'pruning.keep_ratio' must be a number with 0 < keep_ratio <= 1, got 1.2"),
        ({"keep_ratio": "half"}, r"'pruning.keep_ratio' must be a number .* got 'half'"),
        ({"keep_ratio": True}, r"'pruning.keep_ratio' must be a number .* got True"),
        ({"start_step": -1}, r"'pruning.start_step' must be an integer >= 0, got -1"),
        ({"start_step": 1.5}, r"'pruning.start_step' must be an integer >= 0, got 1.5"),
        ({"ramp_steps": 0}, r"'pruning.ramp_steps' must be an integer >= 1 \(or null: derived from the training length\), got 0"),
        ({"ramp_steps": "long"}, r"'pruning.ramp_steps' must be an integer >= 1 .* got 'long'"),
        ({"alpha": 0}, r"'pruning.alpha' must be a number with 0 < alpha <= 1, got 0"),
        ({"alpha": 1.5}, r"'pruning.alpha' must be a number with 0 < alpha <= 1, got 1.5"),
        ({"kinds": []}, r"'pruning.kinds' must be a non-empty list of distinct kinds from head, neuron, hidden, got \[\]"),
        ({"kinds": ["head", "head"]}, r"'pruning.kinds' must be a non-empty list of distinct kinds .* got \['head', 'head'\]"),
        ({"kinds": ["heads"]}, r"'pruning.kinds' must be .* got \['heads'\]"),
        ({"kinds": 3}, r"'pruning.kinds' must be .* got 3"),
        ({"score": "density"}, r"'pruning.score' got 'density'; allowed: outlier_aware, salience"),
        ({"score": "salince"}, r"'pruning.score' got 'salince'; allowed: outlier_aware, salience\. Did you mean 'salience'\?"),
        ({"allocation": "globl"}, r"'pruning.allocation' got 'globl'; allowed: global, relative, uniform\. Did you mean 'global'\?"),
        ({"calibration": "mean"}, r"'pruning.calibration' got 'mean'; allowed: none, site_mean"),
        ({"min_per_site": -1}, r"'pruning.min_per_site' must be an integer >= 0, got -1"),
        ({"unobserved": "drop"}, r"'pruning.unobserved' got 'drop'; allowed: keep, prune"),
        ({"keep": 0.5}, r"unknown config key 'pruning.keep'\. Did you mean 'keep_ratio'\? Valid keys under pruning: "
                        r"allocation, alpha, calibration, keep_ratio, kinds, min_per_site, ramp_steps, score, start_step, "
                        r"unobserved"),
    ],
)
def test_pruning_keys_name_key_value_and_allowed(raw: Dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config({"pruning": raw})


def test_pruning_section_values_and_overrides() -> None:
    cfg = load_config({"pruning": {"kinds": "neuron", "ramp_steps": None, "keep_ratio": 1}})
    assert cfg.pruning.kinds == ("neuron",) and cfg.pruning.ramp_steps is None and cfg.pruning.keep_ratio == 1.0
    assert load_config({"pruning": {"kinds": ["neuron", "head"]}}).pruning.kinds == ("head", "neuron")  # model order
    assert load_config({"pruning": None}).pruning == PruningConfig()
    with pytest.raises(ConfigError, match=r"config key 'pruning' must be a mapping"):
        load_config({"pruning": [1]})
    # keyword overrides: the argument is named, None leaves the value
    p = pruning_config(cfg.pruning, alpha=0.5, keep_ratio=None)
    assert p.alpha == 0.5 and p.keep_ratio == 1.0 and p.kinds == ("neuron",)
    with pytest.raises(ConfigError, match=r"^min_per_site must be an integer >= 0, got -2$"):
        pruning_config(min_per_site=-2)
    with pytest.raises(TypeError, match="unknown pruning option 'keep'"):
        pruning_config(keep=0.5)


def test_numpy_scalars_are_the_numbers_they_are() -> None:
    import numpy as np

    cfg = load_config({"update_frequency": np.int64(2), "ema_beta": np.float32(0.5), "sample_every": np.int32(3),
                       "uncertainty_beta": np.float64(0.25), "kurtosis": {"enabled": np.bool_(False)},
                       "sites": {"head_dim": np.int16(8)}})
    assert (cfg.update_frequency, cfg.sample_every, cfg.sites.head_dim) == (2, 3, 8)
    assert type(cfg.update_frequency) is int and type(cfg.ema_beta) is float and cfg.kurtosis.enabled is False
    assert cfg.ema_beta == 0.5 and cfg.uncertainty_beta == 0.25
    assert cfg.to_dict() == load_config(cfg.to_dict()).to_dict()  # plain Python values: YAML/JSON friendly
    # still refused: booleans as numbers, fractional integers, out of range
    for bad, match in (({"update_frequency": np.bool_(True)}, "update_frequency"), ({"update_frequency": np.float64(2.0)}, "integer"),
                       ({"ema_beta": np.float32(1.5)}, "ema_beta"), ({"kurtosis": {"enabled": np.int64(1)}}, "true or false")):
        with pytest.raises(ConfigError, match=match):
            load_config(bad)
