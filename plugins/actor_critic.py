"""Experience for the actor-critic objectives (PPO, PPO-penalty, A2C): rollout + scores -> per-token
rewards, values, advantages and returns, and the minibatches the losses see.

    rollout (policy samples, their log-probs)  +  scores s (one per response, from the reward source)
      -> ref log-probs, values V_t (the policy's value head), per-token KL k_t = k(log pi_t, log pi_ref_t)
      -> rewards   r_t = -beta k_t  (+ s on the last response token)     KL in the reward (InstructGPT,
                                                                           arXiv:2203.02155 Eq. 2; Ziegler
                                                                           et al. 2019, arXiv:1909.08593)
               or  r_t = s on the last token only, beta KL in the loss    (GopherCite, arXiv:2203.11147)
      -> GAE advantages and returns (`rlhfzoo.ops.gae`), advantages whitened over the batch

Under several processes every statistic that steers training is taken over all of them, so that
they stay the same everywhere: the running reward statistics see every process's scores, the
advantages are whitened with the mean and variance of every process's tokens, and the experience
figures (the KL the adaptive controller and `max_kl` read, the sample counts) are averaged or summed.

Scores may first be penalised for responses cut at the length limit without EOS (counted),
normalised by a running mean/std and clipped. An optional pretraining mix (PPO-ptx, arXiv:2203.02155
Eq. 2) adds `ptx_coef` x the NLL of the task's demonstrations to the loss: `ptx_batch_size` of them
drawn for each optimizer step and shared out among its micro-batches, their NLL a token mean over
the step's demonstrations on every process (`begin_step`), like the other token-level terms.

`ActorCriticObjective` holds what the three objectives share: the config fields below, the KL
controller and running reward statistics (checkpointed), the KL guard `max_kl`, minibatching,
and the loss terms other than the policy-gradient one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
from pydantic import Field, model_validator

from rlhfzoo import kernels
from rlhfzoo.interfaces import Batch, Objective, PluginConfig, Policy, Rollout, SequenceBatch
from rlhfzoo.ops import (
    FixedKLController, RunningMoments, all_rows, all_sum, across_processes, apply_mask, gae, last_index, masked_mean,
    masked_whiten, response_nll, step_denominator, step_share,
)
from rlhfzoo.training_errors import TrainingError


class ExperienceConfig(PluginConfig):
    """Options shared by the actor-critic objectives: how experience is built from a rollout."""

    kl_coef: float = Field(0.1, ge=0, description="beta: weight of the KL penalty to the reference policy (the initial value when adapted).")
    kl_penalty: Literal["reward", "loss"] = Field(
        "reward",
        description="Where the KL penalty goes: `reward` (per token, r_t = -beta k_t, InstructGPT/Ziegler et al.) "
        "or `loss` (beta x mean token KL added to the loss, GopherCite).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1",
        description="Per-token KL estimator (rlhfzoo.kernels.token_kl): k1 = log pi/pi_ref, k2 = (log pi/pi_ref)^2/2, "
        "k3 = pi_ref/pi - 1 - log pi_ref/pi. In the loss use k2 or k3: k1's gradient vanishes in expectation.",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per token in GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (1: Monte-Carlo returns minus values, 0: one-step TD).")
    whiten_advantages: bool = Field(True, description="Normalise advantages to zero mean, unit variance over the batch's response tokens.")
    normalize_rewards: bool = Field(False, description="Normalise scores by a running mean and standard deviation over all iterations so far.")
    reward_clip: float | None = Field(None, gt=0, description="Clip (normalised) scores to [-reward_clip, reward_clip] (null: no clipping).")
    truncation_penalty: float | None = Field(
        None,
        description="Subtracted from the score of a response cut at the length limit without EOS (null: none); "
        "such responses are counted either way.",
    )
    max_kl: float | None = Field(
        None, gt=0,
        description="Stop the run (TrainingError naming the iteration) when the mean per-sequence KL to the reference "
        "exceeds this (null: never); the last checkpoint written is kept.",
    )
    vf_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus (subtracted from the loss).")
    ptx_coef: float = Field(0.0, ge=0, description="gamma of PPO-ptx: weight of the NLL of the task's demonstrations in the loss (0: off).")
    ptx_batch_size: int = Field(
        8, ge=1, description="Demonstrations per optimizer step (on each process) for the pretraining mix, shared out among its micro-batches."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Split each minibatch into micro-batches of this many sequences, accumulated into one step (null: no split)."
    )

    @model_validator(mode="after")
    def _check_kl(self):
        if self.kl_penalty == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            raise ValueError(
                "kl_estimator k1 in the loss has zero expected gradient (E_pi[grad log pi] = 0); use k2 or k3 with kl_penalty: loss"
            )
        return self


# ------------------------------------------------------------------------------ experience

# In `Batch.extra`, set by `ActorCriticObjective.begin_step`: what each micro-batch's pretraining NLL sum divides by.
PTX_TOKEN_SHARE = "ptx_tokens_share"


@dataclass
class Experience:
    """One iteration's rollout turned into training targets. Token tensors are [B, T-1], aligned
    with `Policy.logprobs` (entry t is about token t+1); `mask` is 1 on response tokens."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [B] the scores after penalty, normalisation and clipping
    metrics: dict[str, float] = field(default_factory=dict)
    ptx: Callable[[], SequenceBatch] | None = None

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def batch(self, rows: torch.Tensor) -> Batch:
        """The micro-batch of these rows (without pretraining demonstrations: see `ActorCriticObjective.groups`)."""
        rows = rows.to(self.sequences.device)
        extra: dict[str, Any] = {
            k: getattr(self, k)[rows]
            for k in ("mask", "old_logprobs", "ref_logprobs", "values", "advantages", "returns")
        }
        seq = SequenceBatch(self.sequences[rows], self.attention_mask[rows], self.response_mask[rows])
        return Batch(sequences=seq, index=rows.cpu(), extra=extra)


@torch.no_grad()
def build_experience(
    rollout: Rollout,
    scores: torch.Tensor,
    policy: Policy,
    reference: Policy | None,
    config: ExperienceConfig,
    kl_coef: float,
    reward_moments: RunningMoments | None = None,
) -> Experience:
    device = next(policy.module.parameters()).device
    ids, attn = rollout.sequences.to(device), rollout.attention_mask.to(device)
    mask = rollout.response_mask[:, 1:].to(device=device, dtype=torch.float32)
    B = ids.shape[0]

    out = policy.forward(ids, attn, return_values=True, return_entropy=True)
    old_logprobs = apply_mask(rollout.logprobs.to(device).float(), mask)  # the sampling distribution's log-probs
    values = apply_mask(out["values"][:, :-1].float(), mask)  # V(state before token t+1)
    ref_logprobs = apply_mask(reference.logprobs(ids, attn).float(), mask) if reference is not None else old_logprobs
    token_kl = apply_mask(kernels.token_kl(old_logprobs, ref_logprobs, config.kl_estimator), mask)

    # Sequence score: truncation penalty -> running normalisation -> clipping.
    raw = scores.to(device).float()
    truncated = ~rollout.finished.to(device).bool()
    score = raw.clone()
    if config.truncation_penalty is not None:
        score = score - config.truncation_penalty * truncated.float()
    if reward_moments is not None and config.normalize_rewards:
        reward_moments.update(all_rows(score))  # every process's scores, in rank order
        score = (score - reward_moments.mean) / max(reward_moments.std, 1e-8)
    if config.reward_clip is not None:
        score = score.clamp(-config.reward_clip, config.reward_clip)

    # Per-token rewards: the score on the last response token, the KL penalty on every token.
    last = last_index(mask)
    empty = last < 0  # no response token at all: nothing to credit
    rewards = -kl_coef * token_kl if config.kl_penalty == "reward" else torch.zeros_like(token_kl)
    rows = torch.arange(B, device=device)[~empty]
    rewards[rows, last[~empty]] += score[~empty]

    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages and all_sum(mask.sum()) > 1:
        advantages = masked_whiten(advantages, mask, across_processes=True)

    n_tokens = mask.sum(-1)
    seq_kl = (old_logprobs - ref_logprobs).sum(-1)  # k1 summed over the response: KL(pi || ref) per sequence
    metrics = {
        "score": raw.mean().item(),
        "score_processed": score.mean().item(),
        "kl": seq_kl.mean().item(),
        "kl_token_estimate": masked_mean(token_kl, mask).item(),
        "kl_coef": float(kl_coef),
        "entropy": masked_mean(out["entropy"].float(), mask).item(),
        "value_mean": masked_mean(values, mask).item(),
        "return_mean": masked_mean(returns, mask).item(),
        "response_tokens": n_tokens.mean().item(),
        "truncated": truncated.float().sum().item(),
        "empty_responses": empty.float().sum().item(),
        "samples": float(B),
    }
    metrics = across_processes(metrics, summed=("truncated", "empty_responses", "samples"), device=device)
    return Experience(
        ids, attn, rollout.response_mask.to(device), mask, old_logprobs, ref_logprobs, values, rewards,
        advantages, returns, score, metrics,
    )


# ------------------------------------------------------------------------------ shared objective


class ActorCriticObjective(Objective):
    """Base of the online actor-critic objectives: builds experience, holds the KL controller and
    the running reward statistics, minibatches, and the value / entropy / KL / ptx loss terms."""

    online: ClassVar[bool] = True
    data_kind: ClassVar[str] = "prompts"
    needs_reference: ClassVar[bool] = True
    needs_reward: ClassVar[bool] = True
    needs_value_head: ClassVar[bool] = True
    Config: ClassVar[type[PluginConfig]] = ExperienceConfig

    def __init__(self, config: PluginConfig | None = None):
        super().__init__(config)
        self.kl_ctl = self.make_kl_controller()
        self.reward_moments = RunningMoments()
        self.iteration = 0
        self.totals = {"truncated": 0.0, "empty_responses": 0.0, "samples": 0.0}
        self.last_metrics: dict[str, float] = {}
        self._collate = None
        self._task = None

    def make_kl_controller(self):
        return FixedKLController(self.config.kl_coef)

    def setup(self, policy, task) -> None:
        self._task = task  # the pretraining mix reads its demonstrations

    def prepare(self, data, collate, reference) -> None:
        self._collate = collate  # the pretraining mix collates the task's demonstrations with it

    # -------------------------------------------------------------------- experience
    def make_experience(self, rollout, rewards, policy, reference) -> Experience:
        self.iteration += 1
        exp = build_experience(rollout, rewards, policy, reference, self.config, self.kl_ctl.value, self.reward_moments)
        kl = exp.metrics["kl"]
        if self.config.max_kl is not None and not (kl <= self.config.max_kl):
            raise TrainingError(
                f"the KL to the reference is {kl:.4g} nats per sequence at iteration {self.iteration}, above "
                f"max_kl={self.config.max_kl}; stopped before updating on it. The last checkpoint written is kept: "
                "lower train.lr, raise kl_coef, or raise max_kl."
            )
        for key in self.totals:
            self.totals[key] += exp.metrics[key]
        if self.config.ptx_coef > 0:
            exp.ptx = self._ptx_sampler()
        self.last_metrics = dict(exp.metrics)
        return exp

    def _ptx_sampler(self) -> Callable[[], SequenceBatch]:
        task = self._task
        demos = task.examples("demonstrations", split="train") if task is not None else []
        if not demos or self._collate is None:
            raise TrainingError("ptx_coef > 0 needs the task's demonstrations (`setup(policy, task)` and `prepare` called)")
        size = self.config.ptx_batch_size

        def sample() -> SequenceBatch:
            rows = torch.randint(len(demos), (size,)).tolist()
            return self._collate([(i, demos[i]) for i in rows]).sequences

        return sample

    def after_iteration(self, metrics: dict[str, float]) -> dict[str, float]:
        """The experience's figures of this iteration, then the KL controller's update for the next."""
        out = {k: v for k, v in self.last_metrics.items() if k not in ("truncated", "empty_responses", "samples")}
        out["truncated_rate"] = self.last_metrics.get("truncated", 0.0) / max(self.last_metrics.get("samples", 1.0), 1.0)
        out["truncated_total"] = self.totals["truncated"]
        out["empty_total"] = self.totals["empty_responses"]
        if self.last_metrics:  # out["kl_coef"] stays the coefficient this iteration used
            self.kl_ctl.update(self.last_metrics["kl"], int(self.last_metrics["samples"]))
        return out

    # -------------------------------------------------------------------- minibatches
    def groups(self, experience: Experience, rows: torch.Tensor) -> list[Batch]:
        """One optimizer step's micro-batches for these rows; with the pretraining mix, the step's
        `ptx_batch_size` demonstrations (one draw) shared out among them in `extra["ptx"]`."""
        m = self.config.micro_batch_size or len(rows)
        batches = [experience.batch(rows[k : k + m]) for k in range(0, len(rows), m)]
        if experience.ptx is not None:
            demos = experience.ptx()
            for b, part in zip(batches, torch.arange(len(demos)).tensor_split(len(batches))):
                if len(part):
                    b.extra["ptx"] = SequenceBatch(*(t[part] for t in (demos.input_ids, demos.attention_mask, demos.response_mask)))
        return batches

    def shuffled_minibatches(self, experience: Experience, epochs: int, minibatch_size: int) -> Iterator[list[Batch]]:
        B = len(experience)
        for _ in range(epochs):
            order = torch.randperm(B)
            for start in range(0, B, minibatch_size):
                yield self.groups(experience, order[start : start + minibatch_size])

    # -------------------------------------------------------------------- loss terms
    def forward(self, batch: Batch, policy: Policy, entropy: bool = True) -> dict[str, torch.Tensor]:
        seq = batch.sequences
        out = policy.forward(seq.input_ids, seq.attention_mask, return_values=True, return_entropy=entropy)
        out["values"] = out["values"][:, :-1]
        return out

    def begin_step(self, batches: list[Batch], policy: Policy, reference: Policy | None) -> None:
        """With the pretraining mix: the response tokens of the step's demonstrations, every
        micro-batch and process, that their NLL is a token mean over (`ops.step_share`)."""
        if self.config.ptx_coef <= 0 or not batches:
            return
        local = sum(float(b.extra["ptx"].response_mask[:, 1:].sum()) for b in batches if "ptx" in b.extra)
        share = step_share(batches, local, batches[0].sequences.input_ids.device)
        for b in batches:
            b.extra[PTX_TOKEN_SHARE] = share

    @staticmethod
    def tokens(batch: Batch) -> torch.Tensor | float:
        """What the token means of `batch`'s loss divide by: the token mean of the whole optimizer
        step, all its micro-batches and processes (`rlhfzoo.ops.step_denominator`)."""
        return step_denominator(batch, batch.extra["mask"].sum())

    def value_loss(self, values: torch.Tensor, batch: Batch, clip: float | None) -> tuple[torch.Tensor, dict[str, float]]:
        """0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)] (the clipped value loss of PPO2)."""
        mask, old, returns = batch.extra["mask"], batch.extra["values"], batch.extra["returns"]
        n = self.tokens(batch)
        losses = (values - returns) ** 2
        if clip is not None:
            clipped = old + (values - old).clamp(-clip, clip)
            losses = torch.maximum(losses, (clipped - returns) ** 2)
            vclipfrac = masked_mean(((values - old).abs() > clip).float(), mask, count=n).item()
        else:
            vclipfrac = 0.0
        vf = 0.5 * masked_mean(losses, mask, count=n)
        return vf, {"value_loss": vf.item(), "value_clipfrac": vclipfrac}

    def extra_terms(self, batch: Batch, logprobs: torch.Tensor, entropy: torch.Tensor | None, policy: Policy):
        """Entropy bonus, KL-in-the-loss and pretraining NLL: (sum to add to the loss, metrics). The
        first two are token means over the optimizer step, the NLL a mean over its own demonstrations."""
        cfg, mask, n = self.config, batch.extra["mask"], self.tokens(batch)
        total = torch.zeros((), device=logprobs.device)
        metrics: dict[str, float] = {}
        if entropy is not None:
            ent = masked_mean(entropy, mask, count=n)
            total = total - cfg.ent_coef * ent
            metrics["policy_entropy"] = ent.item()
        if cfg.kl_penalty == "loss" and cfg.kl_coef > 0:
            kl = masked_mean(kernels.token_kl(logprobs, batch.extra["ref_logprobs"], cfg.kl_estimator), mask, count=n)
            total = total + self.kl_ctl.value * kl
            metrics["kl_loss"] = kl.item()
        if cfg.ptx_coef > 0 and "ptx" in batch.extra:
            ptx = batch.extra["ptx"]
            logprobs_ptx = policy.logprobs(ptx.input_ids, ptx.attention_mask)
            share = batch.extra.get(PTX_TOKEN_SHARE)  # the step's (`begin_step`); else these demonstrations' own count
            count = None if share is None else torch.tensor(max(share, 1e-12), dtype=logprobs_ptx.dtype, device=logprobs_ptx.device)
            nll = response_nll(logprobs_ptx, ptx.response_mask, count=count)
            total = total + cfg.ptx_coef * nll
            metrics["ptx_nll"] = nll.item()
        elif cfg.ptx_coef > 0 and PTX_TOKEN_SHARE in batch.extra:  # this micro-batch got none of the step's demonstrations
            metrics["ptx_nll"] = 0.0
        return total, metrics

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "iteration": self.iteration,
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        self.iteration = int(state["iteration"])
        self.totals = {k: float(v) for k, v in state["totals"].items()}
