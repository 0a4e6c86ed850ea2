"""Cached pipeline stages shared by every run and benchmark: the task's SFT policy and the
samples drawn from it (from which tasks derive preference data). Each is an artifact keyed by
its config (`rlhfzoo.artifacts`), so all algorithms start from the same point and the work is
done once per machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from rlhfzoo.artifacts import artifact


def task_section(task: Any) -> dict[str, Any]:
    return {"name": task.name, **task.sft_task_options()}


def sft_run_data(task: Any) -> dict[str, Any]:
    """The run config (as a mapping) of the task's SFT stage."""
    return {
        "task": task_section(task),
        "policy": {"name": "hf", "init": "scratch", **task.default_model_config()},
        "algorithm": {"name": "sft"},
        "train": {**task.sft_recipe(), "progress": False, "eval_prompts": 0},
    }


def sft_policy_path(task: Any, log=print) -> Path:
    """Directory of the task's SFT policy (transformers format), trained on first use."""
    from rlhfzoo.config import load_config
    from rlhfzoo.evaluation import evaluate
    from rlhfzoo.trainer import Trainer

    data = sft_run_data(task)

    def build(tmp: Path) -> None:
        if log:
            log(f"[rlhfzoo] training the SFT policy for task {task.name!r} (cached for later runs)")
        cfg = load_config(data={**data, "output_dir": str(tmp / "run")})
        trainer = Trainer(cfg, log=log)
        trainer.fit()
        report = evaluate(trainer.policy, trainer.task, n_prompts=128, seed=0)
        (tmp / "run" / "policy" / "sft_report.json").write_text(json.dumps(report, indent=1))
        if log:
            log(f"[rlhfzoo] SFT policy for {task.name!r}: " + ", ".join(f"{k}={v:.3f}" for k, v in report.items()))

    return artifact("sft", data, build, log=log) / "run" / "policy"


# Train settings that change the SFT weights (the rest only change logging, checkpoints, the final evaluation).
WEIGHT_FIELDS = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "lr_schedule",
                 "max_grad_norm", "mixed_precision", "seed", "eval_every")  # eval_every: sampling mid-run draws random numbers
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p")


def is_sft_stage(cfg: Any) -> bool:
    """Whether a resolved run config trains exactly its task's SFT stage (the stage's model,
    objective and weight-relevant train settings), so its result can serve as the stage."""
    from rlhfzoo.config import load_config

    if cfg.algorithm.entry.name != "sft" or cfg.policy.entry.name != "hf":
        return False
    task = cfg.task.create()
    stage = load_config(data={**sft_run_data(task), "output_dir": "unused"})
    policy = {k: v for k, v in cfg.policy.to_dict().items() if k not in SAMPLING_FIELDS}
    stage_policy = {k: v for k, v in stage.policy.to_dict().items() if k not in SAMPLING_FIELDS}
    train, stage_train = cfg.train.model_dump(), stage.train.model_dump()
    return policy == stage_policy and all(train[k] == stage_train[k] for k in WEIGHT_FIELDS)


def adopt_sft_run(cfg: Any, policy_dir: Path, report: dict[str, Any], log=print) -> Path:
    """Cache a finished `rlhfzoo train configs/sft.yaml` run as the task's SFT stage (when none is
    cached yet), so every `init: sft` run starts from it; returns the stage's policy directory."""
    task = cfg.task.create()

    def build(tmp: Path) -> None:
        shutil.copytree(policy_dir, tmp / "run" / "policy")
        (tmp / "run" / "policy" / "sft_report.json").write_text(json.dumps(report, indent=1))

    return artifact("sft", sft_run_data(task), build, log=log) / "run" / "policy"


def sft_samples(task: Any, prompts: Sequence[str], n_per_prompt: int, seed: int = 0, log=print) -> list[list[str]]:
    """`n_per_prompt` responses of the task's SFT policy to each prompt (cached)."""
    from rlhfzoo.evaluation import sample
    from rlhfzoo.policy import HFPolicy, HFPolicyConfig

    key = {"sft": sft_run_data(task), "prompts": list(prompts), "n": n_per_prompt, "seed": seed}

    def build(tmp: Path) -> None:
        policy = HFPolicy(HFPolicyConfig(init=str(sft_policy_path(task, log=log))), task=task)
        repeated = [p for p in prompts for _ in range(n_per_prompt)]
        responses = [r for ro in sample(policy, repeated, batch_size=256, seed=seed) for r in ro.responses]
        grouped = [responses[i * n_per_prompt : (i + 1) * n_per_prompt] for i in range(len(prompts))]
        (tmp / "samples.json").write_text(json.dumps(grouped))

    return json.loads((artifact("sft-samples", key, build, log=log) / "samples.json").read_text())
