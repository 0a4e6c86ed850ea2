"""`rlhfzoo train` with bad input: one `error: ...` line naming the place and the fix, exit
status 2, no traceback -- for configs, model and tokenizer paths, reward models, data files,
numbers and broken plugins."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfzoo import sections as sections_module
from rlhfzoo import cli, hookimpl
from rlhfzoo.interfaces import LossOutput, Objective
from rlhfzoo.registry import BUILTIN_PLUGINS, Registry

RLHFZOO = str(Path(sys.executable).parent / "rlhfzoo")

TINY_YAML = """\
task: {name: sentiment}
policy: {name: hf, init: scratch, n_layer: 1, n_embd: 32, n_head: 2, max_new_tokens: 12}
algorithm: {name: sft}
train: {steps: 1, batch_size: 4, eval_prompts: 0, progress: false}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML + f"output_dir: {tmp_path / 'run'}\n")
    return path


def user_error(capsys, *argv: str) -> str:
    """Run the command line in this process; assert it failed as a user error; return the message."""
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------ the config file


def test_config_path_that_is_a_directory(capsys, tmp_path):
    err = user_error(capsys, "train", str(tmp_path))
    assert str(tmp_path) in err and "is a directory" in err


def test_missing_config_file(capsys, tmp_path):
    err = user_error(capsys, "train", str(tmp_path / "absent.yaml"))
    assert "file not found" in err and "absent.yaml" in err


def test_duplicate_yaml_keys(capsys, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TINY_YAML + "train: {steps: 5}\n")
    err = user_error(capsys, "train", str(path))
    assert "duplicate key 'train'" in err and "line 5" in err and "line 4" in err and str(path) in err


# ------------------------------------------------------------------------------ models and tokenizers


def test_policy_init_that_does_not_exist(capsys, tiny, tmp_path):
    err = user_error(capsys, "train", str(tiny), "policy.init=/nope")
    assert "policy.init" in err and "'/nope'" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()  # a config error: nothing written


def test_policy_init_directory_that_is_not_a_model(capsys, tiny, tmp_path):
    err = user_error(capsys, "train", str(tiny), f"policy.init={tmp_path}")
    assert "policy.init" in err and "config.json" in err


def test_policy_init_with_a_broken_model(capsys, tiny, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # looks like a model directory, but is not one
    err = user_error(capsys, "train", str(tiny), f"policy.init={broken}")
    assert "policy.init" in err and str(broken) in err and "could not load" in err


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_policy_init_hub_id_without_network(tiny, tmp_path):
    """A hub id is accepted by the config; without network, loading it is one message too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(
        [RLHFZOO, "train", str(tiny), "policy.init=some-org/some-model"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "'some-org/some-model'" in r.stderr and "hub" in r.stderr


def test_tokenizer_that_does_not_exist_or_is_not_a_tokenizer(capsys, tiny, tmp_path):
    err = user_error(capsys, "train", str(tiny), "policy.tokenizer=/nope/tok")
    assert "policy.tokenizer" in err and "does not exist" in err
    err = user_error(capsys, "train", str(tiny), f"policy.tokenizer={tmp_path}")
    assert "policy.tokenizer" in err and "tokenizer" in err
    corrupt = tmp_path / "tok"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text("not json")
    err = user_error(capsys, "train", str(tiny), f"policy.tokenizer={corrupt}")
    assert "policy.tokenizer" in err and str(corrupt) in err and "could not load" in err


def test_reward_model_path_that_does_not_exist_or_is_not_a_reward_model(capsys, tiny, tmp_path):
    err = user_error(capsys, "train", str(tiny), "reward.name=reward-model", "reward.path=/nope")
    assert "reward.path" in err and "does not exist" in err
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    err = user_error(capsys, "train", str(tiny), "reward.name=reward-model", f"reward.path={plain}")
    assert "reward.path" in err and "not a reward model" in err
    (plain / "value_head.safetensors").write_bytes(b"")  # a reward model's files, but broken
    err = user_error(capsys, "train", str(tiny), "reward.name=reward-model", f"reward.path={plain}")
    assert str(plain) in err and "could not load" in err


# ------------------------------------------------------------------------------ data


def test_missing_data_file(capsys, tiny):
    err = user_error(capsys, "train", str(tiny), "task.name=hh-rlhf", "task.path=/nope.jsonl")
    assert "task.path" in err and "/nope.jsonl" in err


def test_missing_default_data_file(capsys, tiny, monkeypatch):
    monkeypatch.setenv("RLHFZOO_HH_PATH", "/nope/hh.jsonl")
    err = user_error(capsys, "train", str(tiny), "task.name=hh-rlhf")
    assert "/nope/hh.jsonl" in err and "RLHFZOO_HH_PATH" in err


# ------------------------------------------------------------------------------ numbers


def test_context_shorter_than_max_length(capsys, tiny):
    err = user_error(capsys, "train", str(tiny), "policy.n_positions=16", "policy.max_length=64")
    assert "policy" in err and "max_length" in err and "n_positions" in err


@pytest.mark.parametrize("override", ["train.lr=1e39", "train.lr=.inf", "train.lr=.nan", "train.weight_decay=.inf"])
def test_absurd_or_non_finite_numbers(capsys, tiny, override):
    key = override.split("=")[0]
    err = user_error(capsys, "train", str(tiny), override)
    assert key in err


# ------------------------------------------------------------------------------ broken plugins


class _NotAPluginConfig:
    """A `Config` that is not a pydantic PluginConfig."""


class _BadConfigObjective(Objective):
    name = "bad-config"
    summary = "an objective whose Config is not a PluginConfig"
    Config = _NotAPluginConfig

    def loss(self, batch, policy, reference=None):
        return LossOutput(None)


class _BadConfigPlugin:
    @hookimpl
    def register_objectives(self, register):
        register(_BadConfigObjective)


@pytest.fixture
def registry_with_a_bad_plugin(monkeypatch):
    reg = Registry(builtins=BUILTIN_PLUGINS, entry_points=False)
    reg.names("objective")  # load the built-ins
    with pytest.warns(RuntimeWarning):
        reg.register_plugin(_BadConfigPlugin(), name="bad_plugin", package="rlhfzoo-bad")
    monkeypatch.setattr(cli, "registry", reg)
    monkeypatch.setattr(sections_module, "registry", reg)  # where config sections look plugins up
    return reg


def test_plugin_whose_config_is_not_a_plugin_config(capsys, tiny, registry_with_a_bad_plugin):
    for argv in (["show", "bad-config"], ["train", str(tiny), "algorithm.name=bad-config"]):
        err = user_error(capsys, *argv)
        assert "'bad-config'" in err and "bad_plugin" in err and "PluginConfig" in err
