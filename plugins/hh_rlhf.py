"""The `hh-rlhf` task: Anthropic's helpful-and-harmless human preference dialogues.

Bai et al. 2022, "Training a helpful and harmless assistant with reinforcement learning from
human feedback", arXiv:2204.05862. Each row compares two assistant replies to the same dialogue;
the task hands them out as preference pairs (DPO, reward models, ...), demonstrations (the
chosen replies, for SFT), unpaired examples (KTO) or prompts (online RL). There is no gold
reward: the preferences are human labels.

A preset of the `dataset` task (`rlhfzoo.plugins.dataset.DatasetTask`): the same examples, split
and model side, with HH's own options and reading. Data comes from a local `.jsonl` /
`.jsonl.gz` file (by default the shared harmless-base test sample, see `Config.path`) or from a
Hugging Face hub dataset (`Config.dataset`, `data_dir`), and its rows are parsed as HH rows
(`rlhfzoo.plugins.hh_format`: dialogues split at their last assistant turn, prompt/chosen/rejected
columns, chat messages rendered as HH text). The held-out test split is cut from the parsed pairs
by prompt, seeded, so that no prompt is in both splits.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from rlhfzoo import hookimpl
from rlhfzoo.data.tokenizer import check_tokenizer_option, load_pretrained_tokenizer, train_bpe_tokenizer
from rlhfzoo.data.jsonl import DataFileNotFoundError
from rlhfzoo.interfaces import PluginConfig, PreferencePair
from rlhfzoo.plugins.dataset import DatasetTask
from rlhfzoo.plugins.dataset_formats import Format, ReadStats, Record
from rlhfzoo.plugins.dataset_source import Part
from rlhfzoo.plugins.hh_format import SKIP_REASONS, HHStats, open_rows, parse_pairs

DEFAULT_PATH = "../shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
PATH_ENV = "RLHFZOO_HH_PATH"
KINDS = ("pairs", "demonstrations", "unpaired", "prompts")
# HH rows in the `dataset` task's terms: pairs with a prompt (explicit, or the dialogues' shared turns).
HH_FORMAT = Format("HH-RLHF", ("chosen", "rejected"), ("prompt",), KINDS)


def _search_roots() -> list[Path]:
    """Directories a relative data path is looked up from: the working directory, then the repository root(s)."""
    cwd = Path.cwd()
    roots = [cwd, Path(__file__).resolve().parents[1]]  # plugins/ lives in the repository root
    roots += [d for d in cwd.parents if (d / "pyproject.toml").is_file()]
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def resolve_data_path(path: str | None) -> Path:
    """Find the local data file: `path`, else $RLHFZOO_HH_PATH, else the shared sample.

    A relative path is tried against the working directory first, then the repository root.
    Raises `DataFileNotFoundError` (a `FileNotFoundError`) naming every place tried and the ways
    to provide a file.
    """
    given = path or os.environ.get(PATH_ENV) or DEFAULT_PATH
    p = Path(given).expanduser()
    candidates = [p] if p.is_absolute() else [r / p for r in _search_roots()]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    origin = "task option `path`" if path else (f"${PATH_ENV}" if os.environ.get(PATH_ENV) else "the default sample")
    tried = "\n  ".join(str(c) for c in candidates)
    raise DataFileNotFoundError(
        f"hh-rlhf data file {given!r} ({origin}) not found; tried:\n  {tried}\n"
        f"Provide one with the task option `path` (a .jsonl or .jsonl.gz file of HH-RLHF rows), the "
        f"{PATH_ENV} environment variable, or a hub dataset with `dataset` (e.g. 'Anthropic/hh-rlhf').",
        given,
    )


class HHTask(DatasetTask):
    """Anthropic HH-RLHF preference dialogues as pairs, demonstrations, unpaired examples or prompts.

    The `dataset` task with HH's options (kept as they were: cached stages are keyed by them) and
    HH reading: `_sources` finds the file (or hub split), `_read` parses its rows with
    `hh_format.parse_pairs` and orders them; the split, the examples and `eval_prompts` are the
    `dataset` task's.
    """

    name = "hh-rlhf"
    aliases = ("hh",)
    summary = "Anthropic helpful/harmless dialogues with human preference labels (no gold reward)"
    paper = "Bai et al. 2022, Training a Helpful and Harmless Assistant with RLHF, arXiv:2204.05862"

    class Config(PluginConfig):
        path: str | None = Field(
            None,
            description=(
                f"Local .jsonl or .jsonl.gz file of HH rows ('chosen'/'rejected' dialogues, or "
                f"'prompt'/'chosen'/'rejected'). Unset: ${PATH_ENV}, else the shared sample {DEFAULT_PATH}. "
                "Relative paths are looked up from the working directory, then the repository root."
            ),
        )
        dataset: str | None = Field(
            None, description="Hugging Face hub dataset id to load instead of a local file (needs network), e.g. 'Anthropic/hh-rlhf'."
        )
        data_dir: str | None = Field(
            None, description="Subset directory of the hub dataset, e.g. 'harmless-base' or 'helpful-base'."
        )
        split: str = Field("train", description="Split of the hub dataset to read (local files have one); train/test are cut from it.")
        test_fraction: float = Field(
            0.1, ge=0.0, lt=1.0, description="Fraction of the pairs held out as the 'test' split (grouped by prompt)."
        )
        seed: int = Field(0, description="Seed of the shuffle that picks the held-out pairs and the `max_pairs` subset.")
        max_pairs: int | None = Field(
            None, ge=1, description="Use at most this many pairs (a seeded random subset; unset: all)."
        )
        max_chars: int | None = Field(
            2000,
            ge=16,
            description="Cut prompts (oldest turns first) and responses (at the end) to this many characters (unset: no limit).",
        )
        tokenizer: str | None = Field(
            None,
            description="Pretrained tokenizer (local directory or hub id) to use; unset: train a byte-level BPE tokenizer on the train split.",
        )
        vocab_size: int = Field(
            4096, ge=258, description="Vocabulary size of the BPE tokenizer trained when `tokenizer` is unset."
        )

        @field_validator("path")
        @classmethod
        def _path_exists(cls, value: str | None) -> str | None:
            if value is not None:
                resolve_data_path(value)  # a missing file is a config error, before anything runs
            return value

        @field_validator("tokenizer")
        @classmethod
        def _tokenizer_exists(cls, value: str | None) -> str | None:
            return check_tokenizer_option(value)

        @model_validator(mode="after")
        def _one_source(self):
            if self.path is not None and self.dataset is not None:
                raise ValueError("set either `path` (a local file) or `dataset` (a hub id), not both")
            return self

    # ---------------------------------------------------------------------------- reading (the preset's own)
    def _sources(self) -> tuple[list[Part], None]:
        """The one part to read: the local file (see `resolve_data_path`) or the hub split, its rows
        `(number, dict)` not read yet; the test split is always cut from it."""
        cfg = self.config
        if cfg.dataset:
            source, rows, _ = open_rows(dataset=cfg.dataset, split=cfg.split, data_dir=cfg.data_dir)
        else:
            source, rows, _ = open_rows(resolve_data_path(cfg.path))
        return [Part(source, rows)], None

    def _read(self, parts: list[Part], stats: ReadStats) -> list[Record]:
        """The pairs of the rows as records, in seeded shuffled order, cut to `max_pairs`.

        HH's order: the rows are parsed in file order and the usable *pairs* shuffled (the `dataset`
        task shuffles the rows before parsing), so that the split and the subset depend on the
        pairs alone. Fills `stats` from the parse (`HHStats`); no usable pair is a `DataError`.
        """
        cfg = self.config
        (part,) = parts
        unit = "row" if cfg.dataset else "line"
        pairs, parsed = parse_pairs(part.rows, part.name, max_chars=cfg.max_chars, unit=unit)
        self.format = HH_FORMAT
        _fill_stats(stats, parsed, unit)
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        return [Record(pairs[i].prompt, pairs[i].chosen, rejected=pairs[i].rejected) for i in order[: cfg.max_pairs]]

    # ---------------------------------------------------------------------------- examples
    def provides(self, kind: str) -> bool:
        """Every HH row is a preference pair: the kinds are known without reading the data."""
        return kind in KINDS

    def examples(self, kind: str, split: str = "train") -> list[Any]:
        """Examples of a data kind for a split (see `DatasetTask.examples`): pairs, demonstrations
        (the chosen responses, duplicates dropped), unpaired (each chosen response as desirable, then
        its rejected one as undesirable) or prompts (the distinct prompts, str)."""
        if kind not in KINDS:
            raise ValueError(
                f"task {self.name!r} has no {kind!r} data; it provides: {', '.join(KINDS)} "
                "(HH-RLHF has preference labels but no rewards)"
            )
        return super().examples(kind, split)

    def pairs(self, split: str = "train") -> list[PreferencePair]:
        """The preference pairs of a split ('train' or 'test')."""
        return self.examples("pairs", split)

    # ---------------------------------------------------------------------------- model side
    def tokenizer(self) -> Any:
        """The configured pretrained tokenizer, or a byte-level BPE trained on the train split (cached):
        on its distinct prompts and its responses, each after a space (as they follow the prompt)."""
        if self._tokenizer is None:
            if self.config.tokenizer:
                self._tokenizer = load_pretrained_tokenizer(self.config.tokenizer)
            else:
                records = self._load()["train"]
                texts = [*dict.fromkeys(r.prompt for r in records)]
                texts += [" " + t for r in records for t in (r.response, r.rejected)]
                self._tokenizer = train_bpe_tokenizer(texts, vocab_size=self.config.vocab_size)
        return self._tokenizer

    def default_reward(self) -> dict[str, Any]:
        """Online algorithms train against the task's cached reward model (the `reward-model` stage)."""
        return {"name": "reward-model", "path": "auto"}

    def default_model_config(self) -> dict[str, Any]:
        """A small GPT-2 for training from scratch on this task (fixed here: the cached stages depend on it)."""
        return {"arch": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256}


def _fill_stats(stats: ReadStats, parsed: HHStats, unit: str) -> None:
    """Copy what `parse_pairs` counted into the `dataset` task's read summary (skipped rows as "line 3")."""
    stats.source, stats.format = parsed.source, HH_FORMAT.name
    stats.rows, stats.kept, stats.truncated = parsed.rows, parsed.pairs, parsed.truncated
    stats.ignored_columns = list(parsed.ignored_fields)
    for reason in SKIP_REASONS:
        if parsed.skipped_rows.get(reason):
            stats.skipped_by_reason[reason] = getattr(parsed, f"skipped_{reason}")
            stats.skipped_rows[reason] = [f"{unit} {n}" for n in parsed.skipped_rows[reason]]


@hookimpl
def register_tasks(register):
    register(HHTask)
