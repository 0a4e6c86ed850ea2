"""Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691).

Reference-free and in one stage: supervised fine-tuning on the chosen response plus a penalty
on the odds ratio between the chosen and the rejected response,

    log P(y|x)   = (1 / |y|) sum_t log pi(y_t | x, y_<t)          (length-normalised, as in the paper)
    odds(y|x)    = P(y|x) / (1 - P(y|x))                           # Eq. (4), arXiv:2403.07691
    L_OR         = - log sigma( log odds(y_w|x) - log odds(y_l|x) )  # Eq. (7)
    L_ORPO       = L_SFT + lambda * L_OR                           # Eq. (6)

with log odds(y|x) = log P - log(1 - P), and log(1 - P) = log(1 - exp(log P)) computed stably
(`log1mexp`: log(-expm1(a)) for a > -ln 2, log1p(-exp(a)) below; `log1p(-exp(a))` alone loses all
precision, and its gradient, as a -> 0). `lam` is the paper's lambda (0.1 in the paper; TRL's
ORPOTrainer calls it `beta`).

L_SFT is the negative log-likelihood of the chosen responses' tokens (`rlhfzoo.ops.response_nll`),
a token mean over the whole optimizer step (`step_denominator`), so gradient accumulation and
several processes give exactly the single-batch value, as for SFT. L_OR is the mean over the
micro-batch's valid pairs, as DPO's loss. Both come from one forward pass over the chosen and
rejected sequences together.

Pairs whose chosen and rejected responses are identical carry no preference (the odds ratio is 1
whatever the policy, zero gradient): they are counted and masked out of L_OR, but their chosen
response still counts in L_SFT (it is a demonstration like any other).

No reference model is used, so there is no implicit reward to evaluate on held-out pairs: the
evaluation is the default sampling one (the trainer reports no KL since it keeps no copy of the
starting policy; the bench measures it from its own copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import BenchProtocol, LossOutput, Objective, PluginConfig
from rlhfzoo.ops import masked_mean, response_nll, step_denominator
from rlhfzoo.plugins._preference import concat, valid_pairs, warn_identical_pairs

LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"). x is clamped just below 0 (log P = 0 exactly, P = 1, would give -inf)."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = torch.log(-torch.expm1(x))
    # The other branch gets inputs where it is finite, so that the unused side of `where` never
    # contributes 0 * inf = NaN to the gradient.
    far = torch.log1p(-torch.exp(x.clamp(max=-LN2)))
    return torch.where(x > -LN2, near_zero, far)


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) of P = exp(avg_logps), the length-normalised likelihood (Eq. 4, arXiv:2403.07691)."""
    return avg_logps - log1mexp(avg_logps)


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """Per-example odds-ratio loss L_OR [B] (Eq. 7, arXiv:2403.07691) from the average per-token
    log-probs of each side: -log sigma(log odds(chosen) - log odds(rejected))."""
    return -F.logsigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))


class ORPO(Objective):
    name = "orpo"
    summary = "ORPO: reference-free SFT on the chosen response + lambda * -log sigma(log odds ratio of chosen vs rejected)."
    paper = "Hong et al. 2024, arXiv:2403.07691"
    data_kind = "pairs"
    needs_reference = False
    # The budget of `rlhfzoo bench` and configs/orpo.yaml on `sentiment`. Measured 2026-11-30 with
    # tests/plugins/test_reference_free_learning.py's procedure: gain in gold over the SFT policy on 400
    # held-out prompts (SE of one gain ~0.035), KL to the SFT policy, grammatical rate (SFT 0.93-0.95).
    # lam 1, lr 1e-3, 60 steps, seeds 0-3: +0.090 / +0.085 / +0.113 / +0.127, KL 0.28-0.44,
    # grammatical 0.91-0.93; 100 steps: +0.113 / +0.136 / +0.189 (KL 0.48-0.66). lr 3e-4, seeds 0 / 1:
    # lam 0 (SFT on the chosen responses alone) +0.023 / +0.058, lam 0.1 (the paper's) +0.033 / +0.062,
    # lam 1 +0.070 / +0.082; lam 3 +0.009 / +0.074 / +0.080. The paper's lambda is small because its
    # SFT term teaches a base model to follow instructions; starting from an SFT policy the odds-ratio
    # term is what moves it. Seed 0, lr 1e-3: lam 0.3 / 1 / 3 -> KL 0.24 / 0.32 / 0.77.
    bench = BenchProtocol(
        train={"steps": 60, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10},
        options={"lam": 1.0},
        kl_knob="lam", kl_sweep=(0.3, 1.0, 3.0),
    )

    class Config(PluginConfig):
        lam: float = Field(
            0.1, ge=0, description="lambda: weight of the odds-ratio term against the SFT term (Eq. 6; 0.1 in the paper; TRL's `beta`)."
        )

    def prepare(self, data, collate, reference) -> None:
        warn_identical_pairs(self.name, data)

    def loss(self, batch, policy, reference=None) -> LossOutput:
        chosen_seq = batch.sequences
        n = len(chosen_seq)
        both = concat(chosen_seq, batch.rejected)
        logprobs = policy.logprobs(both.input_ids, both.attention_mask).float()  # one forward pass, both sides
        avg = masked_mean(logprobs, both.response_mask[:, 1:], dim=-1)  # per-token average log-prob [2B]
        chosen, rejected = avg[:n], avg[n:]
        n_tokens = chosen_seq.response_mask[:, 1:].sum()
        count = step_denominator(batch, n_tokens)  # the token mean of the whole optimizer step
        nll = response_nll(logprobs[:n], both.response_mask[:n], count)  # L_SFT on the chosen responses
        valid = valid_pairs(batch)
        or_loss = masked_mean(orpo_loss(chosen, rejected), valid)
        total = nll + self.config.lam * or_loss  # Eq. (6), arXiv:2403.07691
        with torch.no_grad():
            ratio = log_odds(chosen) - log_odds(rejected)
        chosen_d, rejected_d = chosen.detach(), rejected.detach()
        metrics = {
            "nll": nll.item(),
            "or_loss": or_loss.item(),
            "log_odds_ratio": masked_mean(ratio, valid).item(),
            "accuracy": masked_mean((chosen_d > rejected_d).float(), valid).item(),  # log odds is increasing in log P
            "logp_chosen": masked_mean(chosen_d, valid).item(),  # per token
            "logp_rejected": masked_mean(rejected_d, valid).item(),
            "skipped_pairs": float((~valid).sum().item()),
        }
        return LossOutput(total, metrics)


@hookimpl
def register_objectives(register):
    register(ORPO)
