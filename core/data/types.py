"""What flows between plugins: examples (text records a Task hands out), batches (token tensors
the collators build for an Objective's loss), rollouts (what a Policy generated) and loss outputs.

Plain dataclasses with no behaviour beyond moving tensors between devices; `rlhfzoo.interfaces`
re-exports them beside the interfaces that use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

# --------------------------------------------------------------------------------------------
# Examples: what a Task hands out, one record per row. Text only; tokenisation happens later.
# --------------------------------------------------------------------------------------------

DataKind = Literal["demonstrations", "pairs", "unpaired", "rewarded", "prompts"]
DATA_KINDS: tuple[str, ...] = ("demonstrations", "pairs", "unpaired", "rewarded", "prompts")


@dataclass(frozen=True)
class Chat:
    """A conversation: (role, content) turns, the conversational variant of a prompt or response.

    A prompt `Chat` holds the turns before the response (system and user turns, earlier assistant
    turns); a response `Chat` the assistant turn(s) it answers with. Chats are rendered to tokens
    with the tokenizer's own chat template (`rlhfzoo.data.chat`), never flattened to text; `str()`
    gives a readable form for logs and text-based rewards.
    """

    turns: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, messages: Iterable[Mapping[str, str]]) -> "Chat":
        """From `[{"role": ..., "content": ...}, ...]`, the form `apply_chat_template` takes."""
        return cls(tuple((m["role"], m["content"]) for m in messages))

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.turns]

    def __add__(self, other: "Chat") -> "Chat":
        return Chat(self.turns + other.turns)

    def __len__(self) -> int:
        return len(self.turns)

    def __str__(self) -> str:
        return "\n".join(f"{role}: {content}" for role, content in self.turns)


# A prompt or response: plain text (standard formats) or a conversation (conversational formats).
Text = Union[str, Chat]


@dataclass(frozen=True)
class Demonstration:
    """A prompt and a good response, for supervised fine-tuning."""

    prompt: Text
    response: Text


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

    `margin` is an optional Llama-2-style preference strength label ("significantly",
    "slightly", "negligibly" better, stored as a number by the task) and `group` ties together
    the pairs expanded from one K-wise ranking, so that a prompt can be made to count once.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    group: int | None = None


@dataclass(frozen=True)
class UnpairedExample:
    """A single response labelled desirable or undesirable (KTO)."""

    prompt: Text
    response: Text
    desirable: bool


@dataclass(frozen=True)
class RewardedExample:
    """A (prompt, response, reward) triple for offline RL."""

    prompt: Text
    response: Text
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
        distribution (0 outside the response), aligned like `Policy.logprobs`. A policy may give
        a function instead of the tensor: it is then computed on first read (an objective that
        never reads it -- GRPO with one update per iteration -- saves a forward pass). Read it
        before the policy's next update.
    prompts: the prompts as given (text or `Chat`); responses: the generated texts.
    finished: [B] bool, whether the response ended with EOS (not cut at max length).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # or a function computing it: see the class docstring
    prompts: list[Text]
    responses: list[str]
    finished: torch.Tensor


def _rollout_logprobs(self: Rollout) -> torch.Tensor:
    if not isinstance(self._logprobs, torch.Tensor):
        self._logprobs = self._logprobs()
    return self._logprobs


def _set_rollout_logprobs(self: Rollout, value: torch.Tensor | Callable[[], torch.Tensor]) -> None:
    self._logprobs = value


Rollout.logprobs = property(_rollout_logprobs, _set_rollout_logprobs)  # a field computed on first read


@dataclass
class LossOutput:
    """A scalar loss to minimise and the metrics to log (plain floats)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
