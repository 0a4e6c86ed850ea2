"""The third-party example in examples/rlhfzoo-slic, installed the way a user would (pip),
is discovered through its entry point, selectable by name in a config, and trains."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "rlhfzoo-slic"


@pytest.fixture
def plugin_env(example_plugin_env):
    return example_plugin_env


def rlhfzoo(*args, env):
    return subprocess.run([str(Path(sys.executable).parent / "rlhfzoo"), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_listed_with_its_package(plugin_env):
    r = rlhfzoo("list", "--kind", "objective", env=plugin_env)
    assert r.returncode == 0, r.stderr
    assert "slic-hf" in r.stdout and "<rlhfzoo-slic>" in r.stdout
    r = rlhfzoo("plugins", env=plugin_env)
    assert "rlhfzoo_slic  [rlhfzoo-slic 0.1.0, entry point]: slic-hf (objective)" in r.stdout


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_selected_by_name_in_a_config_and_trains(plugin_env, tmp_path):
    from rlhfzoo.testing import TINY_POLICY

    cfg = {
        "task": {"name": "sentiment"},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": "slic", "delta": 0.5},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "slic.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = rlhfzoo("train", str(path), env=plugin_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").exists()
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["algorithm"] == {"name": "slic-hf", "delta": 0.5, "reg_weight": 0.1, "length_normalize": True}
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_contract_suite_runs_on_the_third_party_objective(plugin_env, tmp_path):
    code = f"from rlhfzoo.testing import check_objective; check_objective('slic-hf', {str(tmp_path / 'c')!r}); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
