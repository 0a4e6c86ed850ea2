"""Text examples -> token batches.

A sequence of plain text is `[bos] prompt response [eos]`; `response_mask` marks the response
tokens and the EOS (what a policy is trained to produce). A conversation (`Chat` prompt and
response, the conversational formats) is rendered with the tokenizer's chat template instead,
exactly as inference renders it, the mask on the assistant's tokens (`rlhfzoo.data.chat`). Sequences are right-padded for training; prompts are
left-padded for generation (see `rlhfzoo.policy`). Over-long sequences are truncated -- the
prompt from the left first, then the response from the right -- and counted, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlhfzoo.data.chat import chat_prompt_ids, encode_chat
from rlhfzoo.interfaces import (
    Batch,
    Chat,
    Demonstration,
    PreferencePair,
    RewardedExample,
    SequenceBatch,
    Text,
    UnpairedExample,
)


@dataclass
class TruncationStats:
    sequences: int = 0
    truncated: int = 0


def prompt_ids(tokenizer: Any, prompt: Text) -> list[int]:
    """The ids a policy generates from: `[bos] prompt`, or a conversation with the chat template's generation prompt."""
    if isinstance(prompt, Chat):
        return chat_prompt_ids(tokenizer, prompt)
    return with_bos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"])


def with_bos(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """`[bos] ids`, or `ids` for a tokenizer without a BOS token."""
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def encode(
    tokenizer: Any, prompt: Text, response: Text, max_length: int, stats: TruncationStats | None = None,
    texts: tuple[list[int], list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of `[bos] prompt response [eos]` (a conversation: its chat-template rendering)
    and the matching response mask, cut to `max_length`: the prompt from the left after its first
    token, then the response from the right. `texts`: the plain prompt's and response's ids, where
    the caller has tokenised them already (`sequence_batch`, in one call per batch)."""
    if isinstance(prompt, Chat) or isinstance(response, Chat):
        ids, mask = encode_chat(tokenizer, prompt if isinstance(prompt, Chat) else Chat(), response)
        start = mask.index(1) if 1 in mask else len(mask)  # the prompt: everything before the first trained token
        p, r, r_mask = ids[:start], ids[start:], mask[start:]
    else:
        p_text, r_text = texts if texts is not None else (
            tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer(response, add_special_tokens=False)["input_ids"])
        p = with_bos(tokenizer, p_text)  # as `prompt_ids`
        r = list(r_text) + [tokenizer.eos_token_id]
        r_mask = [1] * len(r)
    if stats is not None:
        stats.sequences += 1
    if len(p) + len(r) > max_length:
        if stats is not None:
            stats.truncated += 1
        keep_prompt = max(1, min(len(p), max_length - len(r)))
        p = p[:1] + p[len(p) - keep_prompt + 1 :] if keep_prompt > 1 else p[:1]
        r, r_mask = r[: max_length - len(p)], r_mask[: max_length - len(p)]
    return p + r, [0] * len(p) + r_mask


def pad(rows: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """`rows` padded with `value` to the longest, on the right or the left, in one tensor call."""
    width = max(len(r) for r in rows)
    if side == "right":
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)
    return torch.tensor([[value] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)


def sequence_batch(tokenizer: Any, pairs: Sequence[tuple[Text, Text]], max_length: int, stats=None) -> SequenceBatch:
    """The pairs' `encode`d sequences, right-padded to the longest. Plain-text prompts and responses
    are tokenised in one call each per batch (a fast tokenizer's batch gives each text the ids it
    gives alone); conversations go through their chat template one by one."""
    plain = [i for i, (p, r) in enumerate(pairs) if not isinstance(p, Chat) and not isinstance(r, Chat)]
    texts: dict[int, tuple[list[int], list[int]]] = {}
    if plain:
        prompts = tokenizer([pairs[i][0] for i in plain], add_special_tokens=False)["input_ids"]
        responses = tokenizer([pairs[i][1] for i in plain], add_special_tokens=False)["input_ids"]
        texts = dict(zip(plain, zip(prompts, responses)))
    encoded = [encode(tokenizer, p, r, max_length, stats, texts.get(i)) for i, (p, r) in enumerate(pairs)]
    ids = pad([e[0] for e in encoded], tokenizer.pad_token_id)
    attn = pad([[1] * len(e[0]) for e in encoded], 0)
    resp = pad([e[1] for e in encoded], 0)
    return SequenceBatch(ids, attn, resp)


Encode = Callable[[Sequence[tuple[Text, Text]]], SequenceBatch]  # (prompt, response) texts or chats -> a SequenceBatch
BatchBuilder = Callable[[list[Any], Encode, torch.Tensor], Batch]
BUILDERS: dict[type, BatchBuilder] = {}


def batches(example_type: type) -> Callable[[BatchBuilder], BatchBuilder]:
    """Register the function that turns a list of `example_type` examples into a `Batch`; it
    receives the examples, `encode` (texts -> SequenceBatch, with this collator's tokenizer,
    length limit and truncation counts) and the examples' row indices. A plugin with its own
    example type registers its builder the same way."""

    def register(builder: BatchBuilder) -> BatchBuilder:
        BUILDERS[example_type] = builder
        return builder

    return register


@batches(Demonstration)
def demonstration_batch(examples: list[Demonstration], encode: Encode, index: torch.Tensor) -> Batch:
    return Batch(sequences=encode([(e.prompt, e.response) for e in examples]), index=index)


@batches(PreferencePair)
def preference_batch(examples: list[PreferencePair], encode: Encode, index: torch.Tensor) -> Batch:
    return Batch(
        sequences=encode([(e.prompt, e.chosen) for e in examples]),
        rejected=encode([(e.prompt, e.rejected) for e in examples]),
        margin=torch.tensor([e.margin if e.margin is not None else 0.0 for e in examples], dtype=torch.float32),
        index=index,
        extra={"group": torch.tensor([e.group if e.group is not None else -1 for e in examples])},
    )


@batches(UnpairedExample)
def unpaired_batch(examples: list[UnpairedExample], encode: Encode, index: torch.Tensor) -> Batch:
    n = len(examples)
    # Mismatched prompt/response pairs (prompt i with response i+1) estimate KL(pi||ref) in KTO.
    mismatched = [(examples[i].prompt, examples[(i + 1) % n].response) for i in range(n)]
    return Batch(
        sequences=encode([(e.prompt, e.response) for e in examples]),
        desirable=torch.tensor([e.desirable for e in examples], dtype=torch.bool),
        kl_sequences=encode(mismatched),
        index=index,
    )


@batches(RewardedExample)
def rewarded_batch(examples: list[RewardedExample], encode: Encode, index: torch.Tensor) -> Batch:
    return Batch(
        sequences=encode([(e.prompt, e.response) for e in examples]),
        rewards=torch.tensor([e.reward for e in examples], dtype=torch.float32),
        index=index,
    )


@dataclass
class Collator:
    """Turns a list of (row index, example) into a `Batch`, with the builder registered for the
    examples' type (`batches`)."""

    tokenizer: Any
    max_length: int = 128
    stats: TruncationStats = field(default_factory=TruncationStats)

    def encode(self, pairs: Sequence[tuple[Text, Text]]) -> SequenceBatch:
        return sequence_batch(self.tokenizer, pairs, self.max_length, self.stats)

    def __call__(self, rows: Sequence[tuple[int, Any]]) -> Batch:
        index = torch.tensor([i for i, _ in rows], dtype=torch.long)
        examples = [e for _, e in rows]
        kinds = {type(e) for e in examples}
        if len(kinds) != 1:
            raise TypeError(f"a batch mixes example types ({', '.join(sorted(k.__name__ for k in kinds))}); collate one type at a time")
        kind = kinds.pop()
        builder = BUILDERS.get(kind)
        if builder is None:
            raise TypeError(
                f"don't know how to collate {kind.__name__}: register a builder with "
                f"`@rlhfzoo.data.collate.batches({kind.__name__})` (known: {', '.join(t.__name__ for t in BUILDERS)})"
            )
        return builder(examples, self.encode, index)
