"""The contract every objective must meet, usable by third-party plugin authors:

    from rlhfzoo.testing import check_objective

    def test_my_objective(tmp_path):
        check_objective("my-algo", tmp_path)

Two optimizer steps on a tiny policy with the objective's data kind (or, for online objectives,
one iteration of rollout -> reward -> experience -> updates) through the real trainer, then:
the loss is finite, the parameters changed, and a checkpoint written and read back restores
the weights, the optimizer and the objective's state exactly. The trainer builds the cached
stages the run reads first (e.g. the SFT samples sentiment's pairs come from).

A stage's contract, checked without building it (that may take minutes), `check_stage`:

    from rlhfzoo.testing import check_stage

    def test_my_stage():
        check_stage("my-stage", task="sentiment")
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from rlhfzoo import stages
from rlhfzoo.config import load_config
from rlhfzoo.registry import registry
from rlhfzoo.trainer import Trainer

TINY_POLICY = {"name": "hf", "init": "scratch", "n_layer": 1, "n_embd": 32, "n_head": 2, "max_new_tokens": 12}


def contract_config(objective: str, output_dir: str | Path, task: str = "sentiment", reward: str | None = "gold", **options: Any) -> dict:
    data: dict[str, Any] = {
        "task": {"name": task},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": objective, **options},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(output_dir),
    }
    if reward:
        data["reward"] = {"name": reward}
    return data


def check_objective(objective: str, output_dir: str | Path, task: str = "sentiment", reward: str | None = "gold", **options: Any) -> dict:
    """Run the contract on a registered objective; raises AssertionError on a breach."""
    cfg = load_config(data=contract_config(objective, output_dir, task, reward, **options))
    trainer = Trainer(cfg, log=lambda *_: None)
    needs_value = trainer.objective.needs_value_head
    assert not needs_value or trainer.policy.module.value_head is not None, f"{objective}: needs a value head"
    before = {k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}

    trainer.prepare_output(resume=False, overwrite=True)
    metrics = {}
    for step in range(2):
        metrics = trainer.train_step(step)
        trainer.step = step + 1
        assert "loss" in metrics and torch.isfinite(torch.tensor(metrics["loss"])), f"{objective}: loss not finite: {metrics}"
        for k, v in metrics.items():
            assert isinstance(v, float), f"{objective}: metric {k!r} is {type(v).__name__}, expected float"

    after = trainer.policy.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"{objective}: two optimizer steps changed no parameter"

    ckpt = trainer.save_checkpoint()
    saved = {k: v.detach().clone() for k, v in after.items()}
    saved_objective = trainer.objective.state_dict()
    opt_state = trainer.optimizer.state_dict()["state"]
    # Perturb, then restore from the checkpoint.
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(1.0)
    trainer.load_checkpoint(ckpt)
    restored = trainer.policy.module.state_dict()
    for k in saved:
        assert torch.equal(saved[k], restored[k]), f"{objective}: checkpoint did not restore {k}"
    assert trainer.step == 2
    assert _nested_equal(trainer.objective.state_dict(), saved_objective), f"{objective}: objective state not restored"
    reloaded = trainer.optimizer.state_dict()["state"]
    for i in opt_state:
        for k, v in opt_state[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(reloaded[i][k])), f"{objective}: optimizer state {k}"
    return metrics


def _nested_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    return a == b


def check_stage(name: str, task: str = "sentiment", **task_options: Any) -> dict[str, Any]:
    """The contract of a registered stage, without building it: its key for the task is a non-empty
    JSON object (no stand-in string conversions) and the same for an equal task, what it requires
    is registered and free of cycles, and its output lies inside its artifact. Returns the key."""
    stage = stages.get(name)
    key = stage.key(registry.create("task", task, dict(task_options)))
    assert isinstance(key, dict) and key, f"stage {name!r}: key() must be a non-empty dict, got {key!r}"
    text = json.dumps(key, sort_keys=True)  # raises on anything JSON cannot hold exactly
    again = stage.key(registry.create("task", task, dict(task_options)))
    assert json.dumps(again, sort_keys=True) == text, f"stage {name!r}: key() differs between two equal tasks"

    def requirements(n: str, chain: tuple[str, ...]) -> None:
        assert n not in chain, f"stage {name!r}: stages require each other in a cycle: {' -> '.join([*chain, n])}"
        for r in registry.get("stage", n).cls.requires:
            requirements(registry.get("stage", r).name, (*chain, n))

    requirements(registry.get("stage", name).name, ())
    output = PurePosixPath(stage.output)
    assert not output.is_absolute() and ".." not in output.parts, f"stage {name!r}: output {stage.output!r} leaves the artifact"
    return key
