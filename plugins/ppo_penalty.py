"""PPO with an adaptive KL penalty instead of clipping (Schulman et al. 2017, arXiv:1707.06347, Sec. 4).

Same experience as `ppo-clip` (`rlhfzoo.plugins.actor_critic`: KL-to-reference penalty in the reward, GAE,
whitened advantages). The surrogate is not clipped; a penalty on the move away from the sampling
policy keeps each update small:

    rho_t   = pi(a_t|s_t) / pi_old(a_t|s_t)
    L_KLPEN = -E_t[rho_t A_t - beta KL[pi_old(.|s_t), pi(.|s_t)]]                 # Eq. (8)
    L       = L_KLPEN + c_1 L_VF - c_2 H[pi](s_t)  (+ ptx_coef NLL_demos)

KL[pi_old, pi] is estimated on the sampled tokens (from pi_old) with `penalty_estimator`
(k3 = rho - 1 - log rho by default). After the epochs, d = E_t[KL[pi_old, pi]] is measured with
the updated policy over the whole batch, and beta is adapted for the next iteration:

    d < d_targ / 1.5  ->  beta <- beta / 2;      d > d_targ x 1.5  ->  beta <- beta x 2

This beta is the trust-region penalty; the reward's KL penalty to the reference (`kl_coef`) is a
separate, fixed coefficient.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlhfzoo import hookimpl, kernels
from rlhfzoo.plugins.actor_critic import ActorCriticObjective, ExperienceConfig
from rlhfzoo.interfaces import BenchProtocol, LossOutput
from rlhfzoo.ops import global_masked_mean, masked_mean


def adapt_penalty(beta: float, kl: float, target: float) -> float:
    """Sec. 4 of arXiv:1707.06347: halve beta when d < d_targ/1.5, double it when d > 1.5 d_targ."""
    if kl < target / 1.5:
        return beta / 2.0
    if kl > target * 1.5:
        return beta * 2.0
    return beta


class PPOPenaltyConfig(ExperienceConfig):
    penalty_init: float = Field(1.0, gt=0, description="Initial beta of Eq. (8): weight of KL(pi_old || pi) in the loss.")
    penalty_target: float = Field(
        0.03, gt=0, description="d_targ: target mean per-token KL(pi_old || pi) of one iteration's update (the paper tries 0.003, 0.01, 0.03)."
    )
    penalty_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Estimator of KL(pi_old || pi) on the sampled tokens (rlhfzoo.kernels.token_kl).")
    min_penalty: float = Field(1e-4, gt=0, description="Lower bound of the adapted beta.")
    max_penalty: float = Field(1e4, gt=0, description="Upper bound of the adapted beta.")
    value_clip: float | None = Field(0.2, gt=0, description="Clip the value update to +- this around the old values (null: unclipped).")
    epochs: int = Field(4, ge=1, description="Passes over each iteration's experience.")
    minibatch_size: int = Field(16, ge=1, description="Sequences per optimizer step.")


class PPOPenalty(ActorCriticObjective):
    name = "ppo-penalty"
    summary = "PPO with an adaptive KL(pi_old || pi) penalty in the loss instead of ratio clipping (Eq. 8)."
    paper = "Schulman et al. 2017, arXiv:1707.06347"
    Config = PPOPenaltyConfig
    bench = BenchProtocol(train={"steps": 20, "batch_size": 32, "lr": 5e-4}, kl_knob="kl_coef", kl_sweep=(0.03, 0.1, 0.3))

    def __init__(self, config=None):
        super().__init__(config)
        self.beta = float(self.config.penalty_init)
        self.measured_kl = float("nan")

    def minibatches(self, experience, policy):
        c = self.config
        self.measured_kl = float("nan")
        yield from self.shuffled_minibatches(experience, c.epochs, c.minibatch_size)
        # d = E_t[KL[pi_old, pi]] with the updated policy, over the whole batch (of every process:
        # beta stays the same everywhere).
        with torch.no_grad():
            logprobs = policy.logprobs(experience.sequences, experience.attention_mask).float()
            kl = kernels.token_kl(experience.old_logprobs, logprobs, c.penalty_estimator)
            self.measured_kl = global_masked_mean(kl, experience.mask).item()

    def loss(self, batch, policy, reference=None) -> LossOutput:
        c, x = self.config, batch.extra
        mask, old, adv = x["mask"], x["old_logprobs"], x["advantages"]
        out = self.forward(batch, policy, entropy=True)
        logprobs = out["logprobs"]

        n = self.tokens(batch)  # token means over the whole optimizer step
        ratio = torch.exp(logprobs - old)
        penalty = masked_mean(kernels.token_kl(old, logprobs, c.penalty_estimator), mask, count=n)  # KL[pi_old, pi]
        pg = -masked_mean(ratio * adv, mask, count=n) + self.beta * penalty  # Eq. (8)
        vf, vmetrics = self.value_loss(out["values"], batch, c.value_clip)
        extra, emetrics = self.extra_terms(batch, logprobs, out["entropy"], policy)
        loss = pg + c.vf_coef * vf + extra
        metrics = {"pg_loss": pg.item(), "approx_kl": penalty.item(), "penalty_beta": self.beta, **vmetrics, **emetrics}
        return LossOutput(loss, metrics)

    def after_iteration(self, metrics):
        """Adapt beta for the next iteration from the KL `minibatches` measured after the epochs."""
        out = super().after_iteration(metrics)
        c = self.config
        out["post_kl"] = self.measured_kl
        out["penalty_beta"] = self.beta  # the beta this iteration used
        if self.measured_kl == self.measured_kl:  # not NaN: the epochs ran
            self.beta = min(max(adapt_penalty(self.beta, self.measured_kl, c.penalty_target), c.min_penalty), c.max_penalty)
        return out

    def state_dict(self):
        return {**super().state_dict(), "beta": self.beta}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state:
            self.beta = float(state["beta"])


@hookimpl
def register_objectives(register):
    register(PPOPenalty)
