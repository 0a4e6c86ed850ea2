"""Reading the `dataset` task's rows through the `datasets` library.

    parts = read_local("prefs.parquet")                       # [Part("prefs.parquet", Dataset)]
    parts = read_local("saved_dir", split="train")            # a `save_to_disk` directory
    parts = read_hub("org/name", split="train", subset=None)  # needs a network

A source is read as a list of `Part`s, one per data file (a directory of data files gives one part
per file, so that a bad row can be named by its file), each a `datasets.Dataset`. Local data is
read with no network use (`datasets` is put in offline mode while it reads):
`load_dataset("json" | "parquet" | "csv", data_files=...)` for a file, `load_from_disk` for a
directory written by `save_to_disk`.

Accepted local data, judged by name (`.gz` allowed after `.jsonl`, `.json` and `.csv`):
`.jsonl` / `.json` (JSON Lines, or one JSON array of objects), `.parquet`, `.csv` (with a header
row), a `save_to_disk` directory (a `Dataset` or a `DatasetDict`), or a directory holding data
files of one of those formats. Anything else, a missing path, or a file the reader fails on is a
`DataError` naming the path, the format detected and what is accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfzoo.data.jsonl import DataError, DataFileNotFoundError

__all__ = ["ACCEPTED_DATA", "Part", "data_format", "check_local_path", "read_local", "read_hub"]

# File suffix -> the `datasets` packaged builder that reads it.
READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
GZIP_OK = (".jsonl", ".json", ".csv")  # parquet compresses internally; `.parquet.gz` is not read
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
ACCEPTED_DATA = (
    "a .jsonl, .json, .parquet or .csv file (.jsonl.gz, .json.gz and .csv.gz too), a directory written "
    "by `datasets`' save_to_disk, or a directory of such data files"
)


@dataclass
class Part:
    """One data file (or saved dataset) of a source: `name` for messages, `rows` a `datasets.Dataset`."""

    name: str
    rows: Any


def data_format(path: Path) -> str | None:
    """The `datasets` builder for a data file judged by its name ("json", "parquet", "csv"), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
        if suffixes[-1:] and suffixes[-1] not in GZIP_OK:
            return None
    return READERS.get(suffixes[-1]) if suffixes else None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)


def _data_files(directory: Path) -> list[Path]:
    """The data files under a directory (recursively, sorted), skipping hidden files."""
    found = [
        p for p in sorted(directory.rglob("*"))
        if p.is_file() and data_format(p) and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    return found


def check_local_path(path: Path) -> None:
    """Raise `DataError` unless `path` is data this module reads (see the module docstring); checks
    names only, not contents (a config validator calls this before anything is read)."""
    if not path.exists():
        raise DataFileNotFoundError(f"data path not found: {path}. Give {ACCEPTED_DATA}.", str(path))
    if path.is_dir():
        if _is_saved_dataset(path):
            return
        files = _data_files(path)
        if not files:
            raise DataError(
                f"{path}: a directory holding neither a dataset saved with save_to_disk (no "
                f"{' / '.join(SAVED_MARKERS)}) nor data files. Give {ACCEPTED_DATA}.",
                str(path),
            )
        formats = {data_format(f) for f in files}
        if len(formats) > 1:
            raise DataError(
                f"{path}: the directory mixes data formats ({', '.join(sorted(formats))}); keep files of "
                "one format in it, or point `path` at one file.",
                str(path),
            )
        return
    if data_format(path) is None:
        raise DataError(
            f"{path}: cannot tell the data format from the name {path.name!r}. Give {ACCEPTED_DATA}; "
            "rename the file if its name hides its format.",
            str(path),
        )


@contextmanager
def _offline() -> Iterator[None]:
    """`datasets` in offline mode, without its download-count request (a HEAD request to S3 on every
    `load_dataset` of a packaged reader, even for a local file): local data never touches the network."""
    from datasets import config

    saved = config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def _load_file(path: Path) -> Any:
    import datasets

    fmt = data_format(path)
    try:
        with _offline():
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - every reader failure needs the same advice
        cause = e.__cause__ or e.__context__ or e
        raise DataError(
            f"{path}: could not read it as {fmt} (detected from the name): {type(cause).__name__}: "
            f"{str(cause).strip()[:300]}. Fix the file, or convert it to one of: {ACCEPTED_DATA}.",
            str(path),
        ) from e


def _load_saved(path: Path, split: str | None) -> tuple[Any, list[str]]:
    """A `save_to_disk` directory: the Dataset itself, or the DatasetDict's `split`, and the
    DatasetDict's split names ([] for a Dataset)."""
    import datasets

    try:
        with _offline():
            saved = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"{path}: could not read the dataset saved there with save_to_disk: {type(e).__name__}: "
            f"{str(e).strip()[:300]}. Save it again, or give another of: {ACCEPTED_DATA}.",
            str(path),
        ) from e
    if isinstance(saved, datasets.DatasetDict):
        names = list(saved)
        if split is None:
            return None, names
        if split not in saved:
            raise DataError(
                f"{path}: the saved DatasetDict has no split {split!r}; its splits are: {', '.join(names)}. "
                "Set the task option `split` (or `test_split`) to one of them.",
                str(path),
            )
        return saved[split], names
    return saved, []


def read_local(path: str | Path, split: str | None = None) -> tuple[list[Part], list[str]]:
    """The parts of local data, and the split names of a saved DatasetDict ([] for anything else).

    `split` picks the split of a saved DatasetDict (it must be given for one); a file, a
    directory of files or a saved `Dataset` has a single split and ignores it.
    """
    path = Path(path)
    check_local_path(path)
    if _is_saved_dataset(path):
        rows, names = _load_saved(path, split)
        if rows is None:
            raise DataError(
                f"{path}: a saved DatasetDict with splits {', '.join(names)}; set the task option `split`.", str(path)
            )
        return [Part(str(path) if not names else f"{path}[{split}]", rows)], names
    files = [path] if path.is_file() else _data_files(path)
    return [Part(str(f), _load_file(f)) for f in files], []


def read_hub(dataset: str, split: str, subset: str | None = None) -> list[Part]:
    """The one part of a split of a Hugging Face hub dataset (needs a network, or the local hub
    cache). Any failure is a `DataError` saying the dataset could not be reached, and why."""
    try:
        import datasets

        rows = datasets.load_dataset(dataset, name=subset, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, bad split: all need the same advice
        sub = f", subset {subset!r}" if subset else ""
        raise DataError(
            f"could not reach or load the dataset {dataset!r} (split {split!r}{sub}) from the Hugging Face "
            f"hub: {type(e).__name__}: {str(e).strip()[:300]}. Check the id, subset and split; without "
            f"network access, download the data elsewhere and give the task option `path` ({ACCEPTED_DATA}).",
            dataset,
        ) from e
    label = f"{dataset}" + (f"/{subset}" if subset else "") + f"[{split}]"
    return [Part(label, rows)]
