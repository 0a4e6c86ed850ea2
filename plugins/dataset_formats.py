"""The standard row formats the `dataset` task reads, detected from the columns, and rows -> records.

The formats are TRL's standard (plain-string) dataset formats, the ones users know; a format is
detected from the column names (after the task's `columns:` renaming), first match wins:

    format                       columns                                  kinds it gives
    conversation                 messages                                 demonstrations, prompts
    preference                   prompt, chosen, rejected [, margin]      pairs, demonstrations, unpaired, prompts
    implicit-prompt preference   chosen, rejected [, margin]              pairs, demonstrations, unpaired, prompts
    ranking (InstructGPT)        prompt, completions, ranking             rankings, pairs, demonstrations, prompts
    unpaired                     prompt, completion, label                unpaired, demonstrations, prompts
    rewarded                     prompt, completion, reward               rewarded, demonstrations, prompts
    prompt-completion            prompt, completion                       demonstrations, prompts
    language modelling           text                                     demonstrations (with an empty prompt)
    prompt-only                  prompt                                   prompts

Other columns are ignored (and listed in the read summary). Every format but language modelling
has a conversational variant, as in TRL: its texts are lists of `{role, content}` messages, read
into `Chat`s and rendered later with the tokenizer's chat template (`rlhfzoo.data.chat`); a
response is the assistant turn(s) (`[{"role": "assistant", ...}]`), an implicit prompt the turns
two conversations share. A `messages` conversation is split at its last assistant turn
(`assistant_turns="last"`: the prompt is every turn before it) or its first (`"all"`: the loss
then covers every assistant turn); one that ends in a user turn is a prompt only. All rows of a
source are of one variant; mixing them is a `DataError`.

Each row becomes a `Record` (prompt, response(s) and label fields). A row of the wrong shape -- a
missing or null field, a value of the wrong type -- is a `DataError` naming the source, the row
(1-based), the columns the row has and the formats accepted. Rows that cannot make a useful
example are skipped and counted in `ReadStats`, as the `hh-rlhf` task does: an empty text, a pair
whose two responses are identical, a prompt-less pair whose two texts share no prompt.

The shared prompt of a prompt-less pair: HH-style transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...")
are split at their last assistant turn, as `hh-rlhf` splits them (responses lose their surrounding
whitespace); other texts at the end of their longest common prefix, moved back to a word
boundary, so that prompt + response is exactly the original text (responses keep the whitespace
before their first word).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhfzoo.data.jsonl import DataError
from rlhfzoo.interfaces import Chat, Text
from rlhfzoo.plugins.hh_format import ASSISTANT, split_dialogue, truncate_prompt, truncate_response

__all__ = [
    "STANDARD_COLUMNS",
    "FORMATS",
    "ACCEPTED_FORMATS",
    "Format",
    "Record",
    "ReadStats",
    "rename_columns",
    "detect_format",
    "parse_rows",
    "shared_prompt",
    "split_conversation",
    "ASSISTANT_TURNS",
]

STANDARD_COLUMNS = (
    "text", "messages", "prompt", "completion", "chosen", "rejected", "margin", "label", "reward", "completions", "ranking",
)
PAIR_KINDS = ("pairs", "demonstrations", "unpaired", "prompts")


@dataclass(frozen=True)
class Format:
    """A standard row format: the columns that identify it, the optional ones it reads, the kinds it gives."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    kinds: tuple[str, ...]

    @property
    def columns(self) -> str:
        return " + ".join(self.required) + "".join(f" [+ {c}]" for c in self.optional)


FORMATS: tuple[Format, ...] = (
    Format("conversation", ("messages",), (), ("demonstrations", "prompts")),
    Format("preference", ("prompt", "chosen", "rejected"), ("margin",), PAIR_KINDS),
    Format("implicit-prompt preference", ("chosen", "rejected"), ("margin",), PAIR_KINDS),
    Format("ranking", ("prompt", "completions", "ranking"), (), ("rankings", "pairs", "demonstrations", "prompts")),
    Format("unpaired", ("prompt", "completion", "label"), (), ("unpaired", "demonstrations", "prompts")),
    Format("rewarded", ("prompt", "completion", "reward"), (), ("rewarded", "demonstrations", "prompts")),
    Format("prompt-completion", ("prompt", "completion"), (), ("demonstrations", "prompts")),
    Format("language modelling", ("text",), (), ("demonstrations",)),
    Format("prompt-only", ("prompt",), (), ("prompts",)),
)
ACCEPTED_FORMATS = (
    "; ".join(f"{f.name}: {f.columns}" for f in FORMATS)
    + " (texts: strings, or lists of {role, content} messages; label: true/false; margin, reward: numbers;"
    " completions: a list of texts, ranking: their ranks, 1 = best)"
)
ASSISTANT_TURNS = ("last", "all")


@dataclass(frozen=True)
class Record:
    """One usable row in standard fields: `response` is the completion, the text (with an empty
    prompt) or the chosen response (empty: a prompt-only row); `rejected`, `margin`, `label`,
    `reward` where the format has them; `ranked`: a ranking's (completion, rank) from best to worst
    (`response` its best, `rejected` its worst). Texts are strings, or `Chat`s for conversational rows."""

    prompt: Text
    response: Text = ""
    rejected: Text | None = None
    margin: float | None = None
    label: bool | None = None
    reward: float | None = None
    ranked: tuple[tuple[Text, float], ...] | None = None

    @property
    def group(self) -> str:
        """What the held-out split keeps together: the prompt, or the text of a prompt-less row."""
        return self.prompt or self.response


@dataclass
class ReadStats:
    """What reading a source did: rows read, records kept, rows skipped (why, and the first few
    row numbers of each reason), texts truncated, columns ignored."""

    source: str
    format: str = ""
    conversational: bool | None = None  # set by the first row read
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    max_chars: int | None = None
    skipped_by_reason: Counter = field(default_factory=Counter)
    skipped_rows: dict[str, list[str]] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def skip(self, reason: str, where: str) -> None:
        self.skipped_by_reason[reason] += 1
        seen = self.skipped_rows.setdefault(reason, [])
        if len(seen) < 5:
            seen.append(where.removeprefix(f"{self.source}, "))  # the summary names the source once

    def summary(self) -> str:
        """One line for the log, e.g. "f.jsonl (preference): 10 rows -> 8 kept, 2 skipped (identical 2: row 3, row 7)"."""
        variant = {True: ", conversational", False: "", None: ""}[self.conversational]
        line = f"{self.source} ({self.format}{variant}): {self.rows} rows -> {self.kept} kept, {self.skipped} skipped"
        if self.skipped:
            line += " (" + "; ".join(
                f"{reason.replace('_', ' ')} {n}: {', '.join(self.skipped_rows[reason])}"
                for reason, n in sorted(self.skipped_by_reason.items())
            ) + ")"
        if self.truncated:
            line += f"; {self.truncated} texts truncated to {self.max_chars} chars"
        if self.ignored_columns:
            line += f"; ignored columns {', '.join(self.ignored_columns)}"
        return line


# --------------------------------------------------------------------------------------------
# Columns and formats
# --------------------------------------------------------------------------------------------


def rename_columns(rows: Any, mapping: Mapping[str, str], source: str) -> Any:
    """`rows` (a `datasets.Dataset`) with the user's columns renamed onto standard names."""
    if not mapping:
        return rows
    have = list(rows.column_names)
    missing = [c for c in mapping if c not in have]
    if missing:
        raise DataError(
            f"{source}: `columns` renames {', '.join(map(repr, missing))}, which the data does not have; "
            f"its columns are: {', '.join(map(repr, have))}. Fix the names in `columns`.",
            source,
        )
    clash = [new for old, new in mapping.items() if new in have and new not in mapping and new != old]
    if clash:
        raise DataError(
            f"{source}: `columns` renames a column onto {', '.join(map(repr, clash))}, which the data already has; "
            "rename that column too (e.g. onto an unused name) or drop it from the mapping.",
            source,
        )
    return rows.rename_columns({old: new for old, new in mapping.items() if old != new})


def detect_format(columns: list[str], source: str) -> Format:
    """The first of `FORMATS` whose columns are all present; raises `DataError` when none is."""
    for fmt in FORMATS:
        if all(c in columns for c in fmt.required):
            return fmt
    raise DataError(
        f"{source}: cannot detect the data format from the columns {', '.join(map(repr, columns)) or '(none)'}. "
        f"Accepted formats: {ACCEPTED_FORMATS}. Map other column names onto these with the task option "
        "`columns`, e.g. columns: {question: prompt, answer: completion}.",
        source,
    )


# --------------------------------------------------------------------------------------------
# Rows -> records
# --------------------------------------------------------------------------------------------


def shared_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text] | None:
    """(prompt, chosen response, rejected response) of two texts that share a prompt, or None
    when they share none (see the module docstring). Conversations share their common first turns."""
    if isinstance(chosen, Chat):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen.turns[k] == rejected.turns[k]:
            k += 1
        split = (Chat(chosen.turns[:k]), Chat(chosen.turns[k:]), Chat(rejected.turns[k:]))
        return split if k > 0 else None
    if ASSISTANT in chosen and ASSISTANT in rejected:
        c, r = split_dialogue(chosen), split_dialogue(rejected)
        return (c[0], c[1], r[1]) if c[0] == r[0] else None
    i = len(os.path.commonprefix([chosen, rejected]))
    while i > 0 and not chosen[i - 1].isspace():  # back to the start of the word they differ in
        i -= 1
    while i > 0 and chosen[i - 1].isspace():  # the whitespace before it goes with the responses
        i -= 1
    return (chosen[:i], chosen[i:], rejected[i:]) if i > 0 else None


def split_conversation(chat: Chat, assistant_turns: str = "last") -> tuple[Chat, Chat]:
    """(prompt, response) of a `messages` conversation: split before its last assistant turn
    (`"last"`) or its first (`"all"`); one that does not end in an assistant turn (or has no other turn) is a prompt only."""
    starts = [k for k, (role, _) in enumerate(chat.turns) if role == "assistant" and k > 0]
    if not starts or chat.turns[-1][0] != "assistant":
        return chat, Chat()
    k = starts[-1] if assistant_turns == "last" else starts[0]
    return Chat(chat.turns[:k]), Chat(chat.turns[k:])


def blank(text: Text) -> bool:
    """An empty text, or a conversation without turns or with only empty contents."""
    if isinstance(text, Chat):
        return not any(content.strip() for _, content in text.turns)
    return not text.strip()


class _Row:
    """One raw row being checked, with what an error message about it needs."""

    def __init__(self, values: dict[str, Any], where: str, source: str, fmt: Format):
        self.values, self.where, self.source, self.fmt = values, where, source, fmt
        self.conversational: bool | None = None  # the variant of the row's texts, set by the first read

    def error(self, problem: str) -> DataError:
        has = [k for k, v in self.values.items() if v is not None]
        return DataError(
            f"{self.where}: {problem}. The row has the columns {', '.join(map(repr, has)) or '(none)'} and was read "
            f"as {self.fmt.name} ({self.fmt.columns}). Accepted formats: {ACCEPTED_FORMATS}. Fix or delete the row.",
            self.source,
        )

    def text(self, name: str, value: Any = None) -> Text:
        """A string, or the `Chat` of a list of messages (field `name`, or `value` as that field);
        every text of a row is of one variant."""
        value = self.values.get(name) if value is None else value
        if value is None:
            raise self.error(f"field {name!r} is missing or null")
        if not isinstance(value, (str, list)):
            raise self.error(f"field {name!r} must be a string or a list of messages, not {type(value).__name__} {value!r:.40}")
        conversational = isinstance(value, list)
        if self.conversational is not None and conversational != self.conversational:
            raise self.error(f"field {name!r} is {'a list of messages' if conversational else 'a string'}, unlike the row's other texts; give all of them in one variant")
        self.conversational = conversational
        return self.chat(name, value) if conversational else value

    def chat(self, name: str, messages: list) -> Chat:
        for k, m in enumerate(messages):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise self.error(
                    f"message {k + 1} of field {name!r} must be an object with string 'role' and 'content' "
                    f"(text only), not {m!r:.60}"
                )
        return Chat.of(messages)

    def texts(self, name: str) -> list[Text]:
        """A list of texts (strings, or lists of messages), of the row's one variant."""
        values = self.values.get(name)
        if not isinstance(values, list) or not values:
            raise self.error(f"field {name!r} must be a non-empty list of texts, not {type(values).__name__} {values!r:.40}")
        return [self.text(f"{name}[{k}]", value) for k, value in enumerate(values)]

    def numbers(self, name: str, n: int) -> list[float]:
        values = self.values.get(name)
        if not isinstance(values, list) or len(values) != n:
            raise self.error(f"field {name!r} must be a list of {n} numbers, one per completion, not {values!r:.40}")
        return [self.number(f"{name}[{k}]", value=v) for k, v in enumerate(values)]

    def number(self, name: str, required: bool = True, value: Any = None) -> float | None:
        value = self.values.get(name) if value is None else value
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(f"field {name!r} must be a finite number, not {type(value).__name__} {value!r:.40}")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self.values.get(name)
        if not isinstance(value, bool):
            raise self.error(f"field {name!r} must be true or false, not {type(value).__name__} {value!r:.40}")
        return value


def _cut_prompt(text: Text, cut: int | None) -> tuple[Text, int]:
    """`max_chars` applies to plain texts; conversations are cut in tokens (`max_length`) only."""
    return (text, 0) if isinstance(text, Chat) else truncate_prompt(text, cut)


def _cut_response(text: Text, cut: int | None) -> tuple[Text, int]:
    return (text, 0) if isinstance(text, Chat) else truncate_response(text, cut)


def _record(row: _Row, stats: ReadStats, assistant_turns: str) -> Record | None:
    """The record of one checked row, or None (and a counted skip) when it cannot make an example."""
    fmt, cut = row.fmt, stats.max_chars
    if "chosen" in fmt.required:
        chosen, rejected = row.text("chosen"), row.text("rejected")
        margin = row.number("margin", required=False) if "margin" in row.values else None
        if "prompt" in fmt.required:
            prompt = row.text("prompt")
        elif chosen == rejected:
            stats.skip("identical", row.where)
            return None
        else:
            split = shared_prompt(chosen, rejected)
            if split is None:
                stats.skip("no_shared_prompt", row.where)
                return None
            prompt, chosen, rejected = split
        if blank(prompt) or blank(chosen) or blank(rejected):
            stats.skip("empty_text", row.where)
            return None
        if chosen == rejected:
            stats.skip("identical", row.where)
            return None
        (prompt, a), (chosen, b) = _cut_prompt(prompt, cut), _cut_response(chosen, cut)
        rejected, c = _cut_response(rejected, cut)
        stats.truncated += a + b + c
        if chosen == rejected:  # they differed only beyond the cut
            stats.skip("identical", row.where)
            return None
        return Record(prompt, chosen, rejected=rejected, margin=margin)

    if "ranking" in fmt.required:
        prompt, completions = row.text("prompt"), row.texts("completions")
        ranks = row.numbers("ranking", len(completions))
        if blank(prompt) or any(blank(c) for c in completions):
            stats.skip("empty_text", row.where)
            return None
        ranked = tuple(sorted(dict(zip(completions, ranks)).items(), key=lambda cr: cr[1]))  # a repeated text counts once
        if len(ranked) < 2 or ranked[0][1] == ranked[-1][1]:
            stats.skip("no_ranking", row.where)
            return None
        return Record(prompt, ranked[0][0], rejected=ranked[-1][0], ranked=ranked)

    if fmt.required == ("messages",):
        value = row.values.get("messages")
        if not isinstance(value, list):
            raise row.error(f"field 'messages' must be a list of {{role, content}} messages, not {type(value).__name__} {value!r:.40}")
        row.conversational = True
        chat = row.chat("messages", value)
        if blank(chat):
            stats.skip("empty_text", row.where)
            return None
        prompt, response = split_conversation(chat, assistant_turns)
        return Record(prompt, response)

    if fmt.required == ("text",):
        text = row.text("text")
        if isinstance(text, Chat):
            raise row.error("field 'text' is a list of messages; name that column 'messages' (the conversational variant)")
        if not text.strip():
            stats.skip("empty_text", row.where)
            return None
        text, a = truncate_response(text, cut)
        stats.truncated += a
        return Record("", text)

    prompt = row.text("prompt")
    response = row.text("completion") if "completion" in fmt.required else ""
    if blank(prompt) or ("completion" in fmt.required and blank(response)):
        stats.skip("empty_text", row.where)
        return None
    (prompt, a), (response, b) = _cut_prompt(prompt, cut), _cut_response(response, cut)
    stats.truncated += a + b
    label = row.flag("label") if "label" in fmt.required else None
    reward = row.number("reward") if "reward" in fmt.required else None
    return Record(prompt, response, label=label, reward=reward)


def parse_rows(
    rows: Any, indices: list[int], fmt: Format, source: str, stats: ReadStats, assistant_turns: str = "last"
) -> Iterator[tuple[int, Record]]:
    """(index, record) for each of `rows[indices]` that makes one, in the order of `indices`;
    rows that make none are counted in `stats`. Raises `DataError` at the first malformed row, or
    at the first row of another variant (plain strings / messages) than the rows before it."""
    used = set(fmt.required) | set(fmt.optional)
    stats.ignored_columns = sorted(set(stats.ignored_columns) | (set(rows.column_names) - used))
    for i, values in zip(indices, rows.select(indices)):
        stats.rows += 1
        row = _Row(dict(values), f"{source}, row {i + 1}", source, fmt)
        record = _record(row, stats, assistant_turns)
        if row.conversational is not None:
            if stats.conversational is not None and row.conversational != stats.conversational:
                variant = "conversational (lists of messages)" if row.conversational else "standard (plain strings)"
                raise row.error(f"the row is {variant}, unlike the rows read before it; give every row in one variant")
            stats.conversational = row.conversational
        if record is not None:
            stats.kept += 1
            yield i, record
