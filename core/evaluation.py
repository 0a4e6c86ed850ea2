"""Held-out evaluation of a policy: gold reward (where the task has one), proxy reward, KL to
the reference, and the task's own response metrics (e.g. grammatical rate)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from rlhfzoo.interfaces import Policy, RewardSource, Task


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    if len(t) == 0:
        return float("nan"), float("nan")
    se = t.std(unbiased=True).item() / math.sqrt(len(t)) if len(t) > 1 else float("nan")
    return t.mean().item(), se


@torch.no_grad()
def sample(policy: Policy, prompts: Sequence[str], batch_size: int = 64, seed: int = 0, **sampling: Any):
    """Rollouts for `prompts` in batches, under a fixed seed (restoring the global RNG after)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return [policy.generate(list(prompts[i : i + batch_size]), **sampling) for i in range(0, len(prompts), batch_size)]
    finally:
        torch.set_rng_state(state)


@torch.no_grad()
def sequence_kl(policy: Policy, reference: Policy, rollout) -> torch.Tensor:
    """Per-sequence KL estimate sum_t (log pi - log pi_ref) over the sampled response tokens."""
    device = next(reference.module.parameters()).device
    ref = reference.logprobs(rollout.sequences.to(device), rollout.attention_mask.to(device)).float().cpu()
    mask = rollout.response_mask[:, 1:].float()
    return ((rollout.logprobs - ref) * mask).sum(-1)


@torch.no_grad()
def response_kls(policy: Policy, reference: Policy, rollouts: Sequence[Any]) -> torch.Tensor:
    """KL(policy || reference) per response. An inference-time policy that samples through a base
    (best-of-n: `kl_reference()` is that base) hands out the base's log-probs with its samples, so
    the sampled estimate would read 0: its closed form (`Policy.analytic_kl`) stands instead."""
    if policy.kl_reference() is not policy:
        n = sum(len(ro.responses) for ro in rollouts)
        return torch.full((n,), float(policy.analytic_kl()), dtype=torch.float64)
    return torch.cat([sequence_kl(policy, reference, ro) for ro in rollouts])


def evaluate(
    policy: Policy,
    task: Task,
    reward: RewardSource | None = None,
    reference: Policy | None = None,
    n_prompts: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    prompts = task.eval_prompts()[:n_prompts]
    rollouts = sample(policy, prompts, seed=seed)
    responses = [r for ro in rollouts for r in ro.responses]
    out: dict[str, float] = {"n": float(len(responses))}
    if task.has_gold_reward:
        out["gold"], out["gold_se"] = mean_and_se(task.gold_reward(prompts, responses).tolist())
    if reward is not None:
        out["proxy"], out["proxy_se"] = mean_and_se(reward.score(prompts, responses).tolist())
    if reference is not None:
        out["kl"], out["kl_se"] = mean_and_se(response_kls(policy, reference, rollouts).tolist())
    lengths = torch.cat([ro.response_mask.sum(-1) for ro in rollouts]).float()
    out["response_tokens"] = lengths.mean().item()
    out["finished_rate"] = torch.cat([ro.finished for ro in rollouts]).float().mean().item()
    out.update(task.response_metrics(prompts, responses))
    return out


def final_evaluation(
    objective: Any, policy: Policy, task: Task, reward: RewardSource | None, reference: Policy | None, n_prompts: int,
    seed: int = 0, output_dir: str | None = None,
) -> dict[str, float]:
    """The figures of a finished run: the objective's own evaluation (`Objective.evaluate`), or where
    it has none (None) the default one above."""
    own = objective.evaluate(policy, task, reward=reward, seed=seed, n_prompts=n_prompts, reference=reference, output_dir=output_dir)
    return own if own is not None else evaluate(policy, task, reward, reference, n_prompts, seed=seed)
