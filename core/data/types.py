"""What flows between plugins: examples (text records a Task hands out), batches (token tensors
the collators build for an Objective's loss), rollouts (what a Policy generated) and loss outputs.

Plain dataclasses with no behaviour beyond moving tensors between devices; `rlhfzoo.interfaces`
re-exports them beside the interfaces that use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# --------------------------------------------------------------------------------------------
# Examples: what a Task hands out, one record per row. Text only; tokenisation happens later.
# --------------------------------------------------------------------------------------------

DataKind = Literal["demonstrations", "pairs", "unpaired", "rewarded", "prompts"]
DATA_KINDS: tuple[str, ...] = ("demonstrations", "pairs", "unpaired", "rewarded", "prompts")


@dataclass(frozen=True)
class Demonstration:
    """A prompt and a good response, for supervised fine-tuning."""

    prompt: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

    `margin` is an optional Llama-2-style preference strength label ("significantly",
    "slightly", "negligibly" better, stored as a number by the task) and `group` ties together
    the pairs expanded from one K-wise ranking, so that a prompt can be made to count once.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    group: int | None = None


@dataclass(frozen=True)
class UnpairedExample:
    """A single response labelled desirable or undesirable (KTO)."""

    prompt: str
    response: str
    desirable: bool


@dataclass(frozen=True)
class RewardedExample:
    """A (prompt, response, reward) triple for offline RL."""

    prompt: str
    response: str
    reward: float


# --------------------------------------------------------------------------------------------
# Batches: token tensors, built by the collators in `rlhfzoo.data`.
# --------------------------------------------------------------------------------------------


@dataclass
class SequenceBatch:
    """Prompt + response token sequences, right-padded.

    input_ids, attention_mask: [B, T]
    response_mask: [B, T], 1 on response tokens (the ones a loss is taken over), 0 on prompt
        and padding tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask)))


@dataclass
class Batch:
    """What an Objective's `loss` receives.

    `sequences` is always set. The other fields depend on the data kind:
      pairs:    `rejected` (same layout as `sequences`, which hold the chosen responses), `margin`
      unpaired: `desirable` [B] bool, `kl_sequences` (mismatched prompt/response pairs, for KTO)
      rewarded: `rewards` [B]
    `index` holds the dataset row of every example (to name rows in error messages and to look
    up cached reference log-probs), `extra` anything an objective precomputed.
    """

    sequences: SequenceBatch
    index: torch.Tensor
    rejected: SequenceBatch | None = None
    margin: torch.Tensor | None = None
    desirable: torch.Tensor | None = None
    kl_sequences: SequenceBatch | None = None
    rewards: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    def to(self, device: torch.device | str) -> "Batch":
        def move(x):
            return x.to(device) if isinstance(x, (torch.Tensor, SequenceBatch)) else x

        return Batch(
            sequences=self.sequences.to(device),
            index=self.index.to(device),
            rejected=move(self.rejected),
            margin=move(self.margin),
            desirable=move(self.desirable),
            kl_sequences=move(self.kl_sequences),
            rewards=move(self.rewards),
            extra={k: move(v) for k, v in self.extra.items()},
        )


@dataclass
class Rollout:
    """What `Policy.generate` returns.

    sequences: [B, P + R] left-padded prompts followed by the generated tokens (right-padded).
    attention_mask: [B, P + R] 1 on real tokens.
    response_mask: [B, P + R] 1 on generated tokens up to and including EOS.
    logprobs: [B, P + R - 1] log-probs of token t+1 given the prefix up to t under the sampling
        distribution (0 outside the response), aligned like `Policy.logprobs`.
    prompts, responses: the texts.
    finished: [B] bool, whether the response ended with EOS (not cut at max length).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompts: list[str]
    responses: list[str]
    finished: torch.Tensor


@dataclass
class LossOutput:
    """A scalar loss to minimise and the metrics to log (plain floats)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
