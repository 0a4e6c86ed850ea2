"""`train.eval_target`: a run ends at the first periodic evaluation whose held-out figure reaches
the target (`steps` is the cap), says where in its summary, and a target that is never evaluated,
or names a figure the run's evaluation does not report, is refused."""

import json

import pytest

from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, target, steps=6, eval_every=2, **train):
    data = {
        "task": {"name": "sentiment"},
        "policy": {**TINY_POLICY, "max_new_tokens": 4},
        "algorithm": {"name": "sft"},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "eval_every": eval_every, "eval_prompts": 4,
                  "progress": False, "eval_target": target, **train},
        "output_dir": str(out),
    }
    return load_config(data=data)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_reached_target_ends_the_run_at_that_evaluation(tmp_path):
    summary = Trainer(config(tmp_path / "run", {"gold": -1e9}), log=lambda *_: None).fit()
    # the first periodic evaluation is after step 2; any gold is above -1e9
    assert summary["finished"] and summary["step"] == 2
    assert summary["eval_target"] == {"gold": -1e9, "reached_at_step": 2}
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2] and "eval/gold" in rows(tmp_path / "run")[-1]
    assert (tmp_path / "run" / "policy").is_dir() and "eval" in summary  # finished as usual: weights and final figures


def test_an_unreached_target_runs_to_the_step_cap(tmp_path):
    summary = Trainer(config(tmp_path / "run", {"gold": 1e9}, steps=5), log=lambda *_: None).fit()
    assert summary["finished"] and summary["step"] == 5
    assert summary["eval_target"] == {"gold": 1e9, "reached_at_step": None}
    assert [r["step"] for r in rows(tmp_path / "run") if "eval/gold" in r] == [2, 4]


def test_a_target_needs_periodic_evaluations_and_a_known_figure(tmp_path):
    with pytest.raises(ConfigError, match="train: .*eval_every and train.eval_prompts above 0"):
        config(tmp_path / "a", {"gold": 0.5}, eval_every=0)
    with pytest.raises(ConfigError, match="train.eval_target: .*one figure of gold, proxy"):
        config(tmp_path / "b", {"accuracy": 0.5})
    with pytest.raises(ConfigError, match="train.eval_target: .*one figure"):
        config(tmp_path / "c", {"gold": 0.5, "proxy": 0.5})


def test_a_figure_the_evaluation_does_not_report_is_named(tmp_path):
    # SFT trains against no reward source: its evaluation has gold but no proxy
    trainer = Trainer(config(tmp_path / "run", {"proxy": 0.0}), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"train.eval_target: this run's evaluation reports no `proxy` \(it reports gold"):
        trainer.fit()
