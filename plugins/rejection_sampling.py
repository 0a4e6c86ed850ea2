"""Rejection-sampling fine-tuning (Llama 2, Touvron et al. 2023, arXiv:2307.09288, Sec. 3.2.3).

Each iteration: sample N responses per prompt from the current policy, score them with the reward
source, keep each prompt's best (optionally only when it clears a percentile of this iteration's
scores, or an absolute `min_score`), and fine-tune on the kept responses with the SFT loss
(`rlhfzoo.ops.response_nll`)

    L = -(1 / |y*|) sum_t log pi(y*_t | x, y*_<t),     y* = argmax_{y_1..y_N ~ pi(.|x)} r(x, y_i)

then iterate with the improved policy. The trainer draws the N samples (it repeats every prompt
`samples_per_prompt()` = N times; the rollout holds each prompt's samples consecutively), so every
sample is scored once by the reward source; the objective counts them (`reward_calls`).
Responses cut at the length limit without EOS can be penalised before choosing (`truncation_penalty`).

Under several processes the percentile is that of every process's scores, and every process takes
as many optimizer steps as the one that kept the most responses (one that has run out joins the
step with a response of weight 0): the steps' collectives then meet, and each step's loss is the
token mean over the responses all processes put in it.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import BenchProtocol, Batch, LossOutput, Objective, PluginConfig, SequenceBatch
from rlhfzoo.ops import all_rows, response_nll, step_denominator


class RejectionSamplingConfig(PluginConfig):
    n_samples: int = Field(8, ge=1, description="N: responses sampled per prompt, of which the best is kept.")
    keep_percentile: float | None = Field(
        None, ge=0, le=100,
        description="Keep a prompt's best response only if its score is at least this percentile of all scores of the iteration (null: always keep).",
    )
    min_score: float | None = Field(None, description="Keep a prompt's best response only if its score is at least this (null: no bound).")
    truncation_penalty: float | None = Field(
        None, description="Subtracted from the score of a response cut at the length limit without EOS before choosing (null: none); counted either way."
    )
    epochs: int = Field(1, ge=1, description="Passes over each iteration's kept responses.")
    minibatch_size: int = Field(16, ge=1, description="Kept responses per optimizer step.")


class RejectionSampling(Objective):
    name = "rejection-sampling"
    aliases = ("rs",)
    summary = "Llama 2 rejection-sampling fine-tuning: sample N per prompt, keep the highest-scoring, SFT on it, iterate."
    paper = "Touvron et al. 2023, arXiv:2307.09288"
    online = True
    data_kind = "prompts"
    needs_reward = True
    Config = RejectionSamplingConfig
    bench = BenchProtocol(train={"steps": 10, "batch_size": 32, "lr": 1e-3}, kl_knob="n_samples", kl_sweep=(2, 8, 32))  # 8 x 32 prompts per iteration

    def __init__(self, config=None):
        super().__init__(config)
        self.reward_calls = 0
        self.kept_total = 0
        self.last_metrics: dict[str, float] = {}
        self.idle: Batch | None = None  # a response of weight 0, for the steps this process has no kept response for

    def samples_per_prompt(self) -> int:
        return self.config.n_samples

    def make_experience(self, rollout, rewards, policy, reference=None) -> SequenceBatch:
        c, n = self.config, self.config.n_samples
        B = len(rollout.prompts)
        if B % n or any(rollout.prompts[i] != rollout.prompts[i - i % n] for i in range(B)):
            raise ValueError(
                f"rejection-sampling expects {n} consecutive samples per prompt in the rollout; got {B} responses. "
                "The trainer repeats prompts by `samples_per_prompt`; a custom loop must do the same."
            )
        truncated = ~rollout.finished.bool().cpu()
        scores = rewards.float().cpu()
        if c.truncation_penalty is not None:
            scores = scores - c.truncation_penalty * truncated.float()
        grouped = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -math.inf)).view(-1, n)
        best, arg = grouped.max(-1)
        rows = torch.arange(0, B, n) + arg
        keep = torch.isfinite(best)
        if c.keep_percentile is not None:
            device = next(policy.module.parameters()).device
            everyone = all_rows(scores.to(device)).cpu()  # the percentile of every process's scores
            keep &= best >= torch.quantile(everyone[torch.isfinite(everyone)], c.keep_percentile / 100.0)
        if c.min_score is not None:
            keep &= best >= c.min_score
        kept = rows[keep]
        self.reward_calls += B
        self.kept_total += len(kept)
        finite = scores[torch.isfinite(scores)]
        self.last_metrics = {
            "best_score": best[torch.isfinite(best)].mean().item() if torch.isfinite(best).any() else float("nan"),
            "mean_score": finite.mean().item() if len(finite) else float("nan"),
            "kept": float(len(kept)),
            "kept_fraction": len(kept) / max(1, B // n),
            "truncated_rate": truncated.float().mean().item(),
            "kept_truncated": truncated[kept].float().sum().item(),
        }
        first = slice(0, 1)
        idle = SequenceBatch(rollout.sequences[first], rollout.attention_mask[first], torch.zeros_like(rollout.response_mask[first]))
        self.idle = Batch(sequences=idle, index=torch.zeros(1, dtype=torch.long))
        return SequenceBatch(rollout.sequences[kept], rollout.attention_mask[kept], rollout.response_mask[kept])

    def minibatches(self, kept: SequenceBatch, policy):
        c = self.config
        device = next(policy.module.parameters()).device
        most = int(all_rows(torch.tensor([len(kept)], device=device)).max())  # kept by the process that kept the most
        for _ in range(c.epochs):
            order = torch.randperm(len(kept))
            for start in range(0, most, c.minibatch_size):
                rows = order[start : start + c.minibatch_size]
                if len(rows) == 0:  # this process has run out: it joins the step without weight
                    yield self.idle
                    continue
                seq = SequenceBatch(kept.input_ids[rows], kept.attention_mask[rows], kept.response_mask[rows])
                yield Batch(sequences=seq, index=rows)

    def loss(self, batch, policy, reference=None) -> LossOutput:
        seq = batch.sequences
        n_tokens = seq.response_mask[:, 1:].sum()
        count = step_denominator(batch, n_tokens)  # the token mean of the whole optimizer step
        nll = response_nll(policy.logprobs(seq.input_ids, seq.attention_mask), seq.response_mask, count)  # SFT on the kept responses
        return LossOutput(nll, {"nll": nll.item(), "response_tokens": n_tokens.item() / len(seq)})

    def after_iteration(self, metrics):
        """This iteration's selection figures (kept, scores) and the run's totals."""
        return {**self.last_metrics, "reward_calls": float(self.reward_calls), "kept_total": float(self.kept_total)}

    def state_dict(self):
        return {"reward_calls": self.reward_calls, "kept_total": self.kept_total}

    def load_state_dict(self, state):
        if state:
            self.reward_calls, self.kept_total = int(state["reward_calls"]), int(state["kept_total"])


@hookimpl
def register_objectives(register):
    register(RejectionSampling)
