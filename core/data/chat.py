"""Conversations -> token ids, with the tokenizer's own chat template.

What is trained is what inference sees: the prompt is
`tokenizer.apply_chat_template(prompt, add_generation_prompt=True)` -- exactly the ids a user
generates from -- and the full sequence is `apply_chat_template(prompt + response)`. Nothing is
added around them (the template writes its own BOS and end-of-turn tokens), and the loss mask
covers the tokens of the assistant's turns only:

    ids, mask = encode_chat(tok, Chat.of([{"role": "user", "content": "Hi"}]),
                                 Chat.of([{"role": "assistant", "content": "Hello!"}]))
    # ids  == tok.apply_chat_template(prompt + response, tokenize=True)["input_ids"]
    # mask == 0 on the prompt and the generation prompt, 1 on "Hello!" and what the template ends the turn with

A response of several turns (the `dataset` task's `assistant_turns: all`) is rendered one turn at
a time: each assistant turn's tokens are the difference between the conversation rendered up to
it with the generation prompt and rendered through it, and other turns (user, tool) get mask 0.
This needs a template whose renderings of a conversation's prefixes are prefixes of each other,
as the common ones are (ChatML, Llama 3, Mistral, Gemma); one that rewrites earlier turns is a
`ChatTemplateError` naming the turn.
"""

from __future__ import annotations

from typing import Any

from rlhfzoo.data.types import Chat
from rlhfzoo.errors import UserError

__all__ = ["ChatTemplateError", "has_chat_template", "require_chat_template", "render_ids", "chat_prompt_ids", "encode_chat"]

NO_TEMPLATE_FIX = (
    "Use a pretrained model whose tokenizer has a chat template (`policy.init: <model dir or hub id>`), "
    "set `policy.tokenizer` to such a tokenizer, set `tokenizer.chat_template` before training (Python API), "
    "or give the rows as plain strings (the standard formats)."
)


class ChatTemplateError(UserError):
    """Conversational data and a tokenizer that cannot render it as the model will see it."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, where: str = "the data") -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"{where} holds conversations (lists of {{role, content}} messages), but the tokenizer ({name}) has no "
            f"chat template to render them with. {NO_TEMPLATE_FIX}"
        )


def render_ids(tokenizer: Any, chat: Chat, add_generation_prompt: bool) -> list[int]:
    """`apply_chat_template(chat, tokenize=True)`'s token ids (no special tokens added beyond the template's)."""
    require_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(chat.messages(), tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True)
    return list(out["input_ids"])


def chat_prompt_ids(tokenizer: Any, prompt: Chat) -> list[int]:
    """The ids a model generates its answer from: the prompt with the template's generation prompt."""
    return render_ids(tokenizer, prompt, add_generation_prompt=True)


def encode_chat(tokenizer: Any, prompt: Chat, response: Chat | str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + response` rendered with the chat template, and the loss mask (1 on
    the assistant turns of `response`). A plain-text response is one assistant turn."""
    if isinstance(response, str):
        response = Chat((("assistant", response),))
    ids = render_ids(tokenizer, prompt, add_generation_prompt=True) if prompt else []
    mask = [0] * len(ids)
    done = prompt
    for k, (role, content) in enumerate(response.turns):
        if k > 0:  # the prefix this turn continues (the prompt's generation prompt for the first)
            before = render_ids(tokenizer, done, add_generation_prompt=role == "assistant")
            _check_prefix(tokenizer, ids, before, done, k)
            mask += [0] * (len(before) - len(ids))
            ids = before
        done = done + Chat(((role, content),))
        after = render_ids(tokenizer, done, add_generation_prompt=False)
        _check_prefix(tokenizer, ids, after, done, k)
        mask += [int(role == "assistant")] * (len(after) - len(ids))
        ids = after
    return ids, mask


def _check_prefix(tokenizer: Any, prefix: list[int], ids: list[int], chat: Chat, turn: int) -> None:
    if ids[: len(prefix)] == prefix:
        return
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if turn == 0:
        problem = (
            "renders prompt + response so that it does not begin with the prompt rendered with its generation "
            "prompt (what inference generates from), so training would not see what inference sees"
        )
        fix = "Use a template whose generation prompt is how it opens an assistant turn."
    else:
        problem = (
            f"renders the conversation through response turn {turn + 1} so that it does not begin with the "
            "rendering of the turns before it (the template rewrites earlier turns), so the assistant's tokens "
            "cannot be told apart"
        )
        fix = "Use `assistant_turns: last` (the loss on the last assistant turn only), or a template that keeps earlier turns."
    raise ChatTemplateError(f"the chat template of {name} {problem} (at {str(chat)[-80:]!r}). {fix}")
