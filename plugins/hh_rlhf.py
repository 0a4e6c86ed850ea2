"""The `hh-rlhf` task: Anthropic's helpful-and-harmless human preference dialogues.

Bai et al. 2022, "Training a helpful and harmless assistant with reinforcement learning from
human feedback", arXiv:2204.05862. Each row compares two assistant replies to the same dialogue;
the task hands them out as preference pairs (DPO, reward models, ...), demonstrations (the
chosen replies, for SFT), unpaired examples (KTO) or prompts (online RL). There is no gold
reward: the preferences are human labels.

Data comes from a local `.jsonl` / `.jsonl.gz` file (by default the shared harmless-base test
sample, see `Config.path`) or from a Hugging Face hub dataset (`Config.dataset`). The held-out
test split is cut from it by prompt, seeded, so that no prompt is in both splits.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from rlhfzoo import hookimpl
from rlhfzoo.data.tokenizer import load_pretrained_tokenizer, train_bpe_tokenizer
from rlhfzoo.data.jsonl import DataFileNotFoundError
from rlhfzoo.interfaces import Demonstration, PluginConfig, PreferencePair, Task, UnpairedExample
from rlhfzoo.plugins.hh_format import HHStats, load_hh_pairs
from rlhfzoo.pretrained import TOKENIZER_FILES, check_source

logger = logging.getLogger(__name__)

DEFAULT_PATH = "../shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
PATH_ENV = "RLHFZOO_HH_PATH"
KINDS = ("pairs", "demonstrations", "unpaired", "prompts")
SPLITS = ("train", "test")


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


class HHTask(Task):
    """Anthropic HH-RLHF preference dialogues as pairs, demonstrations, unpaired examples or prompts."""

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
            fix = "Give a saved tokenizer's directory, a hub id, or leave `tokenizer` unset to train a BPE tokenizer on the data."
            return None if value is None else check_source(value, "tokenizer", TOKENIZER_FILES, fix)

        @model_validator(mode="after")
        def _one_source(self):
            if self.path is not None and self.dataset is not None:
                raise ValueError("set either `path` (a local file) or `dataset` (a hub id), not both")
            return self

    def __init__(self, config: PluginConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.stats: HHStats | None = None  # set once the data is loaded
        self._splits: dict[str, list[PreferencePair]] | None = None
        self._tokenizer: Any = None

    # ---------------------------------------------------------------------------- data
    def _load(self) -> dict[str, list[PreferencePair]]:
        """Read, parse, subsample and split the data once; later calls reuse it."""
        if self._splits is None:
            cfg = self.config
            if cfg.dataset:
                pairs, self.stats = load_hh_pairs(
                    dataset=cfg.dataset, split=cfg.split, data_dir=cfg.data_dir, max_chars=cfg.max_chars
                )
            else:
                pairs, self.stats = load_hh_pairs(resolve_data_path(cfg.path), max_chars=cfg.max_chars)
            self._splits = split_by_prompt(pairs, cfg.test_fraction, cfg.seed, cfg.max_pairs)
            logger.info(
                "hh-rlhf: %d train / %d test pairs", len(self._splits["train"]), len(self._splits["test"])
            )
        return self._splits

    def pairs(self, split: str = "train") -> list[PreferencePair]:
        """The preference pairs of a split ('train' or 'test')."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; splits are: {', '.join(SPLITS)}")
        return list(self._load()[split])

    def examples(self, kind: str, split: str = "train") -> list[Any]:
        """Examples of a data kind for a split.

        pairs: `PreferencePair`s; demonstrations: the prompts with their chosen responses
        (duplicates dropped); unpaired: each chosen response as desirable and each rejected one
        as undesirable (in pair order); prompts: the distinct prompts (str).
        """
        if kind not in KINDS:
            raise ValueError(
                f"task {self.name!r} has no {kind!r} data; it provides: {', '.join(KINDS)} "
                "(HH-RLHF has preference labels but no rewards)"
            )
        pairs = self.pairs(split)
        if kind == "pairs":
            return pairs
        if kind == "demonstrations":
            return list(dict.fromkeys(Demonstration(p.prompt, p.chosen) for p in pairs))
        if kind == "unpaired":
            return [
                ex
                for p in pairs
                for ex in (UnpairedExample(p.prompt, p.chosen, True), UnpairedExample(p.prompt, p.rejected, False))
            ]
        return list(dict.fromkeys(p.prompt for p in pairs))

    # ---------------------------------------------------------------------------- model side
    def tokenizer(self) -> Any:
        """The configured pretrained tokenizer, or a byte-level BPE trained on the train split (cached)."""
        if self._tokenizer is None:
            if self.config.tokenizer:
                self._tokenizer = load_pretrained_tokenizer(self.config.tokenizer)
            else:
                pairs = self.pairs("train")
                texts = [*dict.fromkeys(p.prompt for p in pairs)]
                texts += [" " + r for p in pairs for r in (p.chosen, p.rejected)]
                self._tokenizer = train_bpe_tokenizer(texts, vocab_size=self.config.vocab_size)
        return self._tokenizer

    def default_reward(self) -> dict[str, Any]:
        """Online algorithms train against the task's cached reward model (the `reward-model` stage)."""
        return {"name": "reward-model", "path": "auto"}

    def default_model_config(self) -> dict[str, Any]:
        """A small GPT-2 for training from scratch on this task."""
        return {"arch": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256}


def split_by_prompt(
    pairs: list[PreferencePair], test_fraction: float, seed: int, max_pairs: int | None = None
) -> dict[str, list[PreferencePair]]:
    """Seeded train/test split that keeps all pairs of a prompt on the same side.

    The pairs are shuffled with `random.Random(seed)`, cut to `max_pairs`, grouped by prompt (in
    shuffled order), and whole groups go to 'test' until it holds `round(test_fraction * n)` pairs
    (at least one when `test_fraction > 0` and there are two or more prompts); the rest is
    'train'. Both lists keep the shuffled order.
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    if max_pairs is not None:
        order = order[:max_pairs]
    groups: dict[str, list[PreferencePair]] = {}
    for i in order:
        groups.setdefault(pairs[i].prompt, []).append(pairs[i])
    n_test = round(test_fraction * len(order))
    if test_fraction > 0 and len(groups) > 1:
        n_test = max(n_test, 1)
    test: list[PreferencePair] = []
    train: list[PreferencePair] = []
    remaining = len(groups)
    for group in groups.values():
        remaining -= 1
        # keep at least one group for training
        (test if len(test) < n_test and (train or remaining) else train).extend(group)
    return {"train": train, "test": test}


@hookimpl
def register_tasks(register):
    register(HHTask)
