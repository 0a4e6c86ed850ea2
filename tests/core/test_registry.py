"""The plugin registry: lookup, aliases, did-you-mean, duplicates, broken plugins."""

import pytest
import torch

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import LossOutput, Objective
from rlhfzoo.registry import DuplicateNameError, PluginRegistrationError, Registry, UnknownNameError, registry


def make_objective(obj_name, obj_aliases=()):
    class _Obj(Objective):
        name = obj_name
        aliases = obj_aliases
        summary = f"test objective {obj_name}"
        data_kind = "pairs"

        def loss(self, batch, policy, reference=None):
            return LossOutput(torch.tensor(0.0))

    return _Obj


class PluginA:
    @hookimpl
    def register_objectives(self, register):
        register(make_objective("dpo"))
        register(make_objective("ipo"))
        register(make_objective("ppo-clip", ("ppo",)))


class PluginB:  # a second package that also claims "dpo"
    @hookimpl
    def register_objectives(self, register):
        register(make_objective("dpo"))
        register(make_objective("kto"))


class RaisingPlugin:
    @hookimpl
    def register_objectives(self, register):
        register(make_objective("half-registered"))
        raise RuntimeError("boom")


def fresh() -> Registry:
    return Registry(builtins=(), entry_points=False)


def test_lookup_and_alias():
    reg = fresh()
    reg.register_plugin(PluginA(), name="plugin_a", package="pkg-a")
    assert reg.get("objective", "ipo").name == "ipo"
    assert reg.get("objective", "ppo").name == "ppo-clip"
    assert reg.get("objective", "ppo-clip").package == "pkg-a"
    assert reg.names("objective") == ["dpo", "ipo", "ppo-clip"]


def test_unknown_name_says_what_was_meant():
    reg = fresh()
    reg.register_plugin(PluginA(), name="plugin_a")
    with pytest.raises(UnknownNameError) as e:
        reg.get("objective", "ipoo")
    msg = str(e.value)
    assert msg.startswith("Objective 'ipoo' is not registered. Did you mean 'ipo'?")
    assert "Registered objectives: dpo, ipo, ppo-clip, ppo." in msg
    assert "plugin package" in msg and "installed" in msg


def test_unknown_name_without_close_match_lists_names():
    reg = fresh()
    reg.register_plugin(PluginA(), name="plugin_a")
    with pytest.raises(UnknownNameError) as e:
        reg.get("objective", "zzz")
    assert "Did you mean" not in str(e.value)
    assert "dpo" in str(e.value)


def test_duplicate_name_is_an_error_naming_both_plugins():
    reg = fresh()
    reg.register_plugin(PluginA(), name="plugin_a", package="pkg-a")
    with pytest.warns(RuntimeWarning):
        reg.register_plugin(PluginB(), name="plugin_b", package="pkg-b")
    with pytest.raises(DuplicateNameError) as e:
        reg.get("objective", "dpo")
    assert "'plugin_a' (package 'pkg-a')" in str(e.value) and "'plugin_b' (package 'pkg-b')" in str(e.value)
    # The rest of both plugins still works.
    assert reg.get("objective", "kto").package == "pkg-b"
    assert reg.get("objective", "ipo").package == "pkg-a"


def test_plugin_raising_at_registration_is_reported_and_skipped():
    reg = fresh()
    reg.register_plugin(PluginA(), name="plugin_a")
    with pytest.warns(RuntimeWarning, match="failed to register: RuntimeError: boom"):
        reg.register_plugin(RaisingPlugin(), name="raising", package="pkg-bad")
    assert "half-registered" not in reg.names("objective")  # nothing half-registered
    assert any("pkg-bad" in m for m in reg.load_errors)
    assert reg.get("objective", "dpo")


def test_plugin_failing_to_import_is_reported_and_others_work():
    reg = Registry(builtins=("rlhfzoo.plugins.sft", "rlhfzoo.plugins.does_not_exist"), entry_points=False)
    with pytest.warns(RuntimeWarning, match="does_not_exist"):
        names = reg.names("objective")
    assert names == ["sft"]
    assert "ModuleNotFoundError" in reg.load_errors[0]


def test_registering_a_non_objective_is_rejected():
    class Bad:
        @hookimpl
        def register_objectives(self, register):
            register(int)

    reg = fresh()
    with pytest.warns(RuntimeWarning, match="not a subclass of Objective"):
        reg.register_plugin(Bad(), name="bad")


def test_builtins_are_loaded_through_the_plugin_path():
    names = {p.name for p in registry.plugins.values()} if registry._loaded else set()
    registry.names("objective")
    names = {p.name: p for p in registry.plugins.values()}
    assert "rlhfzoo.plugins.sft" in names and names["rlhfzoo.plugins.sft"].builtin
    assert ("objective", "sft") in names["rlhfzoo.plugins.sft"].registered


class _NotAPluginConfig:
    pass


class BadConfigPlugin:
    @hookimpl
    def register_objectives(self, register):
        register(make_objective("fine-one"))
        bad = make_objective("bad-config")
        bad.Config = _NotAPluginConfig
        register(bad)


def test_objective_whose_config_is_not_a_plugin_config_is_rejected_at_registration():
    reg = fresh()
    with pytest.warns(RuntimeWarning, match="'bad-config'.*not a subclass of rlhfzoo.interfaces.PluginConfig"):
        reg.register_plugin(BadConfigPlugin(), name="bad_plugin", package="pkg-bad")
    assert reg.names("objective") == []  # nothing of the plugin half-registered
    assert any("bad_plugin" in m and "bad-config" in m for m in reg.load_errors)
    # Asking for either name says why, instead of "not registered".
    for name in ("bad-config", "fine-one"):
        with pytest.raises(PluginRegistrationError, match=f"Objective '{name}' cannot be used: plugin 'bad_plugin'.*PluginConfig"):
            reg.get("objective", name)
    assert "PluginConfig" in str(reg.missing("bad-config"))
    with pytest.raises(UnknownNameError):
        reg.get("objective", "never-registered")


def test_stages_are_a_plugin_kind():
    from rlhfzoo.interfaces import Stage

    class MyStage(Stage):
        name = "my-stage"
        summary = "a third party's cached step"
        requires = ("sft",)

        def key(self, task):
            return {"task": task.name}

        def build(self, directory, task, log, progress=False):
            (directory / "out.txt").write_text(task.name)

    class StagePlugin:
        @hookimpl
        def register_stages(self, register):
            register(MyStage)

    class NotAStagePlugin:
        @hookimpl
        def register_stages(self, register):
            register(make_objective("not-a-stage"))

    reg = fresh()
    reg.register_plugin(StagePlugin(), name="stage_plugin", package="pkg-stage")
    entry = reg.get("stage", "my-stage")
    assert entry.cls is MyStage and reg.names("stage") == ["my-stage"] and entry.package == "pkg-stage"
    assert entry.metadata()["requires"] == ["sft"] and entry.metadata()["summary"] == "a third party's cached step"
    with pytest.raises(UnknownNameError, match="Stage 'my-stag' is not registered. Did you mean 'my-stage'?"):
        reg.get("stage", "my-stag")
    with pytest.warns(RuntimeWarning, match="register_stages was given .* not a subclass of Stage"):
        reg.register_plugin(NotAStagePlugin(), name="not_a_stage")
    assert reg.names("stage") == ["my-stage"]


def test_builtin_stages_are_registered_by_the_plugins_they_belong_to():
    owners = {e.name: e.plugin for e in registry.entries("stage") if e.package == "rlhfzoo"}
    assert owners == {
        "sft": "rlhfzoo.plugins.sft",
        "reward-model": "rlhfzoo.plugins.reward_model",
        "judge": "rlhfzoo.plugins.critique",
        "sft-samples": "rlhfzoo.plugins.sft_samples",
        "sft-samples-test": "rlhfzoo.plugins.sft_samples",
    }
