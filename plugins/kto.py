"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306).

Learns from single responses labelled desirable / undesirable, no pairs. With the implied reward
r = log pi(y|x) - log pi_ref(y|x) and a reference point z0 = KL(pi || pi_ref), the
prospect-theoretic value of an example is sigma(beta (r - z0)) if desirable, sigma(beta (z0 - r))
if undesirable, and the loss is

    L = E_x,y [ w(y) (1 - v(x, y)) ]             # the KTO loss, Sec. 4.1, arXiv:2402.01306
        desirable:    w_d * (1 - sigma(beta * (r - z0)))
        undesirable:  w_u * (1 - sigma(beta * (z0 - r)))

z0 is estimated from mismatched prompt/completion pairs (x_i, y_j), i != j, as the mean of
their log-ratios over the batch -- here the whole optimizer step: `begin_step` runs the policy on
the mismatched pairs of every micro-batch (without gradients, one micro-batch at a time) and
takes the mean over all of them and over every process, so `train.grad_accum` and the number of
processes do not change the update (TRL estimates it per micro-batch). It is clamped at 0 (a KL is
non-negative) and detached (no gradient flows through the reference point), as the paper
prescribes. `loss` called on its own (outside the trainer) estimates it from its batch alone.
The mismatched pairs:

every row gets a fixed partner row before training (the next one in a seeded shuffle, cut into
chunks of `reference_batch_size`; TRL pairs within each batch instead, so its pairs change with the
split into micro-batches), and its mismatched pair is its prompt with the partner's response:

* `reference: model` -- the frozen reference model runs on each micro-batch's own and mismatched
  sequences every step (one forward);
* `reference: cached` (default) -- the reference log-probs of both are cached in `prepare`, so the
  trainer frees the reference model.

`loss` called on a batch without `prepare` pairs the batch's examples with each other (prompt i
with response i+1), so KTO asks for >= 2 examples per micro-batch.

The paper recommends w_d n_d / (w_u n_u) in [1, 4/3] (n_d, n_u: desirable and undesirable
counts); `prepare` warns once when the data and weights fall outside. Log-probs are summed over
response tokens (as in the paper); `average_logprobs` length-averages them. LoRA adapters as the
reference (peft) are not implemented.
"""

from __future__ import annotations

import random
import warnings

import torch
from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import BenchProtocol, Demonstration, LossOutput, Objective, UnpairedExample
from rlhfzoo.ops import all_sum, distributed, masked_mean
from rlhfzoo.plugins._preference import (
    ImplicitRewardEvaluation, PreferenceConfig, ReferenceCache, concat, reference_logprobs, response_tokens,
)

RECOMMENDED_RATIO = (1.0, 4.0 / 3.0)  # w_d n_d / (w_u n_u), Sec. 4.2 of arXiv:2402.01306
# In `Batch.extra`, set by `KTO.begin_step`: z0 of the optimizer step, and (`reference: model`) the
# reference log-probs of the batch's own responses, computed in the same forward as its pairs'.
REFERENCE_POINT, REFERENCE_LOGPS = "kl_reference_point", "reference_logps"


def kto_kl_estimate(kl_logratios: torch.Tensor) -> torch.Tensor:
    """z0: detached, non-negative estimate of KL(pi || pi_ref) from mismatched pairs' log-ratios [B]:
    their mean, over every process's pairs when torch.distributed is initialised (a collective)."""
    x = kl_logratios.detach().float()
    if not distributed():
        return x.mean().clamp(min=0.0)
    total = all_sum(torch.stack([x.sum().double(), x.new_tensor(float(x.numel()), dtype=torch.float64)]))
    return (total[0] / total[1].clamp(min=1)).float().clamp(min=0.0)


def kto_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example KTO loss [B]; `kl` is the reference point z0 (detached here whatever is passed)."""
    z0 = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
    desirable_loss = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))  # Sec. 4.1 arXiv:2402.01306, desirable y
    undesirable_loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))  # Sec. 4.1 arXiv:2402.01306, undesirable y
    return torch.where(desirable.bool(), desirable_loss, undesirable_loss)


class KTO(ImplicitRewardEvaluation, Objective):
    name = "kto"
    summary = "Kahneman-Tversky Optimization: prospect-theoretic loss on single desirable/undesirable responses, reference point z0 = KL(pi||pi_ref)."
    paper = "Ethayarajh et al. 2024, arXiv:2402.01306"
    data_kind = "unpaired"
    needs_reference = True
    # The budget of `rlhfzoo bench` and configs/kto.yaml on `sentiment`. Measured 2026-11-22 (400
    # held-out prompts, SFT -0.050 +- 0.025): 160 steps -> +0.082 (+3.5 SE), 120 -> +3.2 SE, 80 -> +2.7 SE.
    # lr 2e-4 (was 3e-4, which lost grammaticality on one seed of one of three builds of the cached
    # stages): mean gain of two seeds 5.1 / 5.6 / 3.9 SE on the three (2026-11-30).
    bench = BenchProtocol(
        train={"steps": 160, "batch_size": 32, "lr": 2e-4, "warmup_steps": 10, "lr_schedule": "cosine"}, options={"beta": 0.3},
        pair_accuracy=("implicit_reward_accuracy", "implicit_reward_pairs"), kl_knob="beta", kl_sweep=(0.1, 0.3, 1.0),
    )

    class Config(PreferenceConfig):
        beta: float = Field(0.1, gt=0, description="Inverse temperature beta of the value function (higher: stay closer to the reference).")
        desirable_weight: float = Field(1.0, gt=0, description="Weight w_d of desirable examples' losses (lambda_D in the paper).")
        undesirable_weight: float = Field(1.0, gt=0, description="Weight w_u of undesirable examples' losses (lambda_U in the paper).")
        seed: int = Field(
            0,
            description="Seed of the fixed mismatched partners (their reference log-probs cached too with `reference: cached`): "
            "a shuffle cut into chunks of `reference_batch_size` rows, partners within a chunk.",
        )

    def __init__(self, config=None):
        super().__init__(config)
        self.cache = ReferenceCache()
        self._partner: list[int] | None = None
        self._data, self._collate = None, None

    # ------------------------------------------------------------------------------ set-up
    def prepare(self, data, collate, reference) -> None:
        c = self.config
        n_d = sum(bool(e.desirable) for e in data)
        n_u = len(data) - n_d
        ratio = c.desirable_weight * n_d / (c.undesirable_weight * n_u) if n_u else float("inf")
        lo, hi = RECOMMENDED_RATIO
        if not lo <= ratio <= hi:
            fix = (
                f"e.g. desirable_weight={c.undesirable_weight * n_u / n_d:.3g} (ratio 1)"
                if n_d and n_u
                else "the data has only one class, so one term of the loss is never used"
            )
            warnings.warn(
                f"kto: {n_d} desirable and {n_u} undesirable examples with desirable_weight={c.desirable_weight} and "
                f"undesirable_weight={c.undesirable_weight} give w_d*n_d/(w_u*n_u) = {ratio:.3g}, outside the paper's "
                f"recommended [1, 4/3]; {fix}",
                stacklevel=2,
            )
        # Fixed partners: a seeded shuffle cut into chunks; within a chunk row k is paired with row k+1
        # (cyclically), exactly as the collator pairs them, so one collated chunk gives both sequences.
        n, size = len(data), c.reference_batch_size
        order = list(range(n))
        random.Random(f"kto-partners-{c.seed}").shuffle(order)
        chunks = [order[k : k + size] for k in range(0, n, size)]
        if len(chunks) > 1 and len(chunks[-1]) < 2:  # nobody is their own partner
            chunks[-2] += chunks.pop()
        partner = [0] * n
        for rows in chunks:
            for k, i in enumerate(rows):
                partner[i] = rows[(k + 1) % len(rows)]
        self._partner, self._data, self._collate = partner, data, collate
        if c.reference != "cached":
            return
        if reference is None:
            raise RuntimeError("kto: `reference: cached` needs the reference policy in `prepare`")
        views = {"own": lambda b: b.sequences, "kl": lambda b: b.kl_sequences}
        self.cache.build(views, data, collate, reference, c.average_logprobs, size, chunks=chunks)

    def reference_needed_in_training(self) -> bool:
        return self.config.reference == "model"  # `cached`: `prepare` stored its log-probs

    def _mismatched(self, i: int) -> UnpairedExample:
        own, other = self._data[i], self._data[self._partner[i]]
        return UnpairedExample(own.prompt, other.response, own.desirable)

    # ------------------------------------------------------------------------------ loss
    def _references(self, batch, reference):
        """The mismatched pairs of `batch` and the reference log-probs of its own responses and of
        the pairs': (kl_sequences, ref [B], ref_kl [B])."""
        if len(batch) < 2:
            raise ValueError(
                f"kto needs at least 2 examples per micro-batch for its KL estimate z0 (mean log-ratio of mismatched "
                f"prompt/response pairs); got {len(batch)} (dataset rows {batch.index.tolist()}). Raise train.batch_size "
                "so that batch_size / (processes x grad_accum) >= 2."
            )
        seq = batch.sequences
        kl_seq = batch.kl_sequences  # `loss` called without `prepare`: the collator's in-batch pairs
        if self._partner is not None:  # the fixed partners
            pairs = (self._mismatched(int(i)) for i in batch.index.tolist())  # collated as demonstrations: no in-batch pairs of their own
            kl_seq = self._collate([(0, Demonstration(m.prompt, m.response)) for m in pairs]).sequences.to(seq.input_ids.device)
        if self.config.reference == "cached" and "own" in self.cache:  # their reference log-probs cached
            return kl_seq, self.cache.lookup("own", batch.index), self.cache.lookup("kl", batch.index)
        both = reference_logprobs(reference, concat(seq, kl_seq), self.config.average_logprobs)  # one forward
        return kl_seq, both[: len(batch)], both[len(batch) :]

    def _kl_logratios(self, policy, kl_seq, ref_kl) -> torch.Tensor:
        with torch.no_grad():
            return policy.sequence_logprobs(kl_seq, average=self.config.average_logprobs).float() - ref_kl

    def begin_step(self, batches, policy, reference) -> None:
        """z0 of the whole optimizer step: the mean log-ratio of the mismatched pairs of all its
        micro-batches (one forward each, no gradient) and processes, written into every batch for `loss`."""
        ratios = []
        for b in batches:
            kl_seq, ref, ref_kl = self._references(b, reference)
            ratios.append(self._kl_logratios(policy, kl_seq, ref_kl))
            b.extra[REFERENCE_LOGPS] = ref
        z0 = kto_kl_estimate(torch.cat(ratios))
        for b in batches:
            b.extra[REFERENCE_POINT] = z0

    def loss(self, batch, policy, reference=None) -> LossOutput:
        c = self.config
        seq = batch.sequences
        if REFERENCE_POINT in batch.extra:  # the step's, from `begin_step`
            z0, ref = batch.extra[REFERENCE_POINT], batch.extra[REFERENCE_LOGPS]
        else:  # called on its own: this batch's estimate
            kl_seq, ref, ref_kl = self._references(batch, reference)
            z0 = kto_kl_estimate(self._kl_logratios(policy, kl_seq, ref_kl))
        logratios = policy.sequence_logprobs(seq, average=c.average_logprobs).float() - ref
        desirable = batch.desirable.bool()
        valid = response_tokens(seq) > 0
        losses = kto_loss(logratios, desirable, z0, c.beta, c.desirable_weight, c.undesirable_weight)
        return LossOutput(masked_mean(losses, valid), self.metrics(logratios.detach(), desirable, z0, valid))

    def metrics(self, logratios, desirable, z0, valid) -> dict[str, float]:
        """Implicit rewards beta*r per class (0 when a class is absent), accuracy, margin, KL."""
        beta, d, u = self.config.beta, desirable & valid, ~desirable & valid
        reward_d = masked_mean(beta * logratios, d).item()
        reward_u = masked_mean(beta * logratios, u).item()
        correct = torch.where(desirable, logratios > z0, logratios < z0).float()
        return {
            "reward_desirable": reward_d,
            "reward_undesirable": reward_u,
            "reward_margin": reward_d - reward_u if d.any() and u.any() else 0.0,
            "accuracy": masked_mean(correct, valid).item(),  # sign of r - z0 agrees with the label
            "kl": masked_mean(logratios, valid).item(),  # mean log-ratio of the batch's own responses
            "kl_estimate": z0.item(),  # z0, from the mismatched pairs
            "desirable_fraction": masked_mean(desirable.float(), valid).item(),
        }


@hookimpl
def register_objectives(register):
    register(KTO)
