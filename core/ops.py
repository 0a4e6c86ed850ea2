"""Tensor helpers shared by the plugins: masked statistics, the SFT loss, GAE, KL controllers,
running moments, and the few reductions across processes that keep them the same on every process.

Masks are 0/1 tensors the shape of the data; a masked-out entry never contributes to a statistic
and comes out as 0 of `gae`. Sequences may be left-padded (prompts) and right-padded (responses),
so nothing here assumes where the valid entries start or end.

    gae:                   Schulman et al. 2016, arXiv:1506.02438, Eq. (16)
    AdaptiveKLController:  Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhfzoo.data.types import Batch


# ------------------------------------------------------------------------------ masked statistics


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is set, else 0 (a where, not a product: NaN/inf off the mask never leak in)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return apply_mask(x, mask).sum() if dim is None else apply_mask(x, mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, count: Any = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (over `dim`, or everything); 0 where none are,
    still attached to `x`'s graph (a loss over an all-masked batch backpropagates zeros). `count`
    replaces the number of masked entries as the divisor (e.g. `step_denominator`, so that the
    micro-batch losses of an optimizer step average to the token mean of the whole step).

    Entries off the mask are dropped by a `where`, not multiplied by 0, so a NaN or inf there never
    reaches the mean. On finite inputs this is the product form `(x * mask).sum() / n` bit for bit
    (up to the sign of an exact zero), which is what the preference objectives (DPO/IPO/KTO losses
    and metrics over their valid rows) and the SFT loss were written with.
    """
    mask = mask.to(x.dtype)
    if count is not None:
        return masked_sum(x, mask, dim) / count
    if dim is None:
        return apply_mask(x, mask).sum() / mask.sum().clamp(min=1)
    return apply_mask(x, mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of `x` (Bessel-corrected unless `unbiased=False`)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    centred = apply_mask(x - masked_mean(x, mask), mask)
    var = (centred**2).sum() / n.clamp(min=1)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, across_processes: bool = False
) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean added back if not `shift_mean`); 0 off the mask.
    `across_processes`: the mean and variance of every process's entries (each process passes its own)."""
    if across_processes and distributed():
        return _whiten_across_processes(x, mask, shift_mean, eps)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return apply_mask(whitened, mask)


def response_nll(logprobs: torch.Tensor, response_mask: torch.Tensor, count: Any = None) -> torch.Tensor:
    """The SFT loss: mean negative log-likelihood of the response tokens of a micro-batch,

        L = - (1 / |y|) sum_t log pi(y_t | x, y_<t)        (token mean over the whole micro-batch)

    `logprobs` [B, T-1] as `Policy.logprobs` returns them (entry t is about token t+1) and
    `response_mask` [B, T] as the batch holds it (shifted here); 0 for a batch without response tokens.
    `count` replaces |y| as the divisor (see `step_denominator`).
    """
    return -masked_mean(logprobs, response_mask[:, 1:], count=count)


# ------------------------------------------------------------------------------ advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, per token: ([B, T], [B, T]).

        delta_t = r_t + gamma V_{t'} - V_t            t' = next valid step (V = 0 after the last)
        A_t     = delta_t + gamma lam A_{t'}          (arXiv:1506.02438 Eq. 16)
        R_t     = A_t + V_t                           (the value target, TD(lambda) return)

    `mask` [B, T] marks the valid steps (the response tokens); the recursion skips the others,
    so left padding, right padding or holes do not break it. Off the mask both outputs are 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = apply_mask(rewards, mask), apply_mask(values, mask)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # Only a valid step becomes "the next step" of the ones before it.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    returns = apply_mask(advantages + values, mask)
    return advantages, returns


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last 1 in each row of `mask` [B, T] (-1 for an all-zero row)."""
    T = mask.shape[-1]
    cols = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, cols, torch.full_like(cols, -1)).max(-1).values


# ------------------------------------------------------------------------------ KL controllers


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv:1909.08593, Sec. 2.2): steer the KL towards `target`.

        e_t      = clip(KL_t / target - 1, -0.2, 0.2)
        beta_t+1 = beta_t (1 + K_beta e_t),   K_beta = n_steps / horizon

    where n_steps is the number of samples (episodes) behind the measured KL_t.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            return self.value
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


# ------------------------------------------------------------------------------ running moments


class RunningMoments:
    """Running mean and standard deviation of a stream of batches (Chan et al.'s parallel update, in
    float64), for reward normalisation: PPO's `normalize_rewards`, the `reward-model` source's
    `normalize: running`. Checkpointed through `state_dict` (mean, population variance, count).

    `std` is the sample standard deviation (Bessel-corrected), or with `unbiased=False` the
    population one; 1.0 until two values have been seen (there is no spread to divide by yet).
    """

    def __init__(self, unbiased: bool = True):
        self.unbiased = unbiased
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch; returns the batch's own (mean, sample std)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return self.mean, self.std
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total
        return b_mean, math.sqrt(b_var * n / max(n - 1, 1))

    @property
    def std(self) -> float:
        if self.count < 2:
            return 1.0
        return math.sqrt(self.var * self.count / (self.count - 1) if self.unbiased else self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


# ------------------------------------------------------------------------------ across micro-batches and processes

# Set by the trainer in every micro-batch's `Batch.extra` before the backward passes of an optimizer step.
TOKENS_IN_STEP = "tokens_in_step"  # response tokens (response_mask[:, 1:]) of the whole step, all processes
LOSSES_IN_STEP = "losses_in_step"  # micro-batch losses the step averages: micro-batches x processes


def step_denominator(batch: Any, count: Any) -> Any:
    """What a token mean over `batch`'s response tokens divides its sum by: `count`, the batch's own
    token count (clamped at 1: a plain mean), or, where the trainer set the step's totals in
    `batch.extra`, tokens_in_step / losses_in_step. The trainer averages the micro-batch losses of a
    step (and DDP the processes'), so these then add up to sum / tokens_in_step: every token of the
    step weighs the same, however the step is split into micro-batches and processes."""
    extra = getattr(batch, "extra", None) or {}
    if TOKENS_IN_STEP not in extra:
        return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)
    return max(float(extra[TOKENS_IN_STEP]), 1.0) / extra[LOSSES_IN_STEP]


def set_step_tokens(batches: list[Any], device: Any = None) -> None:
    """Write the step's totals into every micro-batch of an optimizer step (the trainer calls this
    before the backward passes): TOKENS_IN_STEP, the response tokens of all its micro-batches on all
    processes, and LOSSES_IN_STEP, micro-batches x processes. Items that are not `Batch`es (an
    objective's own types) are left alone. `device`: where the count is reduced (the backend's)."""
    batches = [b for b in batches if isinstance(b, Batch)]
    if not batches:
        return
    local = torch.tensor([float(sum(b.sequences.response_mask[:, 1:].sum().item() for b in batches))], dtype=torch.float64, device=device)
    world = torch.distributed.get_world_size() if distributed() else 1
    total = all_sum(local).item()
    for b in batches:
        b.extra[TOKENS_IN_STEP], b.extra[LOSSES_IN_STEP] = total, len(batches) * world


def step_share(batches: list[Any], local: float, device: Any = None) -> float:
    """What each micro-batch loss of an optimizer step divides its sum by, so that the trainer's
    average of the losses (over the step's micro-batches and processes) is the whole step's sum over
    its total of some figure (tokens, pair weights): `local`, this process's total over `batches`,
    summed over the processes, over micro-batches x processes. A collective: every process calls it
    once per step (`Objective.begin_step`). With one micro-batch on one process, `local` itself."""
    world = torch.distributed.get_world_size() if distributed() else 1
    total = all_sum(torch.tensor([float(local)], dtype=torch.float64, device=device)).item()
    return total / (max(len(batches), 1) * world)


def distributed() -> bool:
    """Whether torch.distributed runs (several processes); every helper below is the identity without it."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the processes (a new tensor, no gradient); `x` itself in one process."""
    if not distributed():
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x


def all_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` (same shape on each), concatenated along dim 0 in rank order; `x` in one process."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def across_processes(values: dict[str, float], summed: tuple[str, ...] = (), device: Any = None) -> dict[str, float]:
    """`values` averaged over the processes (summed for the keys in `summed`), the same on each."""
    if not distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = all_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device))
    n = torch.distributed.get_world_size()
    return {k: v if k in summed else v / n for k, v in zip(keys, t.tolist())}


def counts_across_processes(counts: dict[str, float], device: Any = None) -> dict[str, float]:
    """`counts` summed over the processes, over the union of their keys (a key some process lacks
    counts 0 there); every process must call it."""
    if not distributed():
        return dict(counts)
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, sorted(counts))  # the keys, in memory between the processes
    keys = sorted(set().union(*everyone))
    t = all_sum(torch.tensor([float(counts.get(k, 0)) for k in keys], dtype=torch.float64, device=device))
    return {k: int(v) if float(v).is_integer() else v for k, v in zip(keys, t.tolist())}


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_mean` over the masked entries of every process (each passes its own); no gradient."""
    mask = mask.to(x.dtype)
    return all_sum(masked_sum(x.detach(), mask)) / all_sum(mask.sum()).clamp(min=1)


def _whiten_across_processes(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float) -> torch.Tensor:
    mask = mask.to(x.dtype)
    n = all_sum(mask.sum())
    mean = all_sum(masked_sum(x, mask)) / n.clamp(min=1)
    var = all_sum((apply_mask(x - mean, mask) ** 2).sum()) / n.clamp(min=1) * n / (n - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return apply_mask(whitened if shift_mean else whitened + mean, mask)


def average_gradients(params: Any) -> None:
    """Average the `.grad` of `params` over the processes in place, one all-reduce per dtype and
    device (for a loss computed outside the DDP wrapper, whose gradients DDP never saw)."""
    if not distributed():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    n = torch.distributed.get_world_size()
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= n
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
