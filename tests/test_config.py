"""Tests for fedavg_relu.core.config: RunConfig.from_mapping, ConfigError, derived settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedavg_relu.core.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _problem(text: str) -> str:
    """A ``match=`` pattern for one literal ``key=value: expected ...`` fragment."""
    return re.escape(text)


# --- round trips -----------------------------------------------------------------
def test_defaults_round_trip_through_mapping():
    """from_mapping(to_mapping(RunConfig())) gives back the defaults, and the mapping is kebab-case."""
    mapping = RunConfig().to_mapping()
    assert RunConfig.from_mapping(mapping) == RunConfig()
    assert "num-server-rounds" in mapping and "learning-rate" in mapping
    assert not any("_" in key for key in mapping)


def test_empty_mapping_gives_defaults():
    """An empty mapping leaves every field at its dataclass default."""
    assert RunConfig.from_mapping({}) == RunConfig()


def test_pyproject_config_keys_and_values_match_dataclass_defaults():
    """[tool.flwr.app.config] has exactly RunConfig's keys and parses to RunConfig()."""
    with PYPROJECT.open("rb") as fh:
        app_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(RunConfig().to_mapping())
    assert RunConfig.from_mapping(app_config) == RunConfig()


def test_replace_validates_and_changes_one_field():
    """replace(width=64) changes only width; replace(width=0) raises ConfigError."""
    cfg = RunConfig().replace(width=64)
    assert cfg.width == 64
    assert dict(cfg.to_mapping(), width=RunConfig().width) == RunConfig().to_mapping()
    with pytest.raises(ConfigError, match=_problem("width=0: expected an integer >= 1")):
        RunConfig().replace(width=0)


# --- one test per class of bad input -------------------------------------------------
def test_config_error_is_a_value_error():
    """ConfigError subclasses ValueError, so `except ValueError` callers still catch it."""
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_is_rejected():
    """A misspelt key ("widht") is named with its value and the word 'unknown key'."""
    with pytest.raises(ConfigError, match=_problem("widht=64: unknown key")) as info:
        RunConfig.from_mapping({"widht": 64})
    assert len(info.value.problems) == 1
    assert "width" in info.value.problems[0]  # the list of known keys is offered


def test_string_for_int_key_is_rejected():
    """width="wide" is a type error: expected an integer, got str."""
    with pytest.raises(ConfigError, match=_problem("width='wide': expected an integer, got str")):
        RunConfig.from_mapping({"width": "wide"})


def test_non_integral_float_for_int_key_is_rejected():
    """depth=1.5 is not an integer (while depth=2.0 is accepted as 2)."""
    with pytest.raises(ConfigError, match=_problem("depth=1.5: expected an integer, got float")):
        RunConfig.from_mapping({"depth": 1.5})
    cfg = RunConfig.from_mapping({"depth": 2.0})
    assert cfg.depth == 2 and isinstance(cfg.depth, int)


def test_bool_for_int_key_is_rejected():
    """width=True is not silently read as width=1."""
    with pytest.raises(ConfigError, match=_problem("width=True: expected an integer, got a boolean")):
        RunConfig.from_mapping({"width": True})


def test_non_boolean_string_for_bool_key_is_rejected():
    """drift-metrics="maybe" is neither true nor false."""
    with pytest.raises(ConfigError, match=_problem("drift-metrics='maybe': expected true or false, got str")):
        RunConfig.from_mapping({"drift-metrics": "maybe"})


def test_string_for_float_key_is_rejected():
    """learning-rate="fast" is a type error: expected a number, got str."""
    with pytest.raises(ConfigError, match=_problem("learning-rate='fast': expected a number, got str")):
        RunConfig.from_mapping({"learning-rate": "fast"})


def test_negative_learning_rate_is_rejected():
    """learning-rate=-0.1 fails the range check 'a finite float > 0'."""
    with pytest.raises(ConfigError, match=_problem("learning-rate=-0.1: expected a finite float > 0")):
        RunConfig.from_mapping({"learning-rate": -0.1})


def test_nan_learning_rate_is_rejected():
    """learning-rate=nan fails the range check (nan > 0 is False)."""
    with pytest.raises(ConfigError, match=_problem("learning-rate=nan: expected a finite float > 0")):
        RunConfig.from_mapping({"learning-rate": float("nan")})


def test_zero_width_is_rejected():
    """width=0 fails 'an integer >= 1'."""
    with pytest.raises(ConfigError, match=_problem("width=0: expected an integer >= 1")):
        RunConfig.from_mapping({"width": 0})


def test_unknown_model_family_is_rejected():
    """model-family="resnet" is not one of standard, ntk, paper."""
    with pytest.raises(ConfigError, match=_problem("model-family='resnet': expected one of ('standard', 'ntk', 'paper')")):
        RunConfig.from_mapping({"model-family": "resnet"})


def test_unknown_dataset_is_rejected():
    """dataset="imagenet" is not a supported data set."""
    with pytest.raises(ConfigError, match=_problem("dataset='imagenet': expected one of (")):
        RunConfig.from_mapping({"dataset": "imagenet"})


def test_unknown_partitioner_is_rejected():
    """partitioner="shards" is not one of iid, dirichlet, pathological."""
    with pytest.raises(
        ConfigError, match=_problem("partitioner='shards': expected one of ('iid', 'dirichlet', 'pathological')")
    ):
        RunConfig.from_mapping({"partitioner": "shards"})


def test_out_of_range_fractions_are_rejected():
    """test-fraction=1.0 is outside (0, 1) and momentum=1.0 outside [0, 1)."""
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"test-fraction": 1.0, "momentum": 1.0})
    assert info.value.problems == [
        "test-fraction=1.0: expected a float in (0, 1)",
        "momentum=1.0: expected a float in [0, 1)",
    ]


def test_pathological_classes_exceeding_synthetic_classes_is_rejected():
    """classes-per-partition=5 > synthetic-num-classes=4 with a pathological synthetic split is named."""
    mapping = {"dataset": "synthetic", "partitioner": "pathological", "classes-per-partition": 5}
    with pytest.raises(ConfigError, match=_problem("classes-per-partition=5: expected at most the 4 classes")):
        RunConfig.from_mapping(mapping)


def test_pathological_classes_exceeding_digits_classes_is_rejected():
    """digits has 10 classes: classes-per-partition=11 is refused before any data is loaded."""
    mapping = {"dataset": "digits", "partitioner": "pathological", "classes-per-partition": 11}
    with pytest.raises(ConfigError, match=_problem("classes-per-partition=11: expected at most the 10 classes")):
        RunConfig.from_mapping(mapping)


def test_all_problems_are_listed_at_once():
    """Four independent mistakes give four entries in err.problems, each naming its key and value."""
    bad = {"widht": 64, "width": 0, "depth": 1.5, "learning-rate": -1.0}
    with pytest.raises(ConfigError, match=re.escape("(4 problem(s))")) as info:
        RunConfig.from_mapping(bad)
    problems = info.value.problems
    assert len(problems) == 4
    for fragment in ("widht=64", "width=0", "depth=1.5", "learning-rate=-1.0"):
        assert sum(p.startswith(fragment + ":") for p in problems) == 1, fragment
    for p in problems:  # every problem is also in the message
        assert p in str(info.value)


# --- accepted conversions ------------------------------------------------------------
def test_int_accepted_for_float_key():
    """learning-rate=1 (an int, as TOML writes it) becomes the float 1.0."""
    cfg = RunConfig.from_mapping({"learning-rate": 1})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


def test_batch_size_full_means_full_batch():
    """batch-size="full" (any case) parses to 0 and full_batch is True; 32 is not full batch."""
    for spelling in ("full", "FULL"):
        cfg = RunConfig.from_mapping({"batch-size": spelling})
        assert cfg.batch_size == 0 and cfg.full_batch is True
    assert RunConfig.from_mapping({"batch-size": 0}).full_batch is True
    assert RunConfig.from_mapping({"batch-size": 32}).full_batch is False
    with pytest.raises(ConfigError, match=_problem("batch-size='half': expected an integer >= 0 or \"full\", got str")):
        RunConfig.from_mapping({"batch-size": "half"})
    with pytest.raises(ConfigError, match=_problem("batch-size=-1: expected an integer >= 0")):
        RunConfig.from_mapping({"batch-size": -1})


def test_bool_keys_accept_python_bools_and_true_false_strings():
    """drift-metrics=False stays False; the strings "true"/"False" parse to the matching bools."""
    assert RunConfig.from_mapping({"drift-metrics": False}).drift_metrics is False
    assert RunConfig.from_mapping({"tensorboard": True}).tensorboard is True
    assert RunConfig.from_mapping({"save-model": "False"}).save_model is False
    assert RunConfig.from_mapping({"tensorboard": "true"}).tensorboard is True


# --- derived settings ----------------------------------------------------------------
def test_effective_learning_rate_width_scaling():
    """lr-scaling=width: eta = learning_rate * d / m = 2.0 * 64 / 256 = 0.5."""
    cfg = RunConfig.from_mapping({"learning-rate": 2.0, "width": 256, "lr-scaling": "width"})
    assert cfg.effective_learning_rate(64) == 0.5
    assert cfg.effective_learning_rate(20) == pytest.approx(2.0 * 20 / 256)


def test_effective_learning_rate_constant():
    """lr-scaling=constant: eta = learning_rate = 2.0 whatever d and m are."""
    cfg = RunConfig.from_mapping({"learning-rate": 2.0, "width": 256, "lr-scaling": "constant"})
    assert cfg.effective_learning_rate(64) == 2.0
    assert cfg.effective_learning_rate(1) == 2.0
