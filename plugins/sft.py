"""Supervised fine-tuning: negative log-likelihood of the response tokens, prompt masked.

    L = - (1 / |y|) sum_t log pi(y_t | x, y_<t)        (token mean over the optimizer step: all its
                                                        micro-batches and processes, `ops.step_denominator`)

The first stage of the RLHF pipeline (InstructGPT, arXiv:2203.02155, Sec. 3.5) and the
objective a critique judge is trained with.

The `sft` stage is a task's SFT policy, trained once per cache and read by every `hf` policy with
`init: sft`: this objective on the task's demonstrations, from a model trained from scratch with
the task's `sft_recipe()`. A `rlhfzoo train` run of the same recipe (`configs/sft.yaml`) is
adopted as the stage instead of training it a second time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.config import load_config
from rlhfzoo.evaluation import evaluate
from rlhfzoo.interfaces import BenchProtocol, LossOutput, Objective, PluginConfig
from rlhfzoo.ops import response_nll, step_denominator
from rlhfzoo.stages import TrainingStage

REPORT_FILE = "sft_report.json"  # held-out figures of the stage's policy, beside its weights


class SFTConfig(PluginConfig):
    examples: str = Field(
        "demonstrations",
        description="Which of the task's example kinds to imitate: `demonstrations`, or e.g. `critiques` to train a judge.",
    )


class SFT(Objective):
    name = "sft"
    summary = "Supervised fine-tuning: NLL on response tokens, prompt tokens masked."
    paper = "Ouyang et al. 2022, arXiv:2203.02155"
    data_kind = "demonstrations"
    bench = BenchProtocol(contender=False)  # the baseline every bench row starts from
    Config = SFTConfig

    def example_kind(self) -> str:
        return self.config.examples

    def loss(self, batch, policy, reference=None) -> LossOutput:
        seq = batch.sequences
        logprobs = policy.logprobs(seq.input_ids, seq.attention_mask)
        n_tokens = seq.response_mask[:, 1:].sum()
        nll = response_nll(logprobs, seq.response_mask, count=step_denominator(batch, n_tokens))
        return LossOutput(nll, {"nll": nll.item(), "response_tokens": n_tokens.item() / len(seq)})


# ------------------------------------------------------------------------------ the cached stage


def sft_run_data(task: Any) -> dict[str, Any]:
    """The run config (as a mapping) of the task's SFT stage; also the stage's cache key."""
    return {
        "task": {"name": task.name, **task.sft_task_options()},
        "policy": {"name": "hf", "init": "scratch", **task.default_model_config()},
        "algorithm": {"name": "sft"},
        "train": {"eval_prompts": 0, **task.sft_recipe(), "progress": False},  # a recipe may evaluate (eval_target)
    }


# Train settings that change the SFT weights (the rest only change logging, checkpoints, the final evaluation).
WEIGHT_FIELDS = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "lr_schedule",
                 "max_grad_norm", "mixed_precision", "seed", "eval_every", "eval_target", "num_threads")
# eval_every: sampling mid-run draws random numbers (as many as eval_prompts asks for, then); eval_target:
# where the run ends; num_threads: the order of the CPU's sums
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p")


def is_sft_stage(cfg: Any) -> bool:
    """Whether a resolved run config trains exactly its task's SFT stage (the stage's model,
    objective and weight-relevant train settings), so its result can serve as the stage."""
    if cfg.algorithm.entry.name != "sft" or cfg.policy.entry.name != "hf":
        return False
    stage = load_config(data={**sft_run_data(cfg.task.create()), "output_dir": "unused"})
    policy = {k: v for k, v in cfg.policy.to_dict().items() if k not in SAMPLING_FIELDS}
    stage_policy = {k: v for k, v in stage.policy.to_dict().items() if k not in SAMPLING_FIELDS}
    train, stage_train = cfg.train.model_dump(), stage.train.model_dump()
    fields = WEIGHT_FIELDS + (("eval_prompts",) if stage_train["eval_every"] else ())
    return policy == stage_policy and all(train[k] == stage_train[k] for k in fields)


def run_eval(run_dir: Path) -> dict[str, Any] | None:
    """The held-out figures in a finished run's summary.json (None when there are none)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("eval") or None
    except (OSError, ValueError, AttributeError):
        return None


class SFTStage(TrainingStage):
    name = "sft"
    summary = "The task's SFT policy (`init: sft`): the `sft` objective on its demonstrations, from scratch, with its sft_recipe()."
    paper = "Ouyang et al. 2022, arXiv:2203.02155"
    trains = "the SFT policy"

    def run_data(self, task) -> dict[str, Any]:
        return sft_run_data(task)

    def after_training(self, directory: Path, trainer, summary, log) -> None:
        """The policy's figures on 128 held-out prompts, beside its weights."""
        report = evaluate(trainer.policy, trainer.task, n_prompts=128, seed=0)
        (directory / self.output / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if log:
            log(f"[rlhfzoo] SFT policy for {trainer.task.name!r}: " + ", ".join(f"{k}={v:.3f}" for k, v in report.items()))

    def adopts(self, cfg, run_dir: Path) -> bool:
        return run_eval(run_dir) is not None and is_sft_stage(cfg)

    def adopt(self, cfg, run_dir: Path, directory: Path) -> None:
        """The run's policy, and its held-out figures as the report."""
        super().adopt(cfg, run_dir, directory)
        (directory / self.output / REPORT_FILE).write_text(json.dumps(run_eval(run_dir), indent=1))


@hookimpl
def register_objectives(register):
    register(SFT)


@hookimpl
def register_stages(register):
    register(SFTStage)
