"""PPO with the clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), as used for RLHF by
Ziegler et al. 2019 (arXiv:1909.08593) and InstructGPT (arXiv:2203.02155).

Experience (`rlhfzoo.plugins.actor_critic`): per-token rewards r_t = -beta k_t plus the sequence score on
the last response token, GAE advantages A_t (whitened), returns R_t. Then `epochs` passes of
shuffled minibatches, one optimizer step each, minimising

    rho_t   = pi(a_t|s_t) / pi_old(a_t|s_t)
    L_CLIP  = -E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)]            # Eq. (7)
    L_VF    = 0.5 E_t[max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2)]
    L       = L_CLIP + c_1 L_VF - c_2 H[pi](s_t)  (+ ptx_coef NLL_demos)          # Eq. (9), sign flipped

Early stop: the epochs end once a minibatch's approximate KL(pi_old || pi), E[(rho - 1) - log rho],
exceeds 1.5 x `target_kl` (measured by `loss` as the token mean over the minibatch, every process's
micro-batches together, and read by `after_step` after that minibatch's update: every process stops
at the same step). The KL coefficient beta of the reward follows the adaptive controller of Ziegler
et al. (`rlhfzoo.ops.AdaptiveKLController`) unless `adaptive_kl: false`, from the KL of every
process's samples.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.plugins.actor_critic import ActorCriticObjective, ExperienceConfig
from rlhfzoo.interfaces import BenchProtocol, LossOutput
from rlhfzoo.ops import AdaptiveKLController, FixedKLController, apply_mask, masked_mean


def ppo_clip_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
    count: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Masked token mean of -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = exp(logprobs - old_logprobs);
    `count` replaces the number of tokens as the divisor (see `rlhfzoo.ops.step_denominator`)."""
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages)  # Eq. (7)
    return masked_mean(-surrogate, mask, count=count)


class PPOConfig(ExperienceConfig):
    clip_eps: float = Field(0.2, gt=0, lt=1, description="epsilon of Eq. (7): the ratio pi/pi_old is clipped to [1 - eps, 1 + eps].")
    value_clip: float | None = Field(0.2, gt=0, description="Clip the value update to +- this around the old values (null: unclipped squared error).")
    epochs: int = Field(4, ge=1, description="Passes over each iteration's experience.")
    minibatch_size: int = Field(16, ge=1, description="Sequences per optimizer step.")
    target_kl: float | None = Field(
        None, gt=0, description="Early stop: end the epochs once a minibatch's approximate KL(pi_old || pi) exceeds 1.5 x this (null: never)."
    )
    adaptive_kl: bool = Field(True, description="Adapt the reward's KL coefficient towards `kl_target` (Ziegler et al. 2019); false: fixed `kl_coef`.")
    kl_target: float = Field(6.0, gt=0, description="Target KL(pi || ref) per sequence, in nats, of the adaptive controller.")
    kl_horizon: float = Field(10000, gt=0, description="Horizon of the adaptive controller, in samples: beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon.")


class PPOClip(ActorCriticObjective):
    name = "ppo-clip"
    aliases = ("ppo",)
    summary = "PPO, clipped surrogate objective: epochs of minibatches, clipped value loss, entropy bonus, adaptive KL penalty in the reward."
    paper = "Schulman et al. 2017, arXiv:1707.06347; Ziegler et al. 2019, arXiv:1909.08593"
    Config = PPOConfig
    # The budget of `rlhfzoo bench` and configs/ppo.yaml on `sentiment`: ~25 s on two CPU cores.
    bench = BenchProtocol(train={"steps": 20, "batch_size": 32, "lr": 5e-4}, kl_knob="kl_target", kl_sweep=(2.0, 6.0, 12.0))

    def __init__(self, config=None):
        super().__init__(config)
        self.epochs_run, self.early_stopped = 0.0, 0.0  # of the current iteration, logged by after_iteration
        self.kl_exceeded = False  # set by after_step: the step's approximate KL passed 1.5 x target_kl

    def make_kl_controller(self):
        c = self.config
        return AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl else FixedKLController(c.kl_coef)

    def minibatches(self, experience, policy):
        c = self.config
        self.epochs_run, self.early_stopped = 0.0, 0.0
        B = len(experience)
        for _ in range(c.epochs):
            order = torch.randperm(B)
            for start in range(0, B, c.minibatch_size):
                self.kl_exceeded = False
                yield self.groups(experience, order[start : start + c.minibatch_size])
                if self.kl_exceeded:  # recorded by `after_step` of the step just taken
                    self.early_stopped = 1.0
                    return
            self.epochs_run += 1

    def after_step(self, metrics):
        """Early stop: note whether this step's approximate KL(pi_old || pi) -- the token mean over its
        micro-batches and processes, the same on each -- exceeded 1.5 x `target_kl`; `minibatches` then
        ends the epochs."""
        c = self.config
        self.kl_exceeded = c.target_kl is not None and metrics["approx_kl"] > 1.5 * c.target_kl
        return {}

    def loss(self, batch, policy, reference=None) -> LossOutput:
        c, x = self.config, batch.extra
        mask, old, adv = x["mask"], x["old_logprobs"], x["advantages"]
        out = self.forward(batch, policy, entropy=True)
        logprobs = out["logprobs"]

        n = self.tokens(batch)  # token means over the whole optimizer step
        pg = ppo_clip_loss(logprobs, old, adv, mask, c.clip_eps, count=n)
        vf, vmetrics = self.value_loss(out["values"], batch, c.value_clip)
        extra, emetrics = self.extra_terms(batch, logprobs, out["entropy"], policy)
        loss = pg + c.vf_coef * vf + extra

        with torch.no_grad():
            log_ratio = apply_mask(logprobs - old, mask)
            ratio = torch.exp(log_ratio)
            approx_kl = masked_mean((ratio - 1) - log_ratio, mask, count=n).item()  # k3 estimate of KL(pi_old || pi)
            clipfrac = masked_mean(((ratio - 1).abs() > c.clip_eps).float(), mask, count=n).item()
        metrics = {"pg_loss": pg.item(), "approx_kl": approx_kl, "clipfrac": clipfrac, **vmetrics, **emetrics}
        return LossOutput(loss, metrics)

    def after_iteration(self, metrics):
        out = super().after_iteration(metrics)
        out["ppo_epochs"] = float(self.epochs_run)
        out["early_stopped"] = float(self.early_stopped)
        return out


@hookimpl
def register_objectives(register):
    register(PPOClip)
