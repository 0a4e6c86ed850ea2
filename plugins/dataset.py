"""The `dataset` task: your own data, in the field's standard formats, from a file, a directory or the hub.

    task: {name: dataset, path: prefs.jsonl}                     # prompt/chosen/rejected rows
    task: {name: dataset, path: data/, columns: {question: prompt, answer: completion}}
    task: {name: dataset, dataset: org/name, split: train, test_split: test}

Rows are read through the `datasets` library (`rlhfzoo.plugins.dataset_source`: `.jsonl`, `.json`,
`.parquet`, `.csv`, gzip, `save_to_disk` directories, directories of data files, hub ids). Their
format is detected from the column names (`rlhfzoo.plugins.dataset_formats`: TRL's standard
formats -- text, prompt/completion, prompt/chosen/rejected with an optional margin, chosen/rejected
with an implicit prompt, prompt/completion/label, prompt/completion/reward, prompt-only -- and
their conversational variants, lists of `{role, content}` messages, `messages` too), and the task
hands out every example kind the format allows (see `DatasetTask.examples`). Conversations become
`Chat`s, rendered later with the tokenizer's chat template exactly as inference renders them.

The held-out 'test' split is a named split of the source (`test_split`) or a seeded share of the
rows (`test_fraction`) cut whole prompts at a time, so that no prompt is in both splits. There is
no gold reward. A pretrained policy uses its own tokenizer; for a model trained from scratch the
tokenizer is a pretrained one (`tokenizer`) or a byte-level BPE trained on the train split, in
memory (nothing is cached on disk), with the ChatML template for conversational rows.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rlhfzoo import hookimpl
from rlhfzoo.data.jsonl import DataError
from rlhfzoo.data.tokenizer import check_tokenizer_option, load_pretrained_tokenizer, train_bpe_tokenizer
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Chat, Demonstration, Text, PluginConfig, PreferencePair, RewardedExample, Task, UnpairedExample
from rlhfzoo.plugins.dataset_formats import STANDARD_COLUMNS, Format, ReadStats, Record, detect_format, parse_rows, rename_columns
from rlhfzoo.plugins.dataset_source import ACCEPTED_DATA, Part, check_local_path, read_hub, read_local

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
# Rows passed to `DatasetTask.from_rows` in this process, by fingerprint: (train rows, test rows or None).
ROWS_IN_MEMORY: dict[str, tuple[Any, Any]] = {}


def _check_rows_options(config: Any) -> None:
    """The options that do not apply to rows in memory (a ValueError naming them)."""
    if config.rows_fingerprint not in ROWS_IN_MEMORY:
        raise ValueError(
            "`rows_fingerprint` is set by rlhfzoo.train(train_dataset=...) for the rows passed in, and this process "
            "holds none with that fingerprint; in a config, give `path` (local data) or `dataset` (a hub id) instead"
        )
    if config.path is not None or config.dataset is not None:
        raise ValueError("the rows are passed in memory (train_dataset=...); drop `path` and `dataset`")
    # Compared with the defaults, not looked up in the fields set: a stage's run config lists every option.
    default = {k: f.default for k, f in type(config).model_fields.items()}
    named = [f"`{k}`" for k in ("subset", "split", "test_split") if getattr(config, k) != default[k]]
    if named:
        raise ValueError(
            f"{', '.join(named)} name a part of a hub or saved dataset; rows passed in memory have none: drop "
            f"{'it' if len(named) == 1 else 'them'} (pass eval_dataset=... for held-out rows)"
        )
    if ROWS_IN_MEMORY[config.rows_fingerprint][1] is not None and config.test_fraction != default["test_fraction"]:
        raise ValueError("the held-out rows are passed as eval_dataset=...; drop `test_fraction`")


class DatasetTask(Task):
    """Rows of a local file, directory or hub dataset in a standard format, as every kind they allow."""

    name = "dataset"
    summary = "your own data: .jsonl/.json/.parquet/.csv, save_to_disk or hub datasets in TRL's standard formats (no gold reward)"

    class Config(PluginConfig):
        path: str | None = Field(
            None,
            description=(
                f"Local data: {ACCEPTED_DATA}. A relative path is read from the working directory "
                "(and stored absolute). Set this or `dataset`."
            ),
        )
        dataset: str | None = Field(
            None, description="Hugging Face hub dataset id to read instead of `path` (needs a network), e.g. 'trl-lib/ultrafeedback_binarized'."
        )
        subset: str | None = Field(None, description="Configuration (subset) name of the hub dataset, if it has several.")
        split: str = Field(
            "train", description="Split to train on, of a hub dataset or a saved DatasetDict (a file has one split)."
        )
        test_split: str | None = Field(
            None,
            description="Split held out as 'test', of a hub dataset or a saved DatasetDict; unset: cut `test_fraction` of the rows.",
        )
        test_fraction: float = Field(
            0.1, ge=0.0, lt=1.0, description="Share of the rows held out as 'test' when `test_split` is unset (grouped by prompt)."
        )
        columns: dict[str, str] = Field(
            default_factory=dict,
            description=(
                "Your column names -> the standard ones, e.g. {question: prompt, answer: completion}. Standard names: "
                + ", ".join(STANDARD_COLUMNS)
                + "."
            ),
        )
        max_rows: int | None = Field(
            None, ge=1, description="Read at most this many rows of each split read (a seeded random subset; unset: all)."
        )
        seed: int = Field(0, description="Seed of the shuffle that picks the held-out rows and the `max_rows` subset.")
        max_chars: int | None = Field(
            None, ge=16, description="Cut plain-text prompts (from the start) and responses (at the end) to this many characters (unset: no limit; conversations are cut in tokens, to the policy's max_length)."
        )
        assistant_turns: Literal["last", "all"] = Field(
            "last",
            description=(
                "For `messages` conversations: train on the last assistant turn (the turns before it are the prompt) "
                "or on every assistant turn (the prompt is the turns before the first; user turns get no loss)."
            ),
        )
        tokenizer: str | None = Field(
            None,
            description=(
                "Pretrained tokenizer (local directory or hub id) for a model trained from scratch; unset: train a "
                "byte-level BPE on the train split (with the ChatML template for conversational rows). A pretrained "
                "policy (`policy.init`) always uses its own tokenizer and chat template."
            ),
        )
        vocab_size: int = Field(4096, ge=258, description="Vocabulary size of the BPE tokenizer trained when `tokenizer` is unset.")
        rows_fingerprint: str | None = Field(
            None,
            description="Set by rlhfzoo.train(train_dataset=...): the `datasets` fingerprint of the rows passed in, so cached "
            "stages of different in-memory data differ; not settable in YAML.",
        )

        @field_validator("path")
        @classmethod
        def _path_is_data(cls, value: str | None) -> str | None:
            """An existing path of accepted data (else a config error, before anything runs), made
            absolute: the cached stages are keyed by the task options, so one relative name read
            from two directories must not share them."""
            if value is None:
                return None
            path = Path(value).expanduser().resolve()
            check_local_path(path)
            return str(path)

        @field_validator("columns")
        @classmethod
        def _standard_targets(cls, value: dict[str, str]) -> dict[str, str]:
            unknown = sorted({v for v in value.values() if v not in STANDARD_COLUMNS})
            if unknown:
                raise ValueError(
                    f"`columns` maps onto {', '.join(map(repr, unknown))}, not standard column names; "
                    f"map your columns onto: {', '.join(STANDARD_COLUMNS)}"
                )
            return value

        @field_validator("tokenizer")
        @classmethod
        def _tokenizer_exists(cls, value: str | None) -> str | None:
            return check_tokenizer_option(value)

        @model_validator(mode="after")
        def _one_source_one_test_split(self):
            if self.rows_fingerprint is not None:
                _check_rows_options(self)
            elif (self.path is None) == (self.dataset is None):
                raise ValueError("set exactly one of `path` (local data) and `dataset` (a hub id)")
            if self.test_split is not None and "test_fraction" in self.model_fields_set:
                raise ValueError("set either `test_split` (a named split) or `test_fraction` (a share of the rows), not both")
            return self

    def __init__(self, config: PluginConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.stats: ReadStats | None = None  # set once the data is read
        self.format: Format | None = None
        self._splits: dict[str, list[Record]] | None = None
        self._tokenizer: Any = None

    @classmethod
    def from_rows(cls, train_rows: Any, test_rows: Any = None, **options: Any) -> "DatasetTask":
        """The task over rows in memory: `train_rows` a `datasets.Dataset`, `test_rows` one held out
        as 'test' (None: `test_fraction` of the train rows is), `options` the other task options.
        The rows are kept for this process under their fingerprint (`rows_fingerprint`), so that a
        config naming it -- the run config of a cached stage of this task -- reads them again."""
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash(train_rows) + ("" if test_rows is None else "+" + Hasher.hash(test_rows))
        ROWS_IN_MEMORY[fingerprint] = (train_rows, test_rows)
        return cls(cls.Config(rows_fingerprint=fingerprint, **options))

    # ---------------------------------------------------------------------------- reading
    def _sources(self) -> tuple[list[Part], list[Part] | None]:
        """The parts of the train source and of the named test split (None: cut from the train rows)."""
        cfg = self.config
        if cfg.rows_fingerprint is not None:
            train, test = ROWS_IN_MEMORY[cfg.rows_fingerprint]
            return [Part("train_dataset", train)], (None if test is None else [Part("eval_dataset", test)])
        if cfg.dataset:
            test = read_hub(cfg.dataset, cfg.test_split, cfg.subset) if cfg.test_split else None
            return read_hub(cfg.dataset, cfg.split, cfg.subset), test
        path = Path(cfg.path).expanduser()
        train, names = read_local(path, cfg.split)
        if not names and (cfg.test_split is not None or "split" in cfg.model_fields_set):
            option = "test_split" if cfg.test_split is not None else "split"
            raise DataError(
                f"{path}: the task option `{option}` names a split, but this data has a single split (only a "
                "hub dataset or a DatasetDict saved with save_to_disk has named ones); unset it "
                "(the held-out rows are then cut with `test_fraction`).",
                str(path),
            )
        return train, (read_local(path, cfg.test_split)[0] if cfg.test_split else None)

    def _read(self, parts: list[Part], stats: ReadStats) -> list[Record]:
        """The records of a source's rows in seeded shuffled order, cut to `max_rows`."""
        cfg = self.config
        tables = [rename_columns(p.rows, cfg.columns, p.name) for p in parts]
        for part, rows in zip(parts, tables):
            fmt = detect_format(list(rows.column_names), part.name)
            if self.format is not None and fmt != self.format:
                raise DataError(
                    f"{part.name}: its rows are in the {fmt.name} format ({fmt.columns}), but the rest of the data "
                    f"is {self.format.name} ({self.format.columns}); give one format throughout.",
                    part.name,
                )
            self.format = fmt
        order = [(p, i) for p, rows in enumerate(tables) for i in range(len(rows))]
        random.Random(cfg.seed).shuffle(order)
        order = order[: cfg.max_rows]
        slots: list[Record | None] = [None] * len(order)
        for p, rows in enumerate(tables):
            position = {i: k for k, (q, i) in enumerate(order) if q == p}
            for i, record in parse_rows(rows, list(position), self.format, parts[p].name, stats, cfg.assistant_turns):
                slots[position[i]] = record
        return [r for r in slots if r is not None]

    def _load(self) -> dict[str, list[Record]]:
        """Read, check, subsample and split the data once; later calls reuse it."""
        if self._splits is None:
            cfg = self.config
            train_parts, test_parts = self._sources()
            stats = ReadStats(source=cfg.dataset or cfg.path or "train_dataset", max_chars=cfg.max_chars)
            records = self._read(train_parts, stats)
            if test_parts is None:
                splits = split_grouped(records, cfg.test_fraction)
            else:
                splits = {"train": records, "test": self._read(test_parts, stats)}
            stats.format = self.format.name
            if not splits["train"]:
                raise DataError(f"no usable rows in the train split ({stats.summary()}); see the skipped rows.", stats.source)
            # Skipped rows change what a run trains on: a warning, printed even where no logging is set up.
            logger.log(logging.WARNING if stats.skipped else logging.INFO, "dataset %s", stats.summary())
            self.stats, self._splits = stats, splits
        return self._splits

    # ---------------------------------------------------------------------------- examples
    def kinds(self) -> tuple[str, ...]:
        """The example kinds the data's format gives (reads the data)."""
        self._load()
        return self.format.kinds

    def provides(self, kind: str) -> bool:
        return kind in self.kinds()

    def examples(self, kind: str, split: str = "train") -> list[Any]:
        """Examples of a data kind for a split ('train' or 'test'), in the split's (shuffled) order.

        pairs: `PreferencePair`s (with the row's margin; of a ranking: its best and worst
        completions); rankings: a ranking's K-choose-2 pairs (tied ranks make none), sharing
        `group` (InstructGPT's K-wise comparisons); demonstrations: the completions, the
        texts (empty prompt), the desirable completions of labelled rows, or the chosen
        responses of pairs and the best of rankings (duplicates dropped); unpaired: labelled
        rows, or each pair's chosen response as desirable and its rejected one as undesirable;
        rewarded: the rows with their rewards; prompts: the distinct prompts (text or `Chat`).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; splits are: {', '.join(SPLITS)}")
        kinds = self.kinds()
        if kind not in kinds:
            raise ValueError(
                f"task {self.name!r} has no {kind!r} data: its rows are in the {self.format.name} format "
                f"({self.format.columns}), which gives {', '.join(kinds)}"
            )
        records = self._splits[split]
        pairs = "chosen" in self.format.required
        if kind == "pairs":
            return [PreferencePair(r.prompt, r.response, r.rejected, margin=r.margin) for r in records]
        if kind == "rankings":
            return [
                PreferencePair(r.prompt, better, worse, group=g)
                for g, r in enumerate(records)
                for i, (better, rank) in enumerate(r.ranked)
                for worse, other in r.ranked[i + 1 :]
                if rank < other
            ]
        if kind == "demonstrations":
            return list(dict.fromkeys(Demonstration(r.prompt, r.response) for r in records if r.label is not False and r.response))
        if kind == "unpaired":
            if pairs:
                return [
                    ex for r in records
                    for ex in (UnpairedExample(r.prompt, r.response, True), UnpairedExample(r.prompt, r.rejected, False))
                ]
            return [UnpairedExample(r.prompt, r.response, r.label) for r in records]
        if kind == "rewarded":
            return [RewardedExample(r.prompt, r.response, r.reward) for r in records]
        return list(dict.fromkeys(r.prompt for r in records if r.prompt))

    def read_summary(self) -> str | None:
        return self.stats.summary() if self.stats is not None else None

    def eval_prompts(self) -> list[Text]:
        """The test split's prompts; data without prompts (language modelling) is a `UserError`."""
        if "prompts" not in self.kinds():
            raise UserError(
                f"task {self.name!r}: the rows are {self.format.name} ({self.format.columns}) and have no prompts "
                "to evaluate a policy on; set `train.eval_prompts: 0`, or give rows with a 'prompt' column."
            )
        return self.examples("prompts", split="test")

    # ---------------------------------------------------------------------------- model side
    def tokenizer(self) -> Any:
        """The configured pretrained tokenizer, or a byte-level BPE trained on the train split (in memory)."""
        if self._tokenizer is None:
            if self.config.tokenizer:
                self._tokenizer = load_pretrained_tokenizer(self.config.tokenizer)
            else:
                records = self._load()["train"]
                texts = [p for p in dict.fromkeys(r.prompt for r in records) if p]
                texts += [t for r in records for t in (r.response, r.rejected) if t]
                texts = [content for t in texts for content in ([c for _, c in t.turns] if isinstance(t, Chat) else [t])]
                self._tokenizer = train_bpe_tokenizer(texts, vocab_size=self.config.vocab_size, chat=bool(self.stats.conversational))
        return self._tokenizer

    def default_reward(self) -> dict[str, Any] | None:
        """With preference pairs: the task's cached reward model (the `reward-model` stage); else none."""
        return {"name": "reward-model", "path": "auto"} if self.provides("pairs") else None

    def default_model_config(self) -> dict[str, Any]:
        """A small GPT-2 for training from scratch on this task."""
        return {"arch": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256}


def split_grouped(records: list[Record], test_fraction: float) -> dict[str, list[Record]]:
    """Train/test split of (already shuffled) records that keeps all records of a prompt (of a
    text, for prompt-less rows) on the same side.

    Records are grouped by `Record.group` in order of first appearance, and whole groups go to
    'test' until it holds `round(test_fraction * n)` records (at least one when `test_fraction > 0`
    and there are two or more groups), always leaving one group for 'train'. Both keep the order.
    """
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    n_test = round(test_fraction * len(records))
    if test_fraction > 0 and len(groups) > 1:
        n_test = max(n_test, 1)
    train: list[Record] = []
    test: list[Record] = []
    remaining = len(groups)
    for group in groups.values():
        remaining -= 1
        (test if len(test) < n_test and (train or remaining) else train).extend(group)
    return {"train": train, "test": test}


@hookimpl
def register_tasks(register):
    register(DatasetTask)
