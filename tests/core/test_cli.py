"""The command line: list/show/plugins/registry, and user errors (exit 2, one message, no traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RLHFZOO = str(Path(sys.executable).parent / "rlhfzoo")


def run(*args, cwd=REPO, env=None):
    return subprocess.run([RLHFZOO, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_list_and_kinds():
    r = run("list")
    assert r.returncode == 0, r.stderr
    for name in ("sft", "gold", "hf", "sentiment", "hh-rlhf"):
        assert f"  {name} " in r.stdout
    r = run("list", "--kind", "tasks")
    assert r.returncode == 0 and "objectives:" not in r.stdout and "sentiment" in r.stdout
    r = run("list", "--kind", "stage")
    assert r.returncode == 0 and r.stdout.startswith("stages:") and "tasks:" not in r.stdout
    for name in ("sft", "reward-model", "judge", "sft-samples", "sft-samples-test"):
        assert f"  {name} " in r.stdout
    assert "[after sft]" in r.stdout
    r = run("list", "--kind", "nonsense")
    assert r.returncode == 2 and "unknown kind" in r.stderr


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_show_lists_every_config_field():
    r = run("show", "hf")
    assert r.returncode == 0, r.stderr
    from rlhfzoo.policy import HFPolicyConfig

    for fname, f in HFPolicyConfig.model_fields.items():
        assert f"    {fname} = " in r.stdout and f.description in r.stdout
    from rlhfzoo.lora import LoraOptions

    for fname, f in LoraOptions.model_fields.items():  # a nested options model's fields, by their dotted names
        assert f"    lora.{fname} = " in r.stdout and f.description in r.stdout


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_show_unknown_name_suggests():
    r = run("show", "sentimnt")
    assert r.returncode == 2
    assert "'sentimnt' is not registered. Did you mean 'sentiment'?" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_plugins_names_packages():
    r = run("plugins")
    assert r.returncode == 0
    assert "rlhfzoo.plugins.sft  [rlhfzoo 0.1.0, built-in]: sft (objective)" in r.stdout


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_registry_check_passes_and_detects_drift(tmp_path):
    r = run("registry", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    stale = tmp_path / "registry.yaml"
    stale.write_text((REPO / "registry.yaml").read_text().replace("sft:", "sft-old:"))
    r = run("registry", "--check", "--path", str(stale))
    assert r.returncode == 1 and "out of step" in r.stderr


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_train_user_errors_exit_2_without_traceback(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task: {name: sentiment\n")
    r = run("train", str(bad_yaml))
    assert r.returncode == 2 and "malformed YAML at line" in r.stderr and "Traceback" not in r.stderr

    typo = tmp_path / "typo.yaml"
    typo.write_text("task: {name: sentiment}\nalgorithm: {name: sftt}\ntrain: {steps: -1}\n")
    r = run("train", str(typo), f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2
    assert "algorithm.name" in r.stderr and "Did you mean 'sft'?" in r.stderr and "train.steps" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a config that never ran

    r = run("--debug", "train", str(typo))
    assert r.returncode == 2 and "Traceback" in r.stderr


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_broken_third_party_plugin_does_not_take_others_down(tmp_path):
    """A plugin package whose module raises at import: reported by name, everything else works."""
    site = tmp_path / "site"
    dist = site / "rlhfzoo_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rlhfzoo-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlhfzoo]\nbroken = rlhfzoo_broken\n")
    (site / "rlhfzoo_broken.py").write_text("raise ImportError('needs a library that is not installed')\n")
    import os

    env = {**os.environ, "PYTHONPATH": str(site)}
    r = run("list", "--kind", "objective", env=env)
    assert r.returncode == 0
    assert "  sft " in r.stdout
    assert "plugin 'rlhfzoo_broken' from package 'rlhfzoo-broken' failed to import" in r.stderr
    assert "needs a library that is not installed" in r.stderr
    env["RLHFZOO_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    r = run("list", env=env)
    assert r.returncode == 0 and "rlhfzoo_broken" not in r.stderr


def test_reward_source_counters_are_printed_at_the_end():
    from rlhfzoo.cli import reward_source_line

    line = reward_source_line("critique", {"judge_fallback_rate": 0.25, "judge_calls": 8.0})
    assert line == "reward source 'critique': judge_calls=8, judge_fallback_rate=0.25"
    assert reward_source_line("gold", {}) is None and reward_source_line(None, {"x": 1.0}) is None


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_stage_builds_or_finds_a_stage_and_reports_user_errors():
    """`rlhfzoo stage NAME`: the test cache holds the sentiment SFT stage, so it is found, not trained."""
    r = run("stage", "sft")
    assert r.returncode == 0, r.stderr
    assert "stage 'sft' of task 'sentiment': " in r.stdout and "training" not in r.stdout
    path = Path(r.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert (path / "config.json").is_file() and (path / "sft_report.json").is_file()

    r = run("stage", "sft-sample")
    assert r.returncode == 2 and "Stage 'sft-sample' is not registered. Did you mean 'sft-samples'?" in r.stderr
    r = run("stage", "sft", "--set", "task.label_noize=0.1", "--set", "train.steps=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "task.label_noize" in r.stderr and "train: a stage depends on its task only" in r.stderr
    r = run("stage", "sft-samples", "--task", "hh-rlhf")
    assert r.returncode == 2 and "task 'hh-rlhf' has no such options" in r.stderr and "Traceback" not in r.stderr
