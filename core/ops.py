"""Tensor helpers shared by the plugins: masked statistics, the SFT loss, GAE, KL controllers,
running moments.

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


# ------------------------------------------------------------------------------ masked statistics


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is set, else 0 (a where, not a product: NaN/inf off the mask never leak in)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return apply_mask(x, mask).sum() if dim is None else apply_mask(x, mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (over `dim`, or everything); 0 where none are,
    still attached to `x`'s graph (a loss over an all-masked batch backpropagates zeros).

    Entries off the mask are dropped by a `where`, not multiplied by 0, so a NaN or inf there never
    reaches the mean. On finite inputs this is the product form `(x * mask).sum() / n` bit for bit
    (up to the sign of an exact zero), which is what the preference objectives (DPO/IPO/KTO losses
    and metrics over their valid rows) and the SFT loss were written with.
    """
    mask = mask.to(x.dtype)
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


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean added back if not `shift_mean`); 0 off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return apply_mask(whitened, mask)


def response_nll(logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The SFT loss: mean negative log-likelihood of the response tokens of a micro-batch,

        L = - (1 / |y|) sum_t log pi(y_t | x, y_<t)        (token mean over the whole micro-batch)

    `logprobs` [B, T-1] as `Policy.logprobs` returns them (entry t is about token t+1) and
    `response_mask` [B, T] as the batch holds it (shifted here); 0 for a batch without response tokens.
    """
    return -masked_mean(logprobs, response_mask[:, 1:])


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
