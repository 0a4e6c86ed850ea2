"""`rlhfzoo data`: a run's training examples exactly as the model sees them, and how many are cut.

The run config is read as `rlhfzoo train` reads it; the task hands out the examples of the kind
the algorithm trains on, and the policy's tokenizer and `max_length` collate them with the
trainer's `Collator`. Each sequence is decoded token run by token run, with the tokens the loss is
taken over (`response_mask` = 1) between `[[` and `]]`; special tokens (bos, eos) are shown as
their text. Prompts of online algorithms are shown as generation sees them (`prompt_ids`, cut
from the left to `max_length - max_new_tokens`). Then the counts: examples in the split, the
rows the task read, kept and skipped (where it tells), and the sequences longer than
`max_length`, among those shown and over the whole split.

Only the tokenizer is loaded: no model weights, except for a policy other than `hf`, which is
built to get its tokenizer. Nothing is built: a missing stage (e.g. `init: sft`) is an error
saying how to build it.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

from rlhfzoo import stages
from rlhfzoo.config import RunConfig
from rlhfzoo.data.collate import Collator, prompt_ids
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import DATA_KINDS, Batch, SequenceBatch, Task
from rlhfzoo.policy import INIT_FIX, HFPolicy, fit_to_context
from rlhfzoo.pretrained import load_error

SPLITS = ("train", "test")
OPEN, CLOSE = "[[", "]]"  # around the tokens the loss is taken over
CHUNK = 64  # examples collated at a time when counting the whole split
INDENT = "    "


class PreviewError(UserError):
    """`rlhfzoo data` cannot show what was asked (a split or kind the task does not have)."""


@dataclass
class Tokenization:
    """What turns the run's examples into tokens: the policy's tokenizer and its length limits."""

    tokenizer: Any
    max_length: int
    max_new_tokens: int
    source: str  # where the tokenizer comes from (a task, a directory, a policy), for the header


# ------------------------------------------------------------------------------------ tokenizer


def run_tokenization(cfg: RunConfig, task: Task) -> Tokenization:
    """The tokenizer the run's policy would use and its `max_length` (lowered to the model's
    context, as the policy does), loading no weights for an `hf` policy. A policy of another
    kind is built, and its own tokenizer and config read."""
    config = cfg.policy.config
    policy_cls = cfg.policy.entry.cls
    if policy_cls is not HFPolicy:
        policy = cfg.policy.create(task=task)
        pc = policy.config
        return Tokenization(
            policy.tokenizer, getattr(pc, "max_length", 128), getattr(pc, "max_new_tokens", 0), f"policy {cfg.policy.name!r}"
        )
    if config.init == "scratch":
        n_positions = config.n_positions or task.default_model_config().get("n_positions") or 128  # as build_scratch_model
        model_config: Any = SimpleNamespace(n_positions=n_positions)
    else:
        model_config = _model_config(str(stages.path("sft", task)) if config.init == "sft" else config.init)
    tokenizer, where = policy_cls.load_tokenizer(config, task)
    fitted = fit_to_context(config, model_config)
    return Tokenization(tokenizer, fitted.max_length, fitted.max_new_tokens, where)


def _model_config(path: str) -> Any:
    """The transformers config of the model at `path` (its context length), without its weights."""
    from transformers import AutoConfig

    from rlhfzoo import lora

    try:
        return AutoConfig.from_pretrained(lora.adapter_base(path) if lora.is_adapter_dir(path) else path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ... for bad files
        raise load_error("policy.init", path, "causal LM", e, INIT_FIX) from None


# ------------------------------------------------------------------------------------ rendering


def marked_text(tokenizer: Any, ids: Sequence[int], mask: Sequence[int]) -> str:
    """The decoded tokens, each maximal run with mask 1 between `[[` and `]]`; special tokens shown.

    Each run's text is what it adds to the decoded text of the tokens before it, so that the
    spaces a tokenizer puts between words (or a character split across byte tokens) come out as
    in the whole sequence's decoding."""

    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(list(part), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    parts, before, start = [], "", 0
    for masked, run in itertools.groupby(mask, key=bool):
        end = start + len(list(run))
        upto = decode(ids[:end])
        text = upto[len(before):] if upto.startswith(before) else decode(ids[start:end])
        parts.append(f"{OPEN}{text}{CLOSE}" if masked else text)
        before, start = upto, end
    return "".join(parts)


def indented(text: str) -> str:
    return "\n".join(INDENT + line for line in text.split("\n"))


def lengths(seq: SequenceBatch) -> list[int]:
    """Tokens of each (right-padded) sequence."""
    return [int(n) for n in seq.attention_mask.sum(-1)]


def sequence_block(label: str, tokenizer: Any, seq: SequenceBatch, i: int, full_length: int) -> str:
    n = int(seq.attention_mask[i].sum())
    cut = f", truncated from {full_length}" if full_length > n else ""
    ids, mask = seq.input_ids[i, :n].tolist(), seq.response_mask[i, :n].tolist()
    return f"{label} ({n} tokens{cut}):\n{indented(marked_text(tokenizer, ids, mask))}"


def example_block(batch: Batch, full: Batch, i: int, tokenizer: Any) -> str:
    """Example `i` of a collated batch: its sequence(s) and label; `full` is the same batch
    collated without a length limit (for the untruncated lengths)."""
    notes = []
    if batch.rejected is not None and batch.margin is not None:
        notes.append(f"margin {float(batch.margin[i]):g}")
    if batch.desirable is not None:
        notes.append("desirable" if bool(batch.desirable[i]) else "undesirable")
    if batch.rewards is not None:
        notes.append(f"reward {float(batch.rewards[i]):g}")
    lines = [f"--- example {i + 1}" + (f": {', '.join(notes)}" if notes else "")]
    if batch.rejected is None:
        lines.append(sequence_block("sequence", tokenizer, batch.sequences, i, lengths(full.sequences)[i]))
    else:
        lines.append(sequence_block("chosen", tokenizer, batch.sequences, i, lengths(full.sequences)[i]))
        lines.append(sequence_block("rejected", tokenizer, batch.rejected, i, lengths(full.rejected)[i]))
    return "\n".join(lines)


def loss_lengths(batch: Batch) -> list[int]:
    """Token counts of the sequences a loss is taken over (`sequences`, and `rejected` for pairs)."""
    return lengths(batch.sequences) + (lengths(batch.rejected) if batch.rejected is not None else [])


# ------------------------------------------------------------------------------------ the preview


def examples_of(task: Task, kind: str, split: str, algorithm: str) -> list[Any]:
    """The task's examples of `kind` in `split`; a kind it does not have, or none in the split, is a PreviewError."""
    if not task.provides(kind):
        has = [k for k in DATA_KINDS if k != kind and _provides(task, k)]
        raise PreviewError(
            f"task {task.name!r} has no {kind} examples, which algorithm {algorithm!r} trains on"
            + (f" (it has {', '.join(has)})" if has else "")
            + "; give data with that kind of examples, or pick an algorithm that trains on what the task has"
        )
    data = task.examples(kind, split=split)
    if not data:
        raise PreviewError(f"task {task.name!r} has no {kind} examples in the {split} split; try the other split (--split)")
    return data


def _provides(task: Task, kind: str) -> bool:
    """Whether the task has examples of `kind`, False where finding out needs what is missing (a stage)."""
    try:
        return task.provides(kind)
    except UserError:
        return False


def preview(cfg: RunConfig, n: int = 3, split: str = "train") -> str:
    """The text `rlhfzoo data` prints: the first `n` examples of `split` as the model sees them,
    then the counts (see the module docstring)."""
    if n < 0:
        raise PreviewError(f"--n {n}: give the number of examples to show, 0 or more")
    if split not in SPLITS:
        raise PreviewError(f"--split {split!r}: a task's splits are {' and '.join(SPLITS)}; give --split train or --split test")
    task = cfg.task.create()
    objective = cfg.algorithm.create()
    kind = objective.example_kind()
    data = examples_of(task, kind, split, cfg.algorithm.entry.name)
    tok = run_tokenization(cfg, task)
    online = " (online: the responses are generated)" if objective.online else ""
    head = [
        f"{kind} of the {split} split of task {task.name!r}, as algorithm {cfg.algorithm.entry.name!r} trains on them{online}",
        f"tokenizer: {tok.source} (vocabulary {len(tok.tokenizer)}), policy.max_length={tok.max_length}",
    ]
    body = preview_prompts(data, n, tok) if kind == "prompts" else preview_examples(data, n, tok)
    counts = [f"{kind} in the {split} split: {len(data)} ({min(n, len(data))} shown)"]
    read = task.read_summary()
    if read is not None:
        counts.append(f"rows read: {read}")
    return "\n".join([*head, *body[0], "", "--- counts", *counts, *body[1]]) + "\n"


def preview_examples(data: list[Any], n: int, tok: Tokenization) -> tuple[list[str], list[str]]:
    """(lines showing the first `n` examples collated, lines counting the truncated sequences)."""
    collate = Collator(tok.tokenizer, max_length=tok.max_length)
    uncut = Collator(tok.tokenizer, max_length=sys.maxsize)  # the lengths before truncation
    rows = list(enumerate(data))
    shown = rows[:n]
    lines = [f"{OPEN} {CLOSE} enclose the tokens the loss is taken over (response_mask = 1); the rest is context"]
    shown_cut = shown_total = 0
    if shown:
        batch, full = collate(shown), uncut(shown)
        lines += ["", *(example_block(batch, full, i, tok.tokenizer) for i in range(len(shown)))]
        full_lengths = loss_lengths(full)
        shown_total, shown_cut = len(full_lengths), sum(k > tok.max_length for k in full_lengths)
    every = [k for start in range(0, len(data), CHUNK) for k in loss_lengths(uncut(rows[start : start + CHUNK]))]
    cut = sum(k > tok.max_length for k in every)
    shown_part = f"{shown_cut} of the {shown_total} sequences shown, " if shown else ""
    counts = [
        f"longer than policy.max_length={tok.max_length} (truncated): {shown_part}"
        f"{cut} of the {len(every)} sequences of the split (longest: {max(every)} tokens)"
    ]
    return lines, counts


def preview_prompts(prompts: list[Any], n: int, tok: Tokenization) -> tuple[list[str], list[str]]:
    """(lines showing the first `n` prompts as generation sees them, lines counting the cut ones)."""
    room = tok.max_length - tok.max_new_tokens
    lines = [f"prompts are cut from the left to max_length - max_new_tokens = {room} tokens, as generation does"]
    for i, prompt in enumerate(prompts[:n]):
        ids = prompt_ids(tok.tokenizer, prompt)
        kept = ids[-room:]
        cut = f", cut from {len(ids)}" if len(ids) > room else ""
        text = tok.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        lines += ["", f"--- example {i + 1}", f"prompt ({len(kept)} tokens{cut}):", indented(text)]
    every = [len(prompt_ids(tok.tokenizer, p)) for p in prompts]
    shown = every[:n]
    shown_part = f"{sum(k > room for k in shown)} of the {len(shown)} prompts shown, " if shown else ""
    counts = [
        f"longer than {room} tokens (cut): {shown_part}"
        f"{sum(k > room for k in every)} of the {len(every)} prompts of the split (longest: {max(every)} tokens)"
    ]
    return lines, counts
