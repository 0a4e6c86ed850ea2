"""SLiC-HF: a rank-calibration hinge loss on sequence log-likelihoods plus a regulariser.

    L = max(0, delta - log pi(y_w|x) + log pi(y_l|x)) - lambda * log pi(y_w|x)

Eq. (1) of Zhao et al. 2023, arXiv:2305.10425, with the chosen response as the regularisation
target (their "SLiC-HF-direct" with the SFT-target variant of the cross-entropy term).
"""

import torch
from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import LossOutput, Objective, PluginConfig


def slic_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, delta: float = 1.0, reg_weight: float = 0.1) -> torch.Tensor:
    """Per-example SLiC-HF loss from summed sequence log-probs [B]."""
    hinge = torch.clamp(delta - chosen_logps + rejected_logps, min=0.0)
    return hinge - reg_weight * chosen_logps


class SlicConfig(PluginConfig):
    delta: float = Field(1.0, gt=0, description="Margin of the hinge on the log-likelihood difference.")
    reg_weight: float = Field(0.1, ge=0, description="Weight lambda of the NLL regulariser on the chosen response.")
    length_normalize: bool = Field(True, description="Use per-token mean log-probs (the paper uses sums on long texts).")


class SlicHF(Objective):
    name = "slic-hf"
    aliases = ("slic",)
    summary = "SLiC-HF: hinge loss calibrating sequence likelihoods on preference pairs (third-party example)."
    paper = "Zhao et al. 2023, arXiv:2305.10425"
    status = "experimental"
    data_kind = "pairs"
    Config = SlicConfig

    def loss(self, batch, policy, reference=None) -> LossOutput:
        avg = self.config.length_normalize
        chosen = policy.sequence_logprobs(batch.sequences, average=avg)
        rejected = policy.sequence_logprobs(batch.rejected, average=avg)
        losses = slic_loss(chosen, rejected, self.config.delta, self.config.reg_weight)
        accuracy = (chosen > rejected).float().mean().item()
        return LossOutput(losses.mean(), {"accuracy": accuracy, "margin": (chosen - rejected).mean().item()})


@hookimpl
def register_objectives(register):
    register(SlicHF)
