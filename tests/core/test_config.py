"""Run configs: YAML, overrides, validation against each plugin's own Config, errors at once."""

import pytest

from rlhfzoo.config import ConfigError, TrainConfig, apply_overrides, load_config, read_yaml

BASE = {"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "train": {"steps": 3}}


def test_valid_config_resolves_defaults():
    cfg = load_config(data=BASE, overrides=["train.lr=0.002", "policy.init=scratch"])
    assert cfg.algorithm.entry.name == "sft"
    assert cfg.train.lr == 0.002 and cfg.train.steps == 3
    assert cfg.policy.name == "hf" and cfg.policy.config.init == "scratch"
    assert cfg.output_dir == "runs/sft"
    d = cfg.to_dict()
    assert d["policy"]["init"] == "scratch" and d["train"]["batch_size"] == TrainConfig().batch_size


def test_all_errors_reported_at_once_with_dotted_paths():
    data = {
        "task": {"name": "sentiment"},
        "algorithm": {"name": "sftt"},
        "policy": {"name": "hf", "max_lenght": 12, "temperature": "hot"},
        "train": {"stepz": 3, "lr": -1},
        "rewrd": {"name": "gold"},
    }
    with pytest.raises(ConfigError) as e:
        load_config(data=data)
    paths = [p for p, _ in e.value.errors]
    assert set(paths) == {"rewrd", "algorithm.name", "policy.max_lenght", "policy.temperature", "train.stepz", "train.lr"}
    msg = str(e.value)
    assert "6 problems" in msg
    assert "Did you mean 'sft'?" in msg
    assert "unknown key 'max_lenght'. Did you mean 'max_length'?" in msg
    assert "unknown key 'stepz'. Did you mean 'steps'?" in msg
    assert "unknown section. Did you mean 'reward'?" in msg


def test_missing_required_sections():
    with pytest.raises(ConfigError) as e:
        load_config(data={"train": {"steps": 1}})
    assert [p for p, _ in e.value.errors] == ["task", "algorithm"]


def test_overrides_parse_yaml_values_and_reject_malformed():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=0.5", "a.c=true", "x.y.z=[1, 2]", "s=hello"])
    assert data == {"a": {"b": 0.5, "c": True}, "x": {"y": {"z": [1, 2]}}, "s": "hello"}
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["algorithm.beta"])


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("task:\n  name: sentiment\nalgorithm: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(p)
    assert "malformed YAML at line" in str(e.value) and str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_every_config_field_is_described():
    from rlhfzoo.registry import registry

    for entry in (e for e in registry.entries() if e.package == "rlhfzoo"):  # what this distribution ships
        for fname, f in entry.cls.Config.model_fields.items():
            assert f.description, f"{entry.kind} {entry.name}: field {fname!r} has no description"
        assert entry.cls.Config.model_config.get("extra") == "forbid", entry.name
    for fname, f in TrainConfig.model_fields.items():
        assert f.description, fname
