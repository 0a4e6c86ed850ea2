"""Training budgets on a declared axis: `train.budget: {AXIS: AMOUNT}` ends a run at the end of the
first step (offline) or iteration (online) where that much has been spent; `train.steps` is then
a cap. `rlhfzoo bench --budget AXIS=AMOUNT` holds every row to one budget this way.

The axes, each counted over all processes:
- `seconds`: training wall-clock (the end-of-run evaluation excluded);
- `train_tokens`: tokens through the policy's training forward passes;
- `generated_tokens`: tokens the policy sampled (online objectives);
- `reward_calls`: responses scored by the reward source (online objectives, rejection sampling);
- `examples`: examples drawn for training, steps x `train.batch_size` (offline: labelled pairs or
  examples; online: prompts);
- `flops`: the policy's estimated training compute, after Kaplan et al. 2020 (arXiv:2001.08361,
  Sec. 2.1): 6 N per training token (forward 2 N, backward 4 N) plus 2 N per sampled token, with
  N the policy's matrix-multiply parameters (`matmul_params`). Forward-only passes of the
  reference, the reward model and a separate critic are not counted, nor is attention's
  context-dependent term, so it is the policy's share of the compute, alike for every row.

An offline objective spends no generated tokens and calls no reward source, so it cannot be held to
those two axes (`held_to`); the learning-rate schedule still runs over `train.steps`.
"""

from __future__ import annotations

import math
from typing import Any

BUDGET_AXES = ("seconds", "train_tokens", "generated_tokens", "reward_calls", "examples", "flops")
FLOPS_PER_TRAIN_TOKEN = 6  # per parameter: forward 2 + backward 4
FLOPS_PER_GENERATED_TOKEN = 2  # per parameter: one forward, the KV cache keeps the prefix
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


def matmul_params(model: Any) -> int:
    """N of the FLOPs estimate: the parameters of a transformers causal LM that multiply activations,
    i.e. all of them, each tied tensor once, less the input embedding (a lookup), plus the output
    projection even where it is tied to the input embedding (the logits' matmul)."""
    unique = {id(p): p for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    n = sum(p.numel() for p in unique.values()) - embedding.numel()
    if output is not None and output.weight is embedding:
        n += embedding.numel()
    return n


def policy_params(policy: Any) -> int | None:
    """`matmul_params` of a policy's transformers LM (`policy.module.lm`), or None for a policy
    without one (its runs cannot be held to `flops`)."""
    lm = getattr(policy.module, "lm", None)
    if not hasattr(lm, "get_input_embeddings"):
        return None
    from rlhfzoo.lora import causal_lm

    return matmul_params(causal_lm(lm))


def flops(counters: dict[str, float], params: int) -> float:
    """Estimated training FLOPs of a policy with `params` matmul parameters from its token counters."""
    return float(params) * (FLOPS_PER_TRAIN_TOKEN * counters.get("train_tokens", 0)
                            + FLOPS_PER_GENERATED_TOKEN * counters.get("generated_tokens", 0))


def spent(axis: str, seconds: float, step: int, batch_size: int, counters: dict[str, float], reward_calls: float,
          params: int = 0) -> float:
    """How much of `axis` a run has spent after `step` steps (every argument summed over processes,
    `seconds` the same on all of them; `params`: the policy's `matmul_params`, for `flops`)."""
    if axis == "flops":
        return flops(counters, params)
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
