"""`train.report_to`: accelerate's trackers beside metrics.jsonl; tensorboard's event file read back."""

import json

import pytest

from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.tracking import TrackerError, accelerator_options, flat_config

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, **train):
    return {
        "task": {"name": "sentiment", "n_test_prompts": 8, "n_test_demonstrations": 8},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": "sft"},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False, **train},
        "output_dir": str(tmp_path / "run"),
    }


def test_flat_config_keeps_scalars_and_names_nested_keys():
    assert flat_config({"train": {"lr": 0.1, "report_to": ["tensorboard"]}, "reward": None, "output_dir": "r"}) == {
        "train/lr": 0.1, "train/report_to": "['tensorboard']", "reward": "None", "output_dir": "r"
    }


def test_unknown_and_missing_trackers_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to.0.*'tensorboard', 'wandb'"):
        load_config(data=config(tmp_path, report_to=["tensorbord"]))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrackerError, match=r"wandb, whose package is not installed: `pip install wandb`"):
        accelerator_options(["tensorboard", "wandb"], tmp_path)


def test_tensorboard_receives_every_logged_metric_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfzoo.api import run

    cfg = load_config(data=config(tmp_path, report_to=["tensorboard"]))
    run(cfg, log=lambda *_: None)
    out = tmp_path / "run"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out) for p in out.rglob("*"))
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert [s for s, _ in scalars["loss"]] == [row["step"] for row in logged]
    assert [v for _, v in scalars["loss"]] == pytest.approx([row["loss"] for row in logged], rel=1e-6)
    # The run config is logged as hyperparameters (tensorboard's hparams plugin).
    text = b"".join(p.read_bytes() for p in events)
    assert b"train/lr" in text and b"algorithm/name" in text

