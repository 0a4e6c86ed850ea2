"""Training budgets on a declared axis: `train.budget: {AXIS: AMOUNT}` ends a run at the end of the
first step (offline) or iteration (online) where that much has been spent; `train.steps` is then
a cap. `rlhfzoo bench --budget AXIS=AMOUNT` holds every row to one budget this way.

The axes, each counted over all processes:
- `seconds`: training wall-clock (the end-of-run evaluation excluded);
- `train_tokens`: tokens through the policy's training forward passes;
- `generated_tokens`: tokens the policy sampled (online objectives);
- `reward_calls`: responses scored by the reward source (online objectives, rejection sampling);
- `examples`: examples drawn for training, steps x `train.batch_size` (offline: labelled pairs or
  examples; online: prompts).

An offline objective spends no generated tokens and calls no reward source, so it cannot be held to
those two axes (`held_to`); the learning-rate schedule still runs over `train.steps`.
"""

from __future__ import annotations

import math
from typing import Any

BUDGET_AXES = ("seconds", "train_tokens", "generated_tokens", "reward_calls", "examples")
ONLINE_AXES = ("generated_tokens", "reward_calls")  # spent only by objectives that sample or score


def check_budget(budget: dict[str, float] | None) -> dict[str, float] | None:
    """A valid budget: one axis of BUDGET_AXES with a positive amount (ValueError otherwise)."""
    if budget is None:
        return None
    if len(budget) != 1:
        raise ValueError(f"give exactly one axis, e.g. {{seconds: 60}}; got {dict(budget)}")
    (axis, amount), = budget.items()
    if axis not in BUDGET_AXES:
        raise ValueError(f"unknown budget axis {axis!r}; the axes are {', '.join(BUDGET_AXES)}")
    if not (math.isfinite(amount) and amount > 0):
        raise ValueError(f"the budget must be a positive, finite amount, got {axis}: {amount}")
    return {axis: float(amount)}


def held_to(axis: str, online: bool, scores_rewards: bool) -> str | None:
    """None where an objective can be held to `axis`, else why not (the bench's table says so)."""
    if axis == "generated_tokens" and not online:
        return "samples nothing while training"
    if axis == "reward_calls" and not (online or scores_rewards):
        return "calls no reward source while training"
    return None


def spent(axis: str, seconds: float, step: int, batch_size: int, counters: dict[str, float], reward_calls: float) -> float:
    """How much of `axis` a run has spent after `step` steps (every argument summed over processes,
    `seconds` the same on all of them)."""
    if axis == "seconds":
        return seconds
    if axis == "examples":
        return float(step * batch_size)
    if axis == "reward_calls":
        return float(reward_calls)
    return float(counters.get(axis, 0))


def report(budget: dict[str, float], used: float, step: int, steps: int) -> dict[str, Any]:
    """The summary's record of a budgeted run: the axis, its limit, what was spent, and whether the
    budget (not the step cap) ended the run."""
    (axis, limit), = budget.items()
    return {"axis": axis, "limit": limit, "used": used, "step": step, "reached": used >= limit, "step_cap": steps}
