"""Experience for group-sampled online objectives (GRPO, RLOO): no critic, the baseline of a sample
is the other samples of its prompt.

    rollout: G consecutive samples o_1..o_G of every prompt q (the trainer repeats each prompt
             `samples_per_prompt()` = G times), their log-probs under the sampling policy
    scores:  r_1..r_G from the reward source (a verifier, a reward model, the task's gold)
      -> old log-probs (the rollout's), reference log-probs where the objective needs them
      -> one advantage per sample, from its group only (`GroupObjective.advantages`)
      -> optionally drop the groups whose scores are all equal (DAPO's dynamic sampling, Yu et al.
         2025, arXiv:2503.14476, Sec. 3.2: their advantages are 0, they only dilute the batch),
         and give no loss to responses cut at the length limit without EOS (DAPO's overlong
         filtering, Sec. 3.4)

Every group lies on one process (the trainer cuts the prompts per process before repeating them),
so the advantages are local; what is not -- the number of optimizer steps, the denominators of a
step's loss, the logged figures -- is taken over all processes:

- every process takes as many optimizer steps as the one that kept the most samples; one that has
  run out joins a step with an idle batch (one sample of weight 0), so the collectives meet;
- `minibatches` writes the step's totals (sequences, loss tokens, over every micro-batch and
  process) into each micro-batch, and the losses divide by them (`step_counts`): the gradient of
  a step does not depend on how it is split into micro-batches and processes;
- the experience's figures (reward mean/std, zero-std groups, KL, lengths, truncation) are over
  every process's samples (`across_processes`, `all_rows`).

If dynamic sampling drops every group of an iteration (all processes), the iteration takes no
optimizer step and logs `skipped_update` 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from pydantic import Field

from rlhfzoo.interfaces import Batch, Objective, PluginConfig, Policy, Rollout, SequenceBatch
from rlhfzoo.ops import LOSSES_IN_STEP, all_rows, all_sum, across_processes, apply_mask


class GroupConfig(PluginConfig):
    """Options shared by the group-sampled objectives."""

    group_size: int = Field(8, ge=2, description="G: responses sampled per prompt; each is compared with the others of its group.")
    dynamic_sampling: bool = Field(
        False,
        description="Drop the groups whose rewards are all equal before the update (DAPO, arXiv:2503.14476 Sec. 3.2; "
        "without refilling the batch): they have no advantage. Counted (`dropped_groups`).",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="Give no loss to responses cut at the length limit without EOS (DAPO's overlong filtering, "
        "arXiv:2503.14476 Sec. 3.4); they still count in the group statistics.",
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Split each optimizer step into micro-batches of this many sequences, accumulated exactly (null: no split)."
    )


@dataclass
class GroupExperience:
    """One iteration's samples (those kept) as training targets. Token tensors are [B, T-1],
    aligned with `Policy.logprobs`; `mask` is 1 on the response tokens that get a loss."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor | None  # None: one update per iteration, the loss's own log-probs detached are the same
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor  # [B], one per sequence
    max_len: int  # the constant length budget of a response (dr-grpo's normaliser)
    idle: Batch  # a sample of weight 0, for the steps this process has nothing left for
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def batch(self, rows: torch.Tensor) -> Batch:
        rows = rows.to(self.sequences.device)
        extra: dict[str, Any] = {
            "mask": self.mask[rows], "advantages": self.advantages[rows], "max_len": self.max_len,
        }
        if self.old_logprobs is not None:
            extra["old_logprobs"] = self.old_logprobs[rows]
        if self.ref_logprobs is not None:
            extra["ref_logprobs"] = self.ref_logprobs[rows]
        seq = SequenceBatch(self.sequences[rows], self.attention_mask[rows], self.response_mask[rows])
        return Batch(sequences=seq, index=rows.cpu(), extra=extra)


def check_groups(prompts: list[Any], group_size: int, name: str) -> None:
    """ValueError unless the prompts come as consecutive runs of `group_size` copies of one prompt."""
    n, B = group_size, len(prompts)
    if B % n or any(prompts[i] != prompts[i - i % n] for i in range(B)):
        raise ValueError(
            f"{name} expects {n} consecutive samples of each prompt in the rollout (group_size={n}); got {B} responses "
            "that are not. The trainer repeats prompts by `samples_per_prompt()`; a custom loop must do the same."
        )


def step_counts(batch: Batch) -> tuple[Any, Any]:
    """(sequences, loss tokens) a micro-batch's sums divide by so that the trainer's average of the
    step's micro-batch losses (and DDP's over processes) is the step's mean: the step's totals
    (written by `GroupObjective.minibatches`) over the micro-batches x processes. A batch without
    them (built by hand) is its own step: its own counts."""
    x = batch.extra
    if "step_sequences" in x:
        parts = x.get(LOSSES_IN_STEP, 1)
        return max(x["step_sequences"], 1.0) / parts, max(x["step_tokens"], 1.0) / parts
    return max(len(batch), 1), x["mask"].sum().clamp(min=1)


class GroupObjective(Objective):
    """Base of GRPO and RLOO: groups of samples per prompt, advantages from the group, no value head.
    Subclasses give `advantages`, `passes`, `minibatch_size` and `loss`."""

    online: ClassVar[bool] = True
    data_kind: ClassVar[str] = "prompts"
    needs_reference: ClassVar[bool] = True  # the trainer builds it; `reference_needed_in_training` may free it
    needs_reward: ClassVar[bool] = True
    needs_value_head: ClassVar[bool] = False
    Config: ClassVar[type[PluginConfig]] = GroupConfig

    def __init__(self, config: PluginConfig | None = None):
        super().__init__(config)
        self.iteration = 0
        self.totals = {"samples": 0.0, "dropped_groups": 0.0, "skipped_updates": 0.0}
        self.last_metrics: dict[str, float] = {}
        self.steps_taken = 0.0

    # -------------------------------------------------------------------- what subclasses give
    def advantages(self, scores: torch.Tensor, seq_kl: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-sample advantages [B] from the scores [B] (consecutive groups) and, where the reference
        is there, each sample's KL k1 summed over its tokens; extra figures to log."""
        raise NotImplementedError

    def uses_reference(self) -> bool:
        """Whether the update needs the reference log-probs (a KL term)."""
        return False

    def passes(self) -> int:
        """Passes over each iteration's samples."""
        return 1

    def minibatch_size(self) -> int | None:
        """Samples per optimizer step on each process (None: all of them, one step per pass)."""
        return None

    def needs_sampling_logprobs(self) -> bool:
        """Whether the update reads the sampling policy's log-probs (a second forward pass over the
        rollout). With one optimizer step per iteration and no KL in the reward it need not: the
        policy has not moved since sampling, so the loss's own log-probs, detached, are the same."""
        return self.passes() > 1 or self.minibatch_size() is not None

    # -------------------------------------------------------------------- hooks
    def samples_per_prompt(self) -> int:
        return self.config.group_size

    def reference_needed_in_training(self) -> bool:
        return self.uses_reference()

    @torch.no_grad()
    def make_experience(self, rollout: Rollout, rewards: torch.Tensor, policy: Policy, reference: Policy | None) -> GroupExperience:
        c, G = self.config, self.config.group_size
        check_groups(rollout.prompts, G, self.name)
        self.iteration += 1
        device = next(policy.module.parameters()).device
        ids, attn = rollout.sequences.to(device), rollout.attention_mask.to(device)
        resp = rollout.response_mask.to(device)
        mask = resp[:, 1:].float()
        B = ids.shape[0]
        old = None  # the sampling policy's log-probs, where the update reads them
        if self.needs_sampling_logprobs():
            old = apply_mask(rollout.logprobs.to(device).float(), mask)
        ref = None
        if reference is not None:
            ref = apply_mask(reference.logprobs(ids, attn).float(), mask)
        elif self.uses_reference():
            raise ValueError(f"{self.name}: this configuration has a KL term and needs the reference policy")
        seq_kl = (old - ref).sum(-1) if ref is not None and old is not None else None  # k1 summed: KL(pi || ref) per sequence

        scores = rewards.to(device).float()
        adv, extra = self.advantages(scores, seq_kl)
        truncated = ~rollout.finished.to(device).bool()
        loss_mask = mask * (~truncated).float()[:, None] if c.mask_truncated_completions else mask

        groups = scores.view(-1, G)
        equal = (groups == groups[:, :1]).all(-1)  # no spread: no advantage (DAPO's criterion)
        keep = ~equal if c.dynamic_sampling else torch.ones_like(equal)
        rows = torch.arange(B, device=device).view(-1, G)[keep].flatten()

        # dr-grpo's constant L: the policy's length budget, else the longest response of any process.
        max_len = int(getattr(getattr(policy, "config", None), "max_new_tokens", 0) or all_rows(resp.sum(-1).max().view(1)).max())
        # An idle sample (no loss token, advantage 0) for the steps this process has nothing left for.
        idle_extra: dict[str, Any] = {
            "mask": torch.zeros_like(mask[:1]), "advantages": torch.zeros_like(adv[:1]), "max_len": max_len, "idle": True,
        }
        if old is not None:
            idle_extra["old_logprobs"] = old[:1]
        if ref is not None:
            idle_extra["ref_logprobs"] = ref[:1]
        idle = Batch(SequenceBatch(ids[:1], attn[:1], resp[:1]), torch.zeros(1, dtype=torch.long), extra=idle_extra)

        everyone = all_rows(scores)
        lengths = mask.sum(-1)
        metrics = {
            "reward_mean": everyone.mean().item(),
            "reward_std": everyone.std().item() if everyone.numel() > 1 else 0.0,
            "zero_std_groups": equal.float().sum().item(),
            "groups": float(groups.shape[0]),
            "dropped_groups": float((~keep).sum().item()),
            "kept_samples": float(len(rows)),
            "response_tokens": lengths.mean().item(),
            "truncated": truncated.float().sum().item(),
            "samples": float(B),
            "advantage_abs": adv.abs().mean().item(),
        }
        if seq_kl is not None:
            metrics["kl"] = seq_kl.mean().item()
        metrics.update(extra)
        summed = ("zero_std_groups", "groups", "dropped_groups", "kept_samples", "truncated", "samples")
        metrics = across_processes(metrics, summed=summed, device=device)
        for key in ("samples", "dropped_groups"):
            self.totals[key] += metrics[key]
        self.last_metrics = metrics
        return GroupExperience(
            ids[rows], attn[rows], resp[rows], loss_mask[rows], old[rows] if old is not None else None, ref[rows] if ref is not None else None,
            adv[rows], max_len, idle, metrics,
        )

    def minibatches(self, experience: GroupExperience, policy: Policy) -> Iterator[list[Batch]]:
        """`passes()` passes over the kept samples, shuffled, `minibatch_size()` per step; every process
        takes the steps of the one that kept the most (idle batches where it has run out)."""
        self.steps_taken = 0.0
        device = experience.sequences.device
        most = int(all_rows(torch.tensor([len(experience)], device=device)).max())
        if most == 0:  # every group of every process dropped: nothing to learn from
            return
        size = self.minibatch_size() or most
        micro = self.config.micro_batch_size or size
        for _ in range(self.passes()):
            order = torch.randperm(len(experience))
            for start in range(0, most, size):
                rows = order[start : start + size]
                step = [experience.batch(rows[k : k + micro]) for k in range(0, len(rows), micro)] or [experience.idle]
                real = [b for b in step if not b.extra.get("idle")]
                local = torch.tensor([float(sum(len(b) for b in real)), float(sum(b.extra["mask"].sum().item() for b in real))],
                                     dtype=torch.float64, device=device)
                seqs, tokens = all_sum(local).tolist()
                for b in step:
                    b.extra["step_sequences"], b.extra["step_tokens"] = seqs, tokens
                yield step
                self.steps_taken += 1

    def after_iteration(self, metrics: dict[str, float]) -> dict[str, float]:
        """The experience's figures of this iteration (the same keys on every process) and totals."""
        m = dict(self.last_metrics)
        samples, groups = max(m.pop("samples", 1.0), 1.0), max(m.pop("groups", 1.0), 1.0)
        out = {k: v for k, v in m.items() if k not in ("truncated", "zero_std_groups")}
        out["truncated_rate"] = m.get("truncated", 0.0) / samples
        out["zero_std_fraction"] = m.get("zero_std_groups", 0.0) / groups
        skipped = float(self.steps_taken == 0)
        self.totals["skipped_updates"] += skipped
        out["skipped_update"] = skipped
        out["optimizer_steps"] = float(self.steps_taken)
        out["dropped_groups_total"] = self.totals["dropped_groups"]
        out["samples_total"] = self.totals["samples"]
        return {k: float(v) for k, v in out.items()}

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.iteration = int(state["iteration"])
            self.totals = {k: float(v) for k, v in state["totals"].items()}
