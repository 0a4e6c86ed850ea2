"""Reward models: training them (`bradley-terry`, `reward-regression`), scoring with them
(`reward-model` reward source), and the task's default one (`reward-model` stage).

Pairwise classifier (InstructGPT, arXiv:2203.02155, Eq. 1), a scalar head r(x, y) on a causal LM:

    L = - E_(x, y_w, y_l) [ log sigma(r(x, y_w) - r(x, y_l)) ]

* Margin (Llama 2, arXiv:2307.09288, Eq. 2): L = -log sigma(r_w - r_l - m(label)), with
  m = margin_scale * PreferencePair.margin (the task's "significantly / slightly / negligibly
  better" label as a number): clearly separated pairs must be separated by more.
* K-wise rankings (InstructGPT Sec. 3.5): a ranking of K responses is expanded to its C(K, 2)
  pairs (task kind `rankings`, pairs share `group`); each pair is weighted 1/C(K, 2) so that
  every prompt counts once, whatever its K (the loss is the weighted mean over the optimizer step,
  all its micro-batches and processes: `begin_step` sums the weights, so `train.grad_accum` and the
  number of processes do not change the update).
* Prompt-aware utilities (Song et al. 2023, "Reward collapse in aligning large language
  models", arXiv:2305.17608): with rewards squashed to [0, 1], R = sigmoid(r), maximise
  U(R_w - R_l) for a concave increasing utility U,

      log-sigmoid: U(x) = log sigmoid(x / sigma)
      power:       U(x) = x^gamma,       0 < gamma <= 1
      neg-power:   U(x) = -x^(-gamma),   gamma > 0

  With one U for all prompts the optimum gives every prompt the same reward distribution
  (reward collapse); its shape depends on U and gamma/sigma, so choosing the utility for the
  kind of prompt (e.g. one run per prompt type) counters the collapse; `within_prompt_std` in
  the evaluation shows the spread. (Choosing U per pair needs a per-prompt label that the
  built-in tasks do not provide.) The power utilities are defined for x > 0 only; below
  `utility_eps` they are continued by their tangent line at eps, which keeps U concave and
  increasing and gives a misordered pair (x <= 0) a finite gradient.

Regression value network (`reward-regression`): the same architecture trained on scalar
ratings (task kind `rewarded`) with L = E (r(x, y) - rating)^2.

The head has no bias (held at zero: `reward_heads.setup_reward_head`), as transformers'
sequence-classification `score` layer has none: a constant offset does not change Bradley-Terry
preferences (r_w - r_l), and a regression model fits the ratings' mean through its last hidden
state. Both write the policy directory as transformers' `AutoModelForSequenceClassification`
(`num_labels=1`: the trunk and its `score` head, with the tokenizer), which scores exactly as
training did; the `reward-model` source reads it, and any other such model (TRL, OpenRLHF with a
`score` head, downloaded). The `reward-model` stage is the task's
default reward model, trained once per cache from its SFT policy; the source reads it with
`path: auto`. Evaluation (in the run's summary.json, see `reward_eval`): held-out pairwise
accuracy, BT log-loss, calibration (ECE of sigma(r_w - r_l)), mean within-prompt reward std.

Architecture choice: an RM objective sets `needs_value_head`, so with the plain `hf` policy the
trainer adds the scalar head (read through the policy's possibly DDP-wrapped model); no separate
reward-model policy class is needed. Its `setup` attaches the exporter whose `save` rewrites the
final policy directory in the Hugging Face format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from rlhfzoo import hookimpl, stages
from rlhfzoo.interfaces import BenchProtocol, LossOutput, Objective, PluginConfig, RewardSource
from rlhfzoo.ops import RunningMoments, step_share
from rlhfzoo.plugins._preference import concat, identical
from rlhfzoo.plugins.reward_eval import evaluate_reward_model
from rlhfzoo.plugins.reward_heads import RewardModel, reward_model_problem, sequence_rewards, setup_reward_head
from rlhfzoo.stages import TrainingStage

Utility = Literal["none", "log-sigmoid", "power", "neg-power"]
# In `Batch.extra`, set by `BradleyTerry.begin_step`: what each micro-batch's weighted loss sum divides by.
PAIR_WEIGHT_SHARE = "pair_weight_share"

# ------------------------------------------------------------------------------ pure losses


def utility(x: torch.Tensor, kind: Utility, sigma: float = 0.1, gamma: float = 0.5, eps: float = 0.01) -> torch.Tensor:
    """Song et al. (arXiv:2305.17608) utility U(x) of a difference x of rewards in [0, 1].

    The power utilities are continued below `eps` by their tangent at eps:
    U(x) = U(eps) + U'(eps) (x - eps) for x < eps.
    """
    if kind == "log-sigmoid":
        return F.logsigmoid(x / sigma)
    if kind == "power":
        u, du = (lambda z: z**gamma), (lambda z: gamma * z ** (gamma - 1))
    elif kind == "neg-power":
        u, du = (lambda z: -(z ** (-gamma))), (lambda z: gamma * z ** (-gamma - 1))
    else:
        raise ValueError(f"unknown utility {kind!r}; choose log-sigmoid, power or neg-power")
    e = x.new_tensor(eps)
    return torch.where(x >= eps, u(x.clamp(min=eps)), u(e) + du(e) * (x - eps))


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    utility_fn: Utility = "none",
    sigma: float = 0.1,
    gamma: float = 0.5,
    eps: float = 0.01,
) -> torch.Tensor:
    """Per-pair reward-model loss [B] from the rewards r(x, y_w), r(x, y_l) of each pair.

    none:   -log sigma(r_w - r_l - m)                        InstructGPT Eq. 1, Llama 2 Eq. 2
    else:   -U(sigmoid(r_w) - sigmoid(r_l) - m)              Song et al. 2023 (m in [0, 1] units)
    """
    if utility_fn == "none":
        d = chosen - rejected
        return -F.logsigmoid(d - margin if margin is not None else d)
    d = torch.sigmoid(chosen) - torch.sigmoid(rejected)
    return -utility(d - margin if margin is not None else d, utility_fn, sigma, gamma, eps)


def ranking_weights(groups: list[int | None]) -> torch.Tensor:
    """Weight of each pair: 1/C(K, 2) = 1 / (pairs sharing its ranking `group`); 1 for a lone pair."""
    sizes: dict[int, int] = {}
    for g in groups:
        if g is not None:
            sizes[g] = sizes.get(g, 0) + 1
    return torch.tensor([1.0 / sizes[g] if g is not None else 1.0 for g in groups], dtype=torch.float32)


# ------------------------------------------------------------------------------ objectives


class BradleyTerryConfig(PluginConfig):
    examples: Literal["pairs", "rankings"] = Field(
        "pairs", description="Train on the task's `pairs`, or on K-wise `rankings` expanded to K-choose-2 pairs."
    )
    margin: bool = Field(
        False, description="Llama-2 margin loss -log sigma(r_w - r_l - m): m = margin_scale * the pair's margin label."
    )
    margin_scale: float = Field(1.0, ge=0, description="m(label) = margin_scale * PreferencePair.margin.")
    ranking_weight: bool = Field(
        True, description="Weight each pair of a K-wise ranking by 1/C(K,2), so every ranked prompt counts once (InstructGPT)."
    )
    utility: Utility = Field(
        "none",
        description="`none`: -log sigma(r_w - r_l) on raw rewards. Song et al. 2023 prompt-aware utilities on rewards "
        "squashed by a sigmoid: `log-sigmoid` U(x)=log sigmoid(x/sigma), `power` U(x)=x^gamma, `neg-power` U(x)=-x^(-gamma).",
    )
    sigma: float = Field(0.1, gt=0, description="Temperature of the `log-sigmoid` utility.")
    gamma: float = Field(0.5, gt=0, description="Exponent of the `power` (0 < gamma <= 1) and `neg-power` utilities.")
    utility_eps: float = Field(
        0.01, gt=0, lt=1, description="Below this difference the power utilities continue linearly (tangent at eps)."
    )
    eval_examples: int = Field(2000, ge=1, description="Held-out pairs scored at the end of the run.")

    @model_validator(mode="after")
    def _check(self):
        if self.utility == "power" and self.gamma > 1:
            raise ValueError(f"utility `power` needs 0 < gamma <= 1 (a concave x^gamma), got gamma={self.gamma}")
        return self


class BradleyTerry(Objective):
    name = "bradley-terry"
    aliases = ("rm", "reward-model-training")
    summary = "Reward-model training: -log sigma(r_w - r_l [- margin]) on a scalar head; K-wise rankings; Song et al. utilities."
    paper = "Ouyang et al. 2022, arXiv:2203.02155 Eq. 1; Touvron et al. 2023, arXiv:2307.09288 Eq. 2; Song et al. 2023, arXiv:2305.17608"
    data_kind = "pairs"
    needs_value_head = True
    # The train recipe of the task's cached reward model (the `reward-model` stage) and configs/reward_model.yaml
    # (which, like the cached stage, also trains on K-wise rankings; the bench row uses pairs, which every task has).
    bench = BenchProtocol(
        evaluation="scorer", pair_accuracy=("accuracy", "n_pairs"),
        train={"steps": 300, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "lr_schedule": "cosine"},
    )
    Config = BradleyTerryConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.row_weight: torch.Tensor | None = None

    def example_kind(self) -> str:
        return self.config.examples

    def setup(self, policy, task) -> None:
        setup_reward_head(policy)  # a bias-free head; the policy directory saved as a sequence classifier

    def prepare(self, data, collate, reference) -> None:
        if self.config.ranking_weight:
            self.row_weight = ranking_weights([getattr(e, "group", None) for e in data])

    def pair_weights(self, batch) -> torch.Tensor:
        """Weight of each pair of `batch` [B] (float32, on its device): 1/C(K, 2) with `ranking_weight`
        (else 1), and 0 where the chosen and rejected responses are the same (no preference)."""
        device = batch.sequences.input_ids.device
        w = torch.ones(len(batch), device=device)
        if self.row_weight is not None:
            w = self.row_weight[batch.index.cpu()].to(device, torch.float32)
        return w * (~identical(batch.sequences, batch.rejected)).to(w.dtype)

    def begin_step(self, batches, policy, reference) -> None:
        """The pairs' total weight over the whole optimizer step (every micro-batch and process), that
        `loss` divides by: the update is the weighted mean over the step's pairs however it is split."""
        local = sum(float(self.pair_weights(b).sum()) for b in batches)
        share = step_share(batches, local, batches[0].sequences.input_ids.device if batches else None)
        for b in batches:
            b.extra[PAIR_WEIGHT_SHARE] = share

    def loss(self, batch, policy, reference=None) -> LossOutput:
        c, n = self.config, len(batch)
        both = concat(batch.sequences, batch.rejected)
        r = sequence_rewards(policy, both.input_ids, both.attention_mask)
        r_w, r_l = r[:n], r[n:]
        margin = c.margin_scale * batch.margin.to(r.dtype) if c.margin and batch.margin is not None else None
        losses = pairwise_loss(r_w, r_l, margin, c.utility, c.sigma, c.gamma, c.utility_eps)
        w = self.pair_weights(batch).to(losses.device, losses.dtype)
        share = batch.extra.get(PAIR_WEIGHT_SHARE)  # the step's (`begin_step`); else this batch's own total
        total = w.sum() if share is None else torch.tensor(share, dtype=w.dtype, device=w.device)
        loss = (losses * w).sum() / total.clamp(min=1e-12)
        d = (r_w - r_l).detach()
        return LossOutput(loss, {
            "accuracy": ((d > 0).float() * w).sum().item() / max(w.sum().item(), 1e-12),
            "reward_chosen": r_w.detach().mean().item(),
            "reward_rejected": r_l.detach().mean().item(),
            "reward_margin": d.mean().item(),
            "reward_std": r.detach().std().item() if len(r) > 1 else 0.0,
            "skipped_pairs": float((w == 0).sum().item()),
        })

    def evaluate(self, policy, task, **context):
        scorer = RewardModel.from_policy(policy)
        return evaluate_reward_model(scorer.score, task, ("pairs", "rankings"), self.config.eval_examples)


class RewardRegression(Objective):
    name = "reward-regression"
    aliases = ("value-network",)
    summary = "Regression reward model ('value network'): MSE of a scalar head against scalar ratings (task kind `rewarded`)."
    paper = "Ouyang et al. 2022, arXiv:2203.02155 (reward model); regression on ratings"
    data_kind = "rewarded"
    needs_value_head = True
    bench = BenchProtocol(
        evaluation="scorer", pair_accuracy=("accuracy", "n_pairs"),
        train={"steps": 200, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "lr_schedule": "cosine"},  # as configs/
    )

    class Config(PluginConfig):
        eval_examples: int = Field(2000, ge=1, description="Held-out rated examples (and pairs, where the task has them) scored at the end.")

    def setup(self, policy, task) -> None:
        setup_reward_head(policy)  # a bias-free head; the policy directory saved as a sequence classifier

    def loss(self, batch, policy, reference=None) -> LossOutput:
        seq = batch.sequences
        r = sequence_rewards(policy, seq.input_ids, seq.attention_mask)
        target = batch.rewards.to(r.dtype)
        mse = ((r - target) ** 2).mean()
        return LossOutput(mse, {
            "mse": mse.item(),
            "prediction_mean": r.detach().mean().item(),
            "target_mean": target.mean().item(),
        })

    def evaluate(self, policy, task, **context):
        scorer = RewardModel.from_policy(policy)
        return evaluate_reward_model(scorer.score, task, ("rewarded", "pairs"), self.config.eval_examples)


# ------------------------------------------------------------------------------ reward source


class RewardModelSourceConfig(PluginConfig):
    path: str = Field(
        "auto",
        description="A directory that transformers' AutoModelForSequenceClassification loads with num_labels=1 (a "
        "run of bradley-terry or reward-regression writes its `policy/` so; a TRL RewardTrainer output; a downloaded "
        "reward model), scored with its own tokenizer and chat template; or `auto`: the task's "
        "`reward-model` stage (`rlhfzoo stage reward-model` builds it, and so do `rlhfzoo train` and `rlhfzoo bench` "
        "before they start).",
    )
    batch_size: int = Field(64, ge=1, description="Sequences per forward pass.")
    max_length: int | None = Field(
        None, ge=4, description="Longest prompt + response in the RM's tokens; longer ones are truncated and counted (null: as trained, else the "
        "model's context); never past the model's context."
    )
    normalize: Literal["none", "running", "fixed"] = Field(
        "none",
        description="`running`: (r - mean) / std over every reward scored so far (this batch included); "
        "`fixed`: (r - mean) / std with the `mean` and `std` below; `none`: raw rewards.",
    )
    mean: float = Field(0.0, description="Mean subtracted with `normalize: fixed`.")
    std: float = Field(1.0, gt=0, description="Scale divided by with `normalize: fixed`.")
    clip: float | None = Field(None, gt=0, description="Clip the (normalised) reward to [-clip, clip] (null: off); clipped rewards are counted.")
    device: str = Field("auto", description="Device of the reward model: `auto` (CUDA when available), `cpu`, `cuda:0`, ...")

    @field_validator("path")
    @classmethod
    def _is_a_reward_model(cls, value: str) -> str:
        problem = None if value == "auto" else reward_model_problem(Path(value).expanduser())
        if problem:
            raise ValueError(problem)
        return value


class RewardModelSource(RewardSource):
    name = "reward-model"
    summary = "A reward model in the Hugging Face format (AutoModelForSequenceClassification, one label) with its own tokenizer and chat template; optional normalisation and clipping."
    paper = "Ouyang et al. 2022, arXiv:2203.02155"
    Config = RewardModelSourceConfig

    @classmethod
    def required_stages(cls, config: RewardModelSourceConfig) -> list[str]:
        """`path: auto` reads the task's reward-model stage."""
        return ["reward-model"] if config.path == "auto" else []

    def __init__(self, config=None, task=None):
        super().__init__(config, task)
        c = self.config
        if c.path == "auto":
            if task is None:
                raise ValueError("reward source 'reward-model' with `path: auto` needs a task (its cached reward model)")
            path = stages.path("reward-model", task)
        else:
            path = Path(c.path).expanduser()
        self.path = Path(path)
        self.model = RewardModel.load(self.path, device=c.device, batch_size=c.batch_size, max_length=c.max_length)
        self.moments = RunningMoments(unbiased=False)  # the population std: (r - mean) / std over all rewards so far
        self.calls = self.clipped = 0

    def score(self, prompts, responses) -> torch.Tensor:
        c = self.config
        r = self.model.score(prompts, responses).double()
        self.calls += len(r)
        if c.normalize == "running":
            self.moments.update(r)
            r = (r - self.moments.mean) / max(self.moments.std, 1e-8)
        elif c.normalize == "fixed":
            r = (r - c.mean) / c.std
        if c.clip is not None:
            self.clipped += int((r.abs() > c.clip).sum().item())
            r = r.clamp(-c.clip, c.clip)
        return r.float()

    def metrics(self) -> dict[str, float]:
        stats = self.model.stats
        out = {
            "rm_calls": float(self.calls),
            "rm_truncated": float(stats.truncated),
            "rm_truncated_rate": stats.truncated / max(1, stats.sequences),
            "rm_unknown_token_responses": float(self.model.unknown_token_responses),
            "rm_clipped": float(self.clipped),
        }
        if self.config.normalize == "running":
            out.update(rm_running_mean=self.moments.mean, rm_running_std=self.moments.std)
        return out


# ------------------------------------------------------------------------------ the cached stage

REPORT_FILE = "reward_model_report.json"  # the stage's held-out figures, beside its weights

# Train settings of the default reward model (a task may override them with a
# `reward_model_recipe()` returning {"algorithm": {...}, "train": {...}}): 300 steps of 32 pairs,
# about 40 s on two free CPU cores for sentiment's small model.
DEFAULT_TRAIN: dict[str, Any] = {"steps": 300, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "lr_schedule": "cosine"}


def default_algorithm(task: Any) -> dict[str, Any]:
    """K-wise rankings where the task has them, else pairs.

    Rankings carry more comparisons per prompt than disjoint pairs of the same samples. On
    sentiment (label noise 0.5, 300 steps, an earlier, less grammatical SFT policy) held-out agreement with the noisy labels was 0.64
    from pairs, 0.65 from rankings with InstructGPT's 1/C(K,2) weights and 0.68 from rankings
    unweighted: with pairs shuffled across batches (not a prompt's C(K,2) pairs in one batch, as
    InstructGPT does) and about one epoch, the weights mainly shrink the effective data.
    With the current SFT policy (more grammatical samples, so smaller gold gaps) label noise 0.5
    gave 0.61-0.65 for 300-1000 steps against a ceiling of 0.73 (the labels' own agreement with
    the gold ordering); the task's default is now 0.4, and at 0.35 300 steps gave 0.685.
    """
    if not task.provides("rankings"):
        return {"name": "bradley-terry", "examples": "pairs"}
    return {"name": "bradley-terry", "examples": "rankings", "ranking_weight": False}


def reward_model_run_data(task: Any) -> dict[str, Any]:
    """The run config (as a mapping) of the task's reward-model stage. Its key also holds the SFT
    stage's, which it starts from; every task option is in it (labels change the RM)."""
    recipe = getattr(task, "reward_model_recipe", None)
    recipe = recipe() if callable(recipe) else {}
    return {
        "task": {"name": task.name, **task.config.model_dump(mode="json")},
        "policy": {"name": "hf", "init": "sft"},
        "algorithm": recipe.get("algorithm") or default_algorithm(task),
        "train": {**DEFAULT_TRAIN, **recipe.get("train", {}), "progress": False},  # eval_prompts > 0: evaluate() runs
    }


class RewardModelStage(TrainingStage):
    name = "reward-model"
    summary = "The task's default reward model (`reward-model` with `path: auto`): bradley-terry from its SFT policy."
    paper = "Ouyang et al. 2022, arXiv:2203.02155"
    requires = ("sft",)
    trains = "the reward model"

    def run_data(self, task) -> dict[str, Any]:
        return reward_model_run_data(task)

    def after_training(self, directory: Path, trainer, summary, log) -> None:
        """The run's held-out figures and training time, beside the weights."""
        report = {"eval": summary.get("eval", {}), "train_seconds": summary.get("train_seconds")}
        (directory / self.output / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if log:
            figures = ", ".join(f"{k}={v:.3f}" for k, v in report["eval"].items() if isinstance(v, float) and math.isfinite(v))
            log(f"[rlhfzoo] reward model for {trainer.task.name!r}: {figures}")


@hookimpl
def register_objectives(register):
    register(BradleyTerry)
    register(RewardRegression)


@hookimpl
def register_reward_sources(register):
    register(RewardModelSource)


@hookimpl
def register_stages(register):
    register(RewardModelStage)
