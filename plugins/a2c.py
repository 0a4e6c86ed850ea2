"""Synchronous advantage actor-critic (A2C; Mnih et al. 2016, arXiv:1602.01783, synchronous form),
the optimiser DeepMind used for RL from human preferences on Gopher (GopherCite, Menick et al. 2022,
arXiv:2203.11147; Sparrow, Glaese et al. 2022, arXiv:2209.14375).

One gradient step per batch of fresh samples (on-policy, so no importance ratio and no clipping):

    L_PG = -E_t[A_t log pi(a_t|s_t)]                   # the actor update of Algorithm S3, arXiv:1602.01783
    L_VF = 0.5 E_t[(V_t - R_t)^2]
    L    = L_PG + c_1 L_VF - c_2 H[pi](s_t) + beta E_t[k_t]  (+ ptx_coef NLL_demos)

A_t and R_t come from `rlhfzoo.plugins.actor_critic` (GAE; lam = 1 gives Monte-Carlo returns minus the
baseline). By default the KL penalty to the reference is in the loss, as in GopherCite, with the
k2 estimator k_t = (log pi/pi_ref)^2 / 2, whose gradient is that of KL(pi || pi_ref) in
expectation on on-policy samples; `kl_penalty: reward` puts it in the reward instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.plugins.actor_critic import ActorCriticObjective, ExperienceConfig
from rlhfzoo.interfaces import BenchProtocol, LossOutput
from rlhfzoo.ops import masked_mean


class A2CConfig(ExperienceConfig):
    kl_penalty: Literal["reward", "loss"] = Field(
        "loss", description="Where the KL penalty to the reference goes: `loss` (GopherCite, default) or `reward` (per token, InstructGPT)."
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k2", description="Per-token KL estimator (rlhfzoo.kernels.token_kl); k2's gradient is KL(pi || ref)'s on on-policy samples."
    )
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus (subtracted from the loss).")
    value_clip: float | None = Field(None, gt=0, description="Clip the value update to +- this around the old values (null: plain squared error).")


class A2C(ActorCriticObjective):
    name = "a2c"
    summary = "Synchronous advantage actor-critic: one policy-gradient step per batch, value loss, entropy bonus, KL penalty in the loss."
    paper = "Mnih et al. 2016, arXiv:1602.01783; Menick et al. 2022 (GopherCite), arXiv:2203.11147"
    Config = A2CConfig
    # One step per batch: larger batches (less gradient noise) and a higher learning rate than PPO.
    bench = BenchProtocol(
        train={"steps": 30, "batch_size": 64, "lr": 1e-3}, options={"kl_coef": 0.3}, kl_knob="kl_coef", kl_sweep=(0.03, 0.1, 0.3)
    )

    def minibatches(self, experience, policy):
        yield self.groups(experience, torch.arange(len(experience)))  # one optimizer step per batch

    def loss(self, batch, policy, reference=None) -> LossOutput:
        c, x = self.config, batch.extra
        mask, adv = x["mask"], x["advantages"]
        out = self.forward(batch, policy, entropy=True)
        logprobs = out["logprobs"]

        n = self.tokens(batch)  # token means over the whole optimizer step
        pg = -masked_mean(adv * logprobs, mask, count=n)  # policy gradient with the (detached) advantages
        vf, vmetrics = self.value_loss(out["values"], batch, c.value_clip)
        extra, emetrics = self.extra_terms(batch, logprobs, out["entropy"], policy)
        loss = pg + c.vf_coef * vf + extra
        approx_kl = masked_mean(x["old_logprobs"] - logprobs, mask, count=n).item()  # ~0: on-policy
        return LossOutput(loss, {"pg_loss": pg.item(), "approx_kl": approx_kl, **vmetrics, **emetrics})


@hookimpl
def register_objectives(register):
    register(A2C)
