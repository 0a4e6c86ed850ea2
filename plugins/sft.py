"""Supervised fine-tuning: negative log-likelihood of the response tokens, prompt masked.

    L = - (1 / |y|) sum_t log pi(y_t | x, y_<t)        (token mean over the micro-batch)

The first stage of the RLHF pipeline (InstructGPT, arXiv:2203.02155, Sec. 3.5) and the
objective a critique judge is trained with.
"""

from pydantic import Field

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import LossOutput, Objective, PluginConfig


class SFTConfig(PluginConfig):
    examples: str = Field(
        "demonstrations",
        description="Which of the task's example kinds to imitate: `demonstrations`, or e.g. `critiques` to train a judge.",
    )


class SFT(Objective):
    name = "sft"
    summary = "Supervised fine-tuning: NLL on response tokens, prompt tokens masked."
    paper = "Ouyang et al. 2022, arXiv:2203.02155"
    data_kind = "demonstrations"
    benchmark = False  # the baseline every benchmark row starts from
    Config = SFTConfig

    def example_kind(self) -> str:
        return self.config.examples

    def loss(self, batch, policy, reference=None) -> LossOutput:
        seq = batch.sequences
        logprobs = policy.logprobs(seq.input_ids, seq.attention_mask)
        mask = seq.response_mask[:, 1:].to(logprobs.dtype)
        n_tokens = mask.sum().clamp(min=1)
        nll = -(logprobs * mask).sum() / n_tokens
        return LossOutput(nll, {"nll": nll.item(), "response_tokens": n_tokens.item() / len(seq)})


@hookimpl
def register_objectives(register):
    register(SFT)
