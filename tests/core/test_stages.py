"""rlhfzoo.stages: a `rlhfzoo train configs/sft.yaml` run is recognised as the task's SFT stage
(and only when nothing that changes the weights differs), and is then cached as that stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfzoo import stages
from rlhfzoo.config import load_config

REPO = Path(__file__).resolve().parents[2]
SFT_YAML = REPO / "configs" / "sft.yaml"


@pytest.mark.parametrize(
    "overrides, same",
    [
        ([], True),
        (["policy.max_new_tokens=8", "train.eval_prompts=16", "train.progress=false", "train.save_every=100"], True),
        (["task.label_noise=0.1"], True),  # labels are derived after SFT: the stage does not read them
        (["train.lr=1e-3"], False),
        (["train.steps=10"], False),
        (["train.eval_every=100"], False),  # mid-run sampling draws random numbers
        (["policy.n_layer=3"], False),
        (["task.n_demonstrations=300"], True),  # the stage of that task configuration (its own cache key)
        (["algorithm.name=dpo"], False),
    ],
)
def test_which_runs_are_the_sft_stage(overrides, same):
    assert stages.is_sft_stage(load_config(SFT_YAML, overrides)) is same


@pytest.mark.slow
def test_train_configs_sft_yaml_caches_the_sft_stage(tmp_path):
    """The issue's "done when": `rlhfzoo train configs/sft.yaml` trains from nothing, reports the
    grammatical rate and gold reward, and caches the policy as the stage `init: sft` loads."""
    env = {**os.environ, "RLHFZOO_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    r = subprocess.run(
        [str(Path(sys.executable).parent / "rlhfzoo"), "train", str(SFT_YAML), f"output_dir={out}", "train.progress=false"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "grammatical_rate=" in r.stdout and "gold=" in r.stdout
    assert "this run is the SFT stage of task 'sentiment'; cached at" in r.stdout

    code = (
        "from rlhfzoo import stages; from rlhfzoo.plugins.sentiment import SentimentTask; "
        "print(stages.sft_policy_path(SentimentTask(), log=print))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    assert "training the SFT policy" not in found.stdout  # reused, not retrained
    cached = Path(found.stdout.strip().splitlines()[-1])
    report = json.loads((cached / "sft_report.json").read_text())
    assert 0 <= report["grammatical_rate"] <= 1 and "gold" in report
    a, b = load_file(str(out / "policy" / "model.safetensors")), load_file(str(cached / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
