"""Anthropic HH-RLHF preference data: parsing and loading (the `hh-rlhf` task parses its rows here).

HH-RLHF (Bai et al. 2022, arXiv:2204.05862) stores each comparison as two full dialogues,

    {"chosen":   "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: Joke?\\n\\nAssistant: Why did ...",
     "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: Joke?\\n\\nAssistant: No."}

that share every turn but the last assistant one. `parse_pairs` splits each row into the shared
prompt (everything up to and including the last "\\n\\nAssistant:") and the two final responses
(without the leading space). It also reads the common `prompt` / `chosen` / `rejected` column
layout (responses alone, or full dialogues that start with the prompt) and chat-style rows whose
values are lists of `{"role": ..., "content": ...}` messages.

Rows that cannot make a useful pair are skipped and counted, never fatal: the two dialogues'
prompts differ, the two responses are the same, a response is empty, or there is no assistant
turn. Over-long texts are cut to `max_chars` (prompts lose their oldest turns first) and counted.
Malformed *files* (bad JSON, bad encoding, missing fields) raise `DataError`.

`load_hh_pairs` reads a local `.jsonl` / `.jsonl.gz` file or a Hugging Face hub dataset
(`open_rows`, which the `hh-rlhf` task reads through too).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhfzoo.data.jsonl import DataError, check_fields, read_jsonl
from rlhfzoo.interfaces import PreferencePair

__all__ = [
    "HUMAN",
    "ASSISTANT",
    "HHStats",
    "split_dialogue",
    "normalise_prompt",
    "messages_to_text",
    "truncate_prompt",
    "truncate_response",
    "parse_pairs",
    "load_hh_pairs",
    "open_rows",
    "iter_hub_rows",
]

logger = logging.getLogger(__name__)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

# Why a row was skipped -> the HHStats counter it increments.
SKIP_REASONS = ("prefix_mismatch", "identical", "empty_response", "no_assistant_turn")
_MAX_EXAMPLE_ROWS = 5  # row numbers remembered per skip reason, for the summary


@dataclass
class HHStats:
    """What `parse_pairs` did with a source: rows read, pairs kept, rows skipped and why.

    `skipped_rows` maps each skip reason to the first few row (line) numbers it hit, so that a
    user can look at them; `truncated` counts texts (prompts or responses) cut to `max_chars`.
    """

    source: str
    rows: int = 0
    pairs: int = 0
    skipped_prefix_mismatch: int = 0
    skipped_identical: int = 0
    skipped_empty_response: int = 0
    skipped_no_assistant_turn: int = 0
    truncated: int = 0
    max_chars: int | None = None
    layouts: dict[str, int] = field(default_factory=dict)
    ignored_fields: list[str] = field(default_factory=list)
    skipped_rows: dict[str, list[int]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        """Rows that did not become a pair, for any reason."""
        return sum(getattr(self, f"skipped_{r}") for r in SKIP_REASONS)

    def _skip(self, reason: str, row: int) -> None:
        setattr(self, f"skipped_{reason}", getattr(self, f"skipped_{reason}") + 1)
        seen = self.skipped_rows.setdefault(reason, [])
        if len(seen) < _MAX_EXAMPLE_ROWS:
            seen.append(row)

    def as_dict(self) -> dict[str, Any]:
        """Plain-data copy (JSON-friendly), including the total `skipped`."""
        return {**asdict(self), "skipped": self.skipped}

    def summary(self) -> str:
        """One line for the log, e.g. "f.jsonl: 10 rows -> 8 pairs, 2 skipped (prefix mismatch 1, ...)"."""
        reasons = ", ".join(f"{r.replace('_', ' ')} {getattr(self, f'skipped_{r}')}" for r in SKIP_REASONS)
        line = f"{self.source}: {self.rows} rows -> {self.pairs} pairs, {self.skipped} skipped ({reasons})"
        if self.truncated:
            line += f"; {self.truncated} texts truncated to {self.max_chars} chars"
        if self.ignored_fields:
            line += f"; ignored fields {', '.join(self.ignored_fields)}"
        return line


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


def split_dialogue(text: str) -> tuple[str, str] | None:
    """Split an HH dialogue at its last assistant turn: `(prompt, response)`, or None if it has none.

    The prompt keeps the trailing "\\n\\nAssistant:"; the response loses surrounding whitespace.
    """
    i = text.rfind(ASSISTANT)
    if i < 0:
        return None
    cut = i + len(ASSISTANT)
    return text[:cut], text[cut:].strip()


def normalise_prompt(prompt: str) -> str:
    """Make a prompt end with "\\n\\nAssistant:" (the cue for the model's turn).

    A bare question ("What is 2+2?") becomes "\\n\\nHuman: What is 2+2?\\n\\nAssistant:"; a
    dialogue without the final cue gets it appended; a dialogue starting "Human:" gets the
    leading blank line HH dialogues have.
    """
    p = prompt.rstrip()
    if p.startswith(HUMAN.lstrip()):
        p = "\n\n" + p
    if not p.endswith(ASSISTANT):
        if HUMAN not in p:
            p = f"{HUMAN} {p.strip()}"
        p += ASSISTANT
    return p


_ROLES = {"user": HUMAN, "human": HUMAN, "assistant": ASSISTANT, "gpt": ASSISTANT, "system": "\n\nSystem:"}


def messages_to_text(messages: Sequence[Any], where: str = "row") -> str:
    """Render chat messages (`[{"role": "user", "content": "..."}, ...]`) as an HH dialogue."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise DataError(
                f"{where}: chat messages must look like {{\"role\": \"user\"|\"assistant\"|\"system\", "
                f"\"content\": \"...\"}}, but one is {m!r:.120}; fix the row."
            )
        out.append(f"{_ROLES[m['role']]} {m['content'].strip()}")
    return "".join(out)


def truncate_prompt(prompt: str, max_chars: int | None) -> tuple[str, bool]:
    """Keep at most `max_chars` of a prompt, dropping its *oldest* turns first.

    Whole leading turns are removed while the prompt is too long, so that it still starts at a
    turn boundary and ends with the assistant cue; if the last turn alone is too long, its start
    is cut. Returns `(text, was_truncated)`.
    """
    if max_chars is None or len(prompt) <= max_chars:
        return prompt, False
    start = 0
    while len(prompt) - start > max_chars:
        nxt = prompt.find(HUMAN, start + 1)
        if nxt < 0:
            break
        start = nxt
    return prompt[start:][-max_chars:], True


def truncate_response(response: str, max_chars: int | None) -> tuple[str, bool]:
    """Keep the first `max_chars` characters of a response. Returns `(text, was_truncated)`."""
    if max_chars is None or len(response) <= max_chars:
        return response, False
    return response[:max_chars].rstrip(), True


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _as_text(value: Any, where: str) -> Any:
    """Chat-message lists become HH text; anything else is returned for `check_fields` to judge."""
    if isinstance(value, list) and (not value or isinstance(value[0], dict)):
        return messages_to_text(value, where)
    return value


def _response_after(text: str, prompts: Sequence[str]) -> str:
    """The response part of a prompt-layout `chosen`/`rejected` value.

    That is the value itself, or what follows the prompt when the value is a full dialogue that
    starts with it, or what follows the assistant cue of a chat-style response rendered alone.
    """
    for prefix in (*prompts, ASSISTANT):
        if prefix and text.startswith(prefix):
            return text[len(prefix) :].strip()
    return text.strip()


def parse_pairs(
    rows: Iterable[tuple[int, dict[str, Any]]],
    source: str,
    *,
    max_chars: int | None = None,
    unit: str = "line",
    allow_extra_fields: bool = True,
) -> tuple[list[PreferencePair], HHStats]:
    """Turn raw rows (`(row_number, dict)`, e.g. from `read_jsonl`) into `PreferencePair`s.

    Each row is either an HH dialogue pair (`chosen`, `rejected`) or a prompt-layout row
    (`prompt`, `chosen`, `rejected`); see the module docstring. `unit` ("line" or "row") names
    row numbers in messages. Other fields are ignored (and listed in the stats) unless
    `allow_extra_fields` is false, in which case they are an error. Returns the pairs in file order
    and an `HHStats`; raises `DataError` for malformed rows and when no row made a pair.
    """
    stats = HHStats(source=source, max_chars=max_chars)
    layouts: Counter[str] = Counter()
    ignored: set[str] = set()
    pairs: list[PreferencePair] = []
    for n, raw in rows:
        stats.rows += 1
        where = f"{source}, {unit} {n}"
        layout = "prompt" if "prompt" in raw else "dialogue"
        layouts[layout] += 1
        required = ("prompt", "chosen", "rejected") if layout == "prompt" else ("chosen", "rejected")
        row = {k: (_as_text(v, where) if k in required else v) for k, v in raw.items()}
        check_fields(row, required, allow_extra=allow_extra_fields, where=where, line=n, source=source)
        ignored.update(k for k in row if k not in required)

        if layout == "prompt":
            raw_prompt = row["prompt"]
            prompt = normalise_prompt(raw_prompt)
            chosen = _response_after(row["chosen"], (raw_prompt, prompt))
            rejected = _response_after(row["rejected"], (raw_prompt, prompt))
            if ASSISTANT in chosen or ASSISTANT in rejected:  # a dialogue that does not start with the prompt
                stats._skip("prefix_mismatch", n)
                continue
        else:
            c, r = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
            if c is None or r is None:
                stats._skip("no_assistant_turn", n)
                continue
            (prompt, chosen), (prompt_r, rejected) = c, r
            if prompt != prompt_r:
                stats._skip("prefix_mismatch", n)
                continue
        if not chosen or not rejected:
            stats._skip("empty_response", n)
            continue
        if chosen == rejected:
            stats._skip("identical", n)
            continue

        prompt, cut_p = truncate_prompt(prompt, max_chars)
        chosen, cut_c = truncate_response(chosen, max_chars)
        rejected, cut_r = truncate_response(rejected, max_chars)
        stats.truncated += cut_p + cut_c + cut_r
        if chosen == rejected:  # they differed only beyond the cut
            stats._skip("identical", n)
            continue
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected))

    stats.pairs = len(pairs)
    stats.layouts = dict(layouts)
    stats.ignored_fields = sorted(ignored)
    if not pairs:
        raise DataError(
            f"{source}: no usable preference pairs ({stats.summary()}). Expected rows with HH "
            "dialogues in 'chosen' and 'rejected' (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"), or "
            "'prompt', 'chosen' and 'rejected' columns.",
            source,
        )
    return pairs, stats


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def iter_hub_rows(dataset: str, split: str = "train", data_dir: str | None = None) -> Iterator[tuple[int, dict]]:
    """Rows `(1-based index, dict)` of a Hugging Face hub dataset, via `datasets.load_dataset`.

    Raises `DataError` saying the dataset could not be reached (with the cause) when loading fails,
    e.g. on a machine without network access.
    """
    try:
        import datasets

        kwargs = {"data_dir": data_dir} if data_dir else {}
        ds = datasets.load_dataset(dataset, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, bad split: all need the same advice
        sub = f", data_dir {data_dir!r}" if data_dir else ""
        raise DataError(
            f"could not reach or load the dataset {dataset!r} (split {split!r}{sub}) from the Hugging "
            f"Face hub: {type(e).__name__}: {e}. Check the id and split; without network access, "
            "download the data elsewhere and pass a local .jsonl / .jsonl.gz file instead (task option "
            "`path`, or the RLHFZOO_HH_PATH environment variable).",
            dataset,
        ) from e
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def open_rows(
    path: str | Path | None = None, *, dataset: str | None = None, split: str = "train", data_dir: str | None = None
) -> tuple[str, Iterable[tuple[int, dict[str, Any]]], str]:
    """The rows of a local JSONL file (`path`) or a hub `dataset` id, not read yet:
    `(source label, rows, unit)`, what `parse_pairs` takes (`unit`: "line" or "row").

    Exactly one of `path` and `dataset` must be given; `split` and `data_dir` apply to the hub only.
    """
    if (path is None) == (dataset is None):
        raise ValueError("pass exactly one of `path` (a local .jsonl/.jsonl.gz file) and `dataset` (a hub id)")
    if path is not None:
        return str(path), read_jsonl(path), "line"
    label = f"{dataset}[{split}]" + (f" ({data_dir})" if data_dir else "")
    return label, iter_hub_rows(dataset, split, data_dir), "row"


def load_hh_pairs(
    path: str | Path | None = None,
    *,
    dataset: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    max_chars: int | None = None,
) -> tuple[list[PreferencePair], HHStats]:
    """Read and parse HH-style pairs from a local JSONL file (`path`) or a hub `dataset` id.

    Exactly one of `path` and `dataset` must be given; `split` and `data_dir` apply to the hub
    only. Logs the one-line `HHStats.summary()` (a warning when rows were skipped, e.g. identical
    pairs) and returns `(pairs, stats)`.
    """
    source, rows, unit = open_rows(path, dataset=dataset, split=split, data_dir=data_dir)
    pairs, stats = parse_pairs(rows, source, max_chars=max_chars, unit=unit)
    # Skipped rows change what a run trains on: a warning, which is printed even where no logging is set up.
    logger.log(logging.WARNING if stats.skipped else logging.INFO, "HH-RLHF %s", stats.summary())
    return pairs, stats
