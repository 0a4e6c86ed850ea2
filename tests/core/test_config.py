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


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        read_yaml(tmp_path)


# ------------------------------------------------------------------------------ duplicate keys


def test_duplicate_keys_are_an_error_naming_file_and_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("task: {name: sentiment}\nalgorithm: {name: sft}\ntrain:\n  steps: 3\n  lr: 0.1\n  steps: 5\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(p)
    msg = str(e.value)
    assert str(p) in msg and "duplicate key 'steps' at line 6 (first given at line 4)" in msg

    p.write_text("task: {name: sentiment}\ntask: {name: hh-rlhf}\n")
    with pytest.raises(ConfigError, match="duplicate key 'task' at line 2 .first given at line 1."):
        read_yaml(p)


def test_same_key_in_different_mappings_and_merge_keys_are_fine(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(
        "base: &base {steps: 3, lr: 0.1}\n"
        "train: {<<: *base, steps: 5}\n"  # overriding a merged-in key is what merge keys are for
        "algorithm: {name: sft, steps: 1}\n"
    )
    data = read_yaml(p)
    assert data["train"] == {"steps": 5, "lr": 0.1} and data["algorithm"]["steps"] == 1


def test_duplicate_keys_in_an_override_value():
    with pytest.raises(ConfigError, match="duplicate key 'a' in the value"):
        apply_overrides({}, ["x.y={a: 1, a: 2}"])


# ------------------------------------------------------------------------------ numbers


def _float_fields(model) -> list[str]:
    """Names of the fields whose type accepts a float (float, float | None, ...; not a mapping of
    floats such as `train.budget`, whose values are checked where it is defined)."""
    import typing

    def has_float(t) -> bool:
        return t is float or (typing.get_origin(t) is not dict and any(has_float(a) for a in typing.get_args(t)))

    return [name for name, f in model.model_fields.items() if has_float(f.annotation)]


def _rejects_as_non_finite(model, field: str, value: float) -> bool:
    from pydantic import ValidationError

    try:
        model(**{field: value})
    except ValidationError as e:
        return any(err["loc"][0] == field and err["type"] == "finite_number" for err in e.errors())
    return False


def test_non_finite_numbers_are_rejected_in_every_float_field():
    from rlhfzoo.registry import registry

    models = [TrainConfig] + [e.cls.Config for e in registry.entries()]
    checked = 0
    for model in models:
        for field in _float_fields(model):
            for value in (float("inf"), float("-inf"), float("nan")):
                assert _rejects_as_non_finite(model, field, value), f"{model.__name__}.{field} accepts {value}"
            checked += 1
    assert checked > 20  # lr, beta, temperature, ... : the check did look at fields


def test_non_finite_numbers_from_yaml_and_overrides():
    with pytest.raises(ConfigError) as e:
        load_config(data=BASE, overrides=["train.lr=.inf", "algorithm.name=dpo", "algorithm.beta=.nan"])
    paths = {p for p, _ in e.value.errors}
    assert paths == {"train.lr", "algorithm.beta"} and "finite number" in str(e.value)


def test_learning_rate_has_an_upper_bound():
    with pytest.raises(ConfigError, match=r"train\.lr: Input should be less than or equal to 1"):
        load_config(data=BASE, overrides=["train.lr=1e39"])
    assert load_config(data=BASE, overrides=["train.lr=1.0"]).train.lr == 1.0


def test_a_plugins_own_check_reads_as_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(data={**BASE, "algorithm": {"name": "bradley-terry", "utility": "power", "gamma": 2}})
    assert e.value.errors == [("algorithm", "utility `power` needs 0 < gamma <= 1 (a concave x^gamma), got gamma=2.0")]


# ------------------------------------------------------------------------------ nested plugin sections


def _holder():
    """A plugin config that holds a policy section and a list of reward sources with a share each."""
    from pydantic import Field

    from rlhfzoo.interfaces import PluginConfig
    from rlhfzoo.sections import PluginSection, PolicySection

    class Share(PluginConfig):
        share: float = Field(1.0, description="The holder's own setting of each source.")

    SharedSource = PluginSection.of("reward_source", own=Share)

    class Holder(PluginConfig):
        policy: PolicySection = Field(default_factory=lambda: {"name": "hf", "init": "sft"}, validate_default=True)
        sources: list[SharedSource] = []

    return Holder


def test_a_nested_section_is_a_name_or_a_mapping_and_dumps_as_written():
    Holder = _holder()
    h = Holder(policy={"top_k": 2, "name": "transformers", "init": "scratch"}, sources=["gold", {"name": "reward-model", "share": 0.5, "path": "auto"}])
    assert h.model_dump(mode="json") == {
        "policy": {"top_k": 2, "name": "transformers", "init": "scratch"},  # as written: the alias, no defaults filled in
        "sources": [{"name": "gold"}, {"name": "reward-model", "share": 0.5, "path": "auto"}],
    }
    assert Holder.model_validate(h.model_dump(mode="json")) == h
    assert h.policy.entry.name == "hf" and h.policy.name == "transformers" and h.policy.config.top_k == 2
    assert Holder().policy.required_stages() == ["sft"] and h.policy.required_stages() == []
    rm = h.sources[1]
    assert rm.options == {"path": "auto"} and rm.own.share == 0.5 and rm.config.path == "auto"
    assert rm.required_stages() == ["reward-model"]
    moved = rm.with_options(batch_size=8)
    assert moved.config.batch_size == 8 and moved.own.share == 0.5 and moved.to_dict()["batch_size"] == 8


def test_a_nested_sections_problems_are_at_their_path_with_the_nested_plugins_did_you_mean():
    from pydantic import ValidationError

    Holder = _holder()
    with pytest.raises(ValidationError) as e:
        Holder(policy={"name": "hf", "n_layr": 2}, sources=[{"name": "gold", "share": "most"}, {"name": "gld"}, 3])
    found = {tuple(err["loc"]): err["msg"] for err in e.value.errors()}
    assert set(found) == {("policy", "n_layr"), ("sources", 0, "share"), ("sources", 1, "name"), ("sources", 2)}
    assert found[("policy", "n_layr")].startswith("unknown key 'n_layr'. Did you mean 'n_layer'? Valid keys: init, arch,")
    assert "Did you mean 'gold'?" in found[("sources", 1, "name")]
    assert found[("sources", 2)] == "must be a mapping with a `name`, got int"


def test_nested_sections_in_a_run_config_are_reported_at_their_full_path():
    data = {"task": "sentiment", "policy": {"name": "best-of-n", "base": {"name": "best-of-n", "base": {"name": "hf", "n_layr": 2}}}}
    with pytest.raises(ConfigError) as e:
        load_config(data=data, require=("task",))
    assert [p for p, _ in e.value.errors] == ["policy.base.base.n_layr"]
    assert "Did you mean 'n_layer'?" in str(e.value)


def test_unknown_key_of_a_nested_options_model_lists_that_models_keys():
    with pytest.raises(ConfigError) as e:
        load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "output_dir": "out",
                          "policy": {"name": "hf", "init": "scratch", "lora": {"rank": 4, "merge_on_save": True}}})
    assert "policy.lora.rank: unknown key 'rank'. Valid keys: r, lora_alpha, lora_dropout, target_modules, merge_on_save." in str(e.value)
