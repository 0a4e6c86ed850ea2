"""Pretrained files named in configs -- a model or tokenizer directory, or a hub id: checking the
name when the config is read, and turning a failed load into one message for the user.

A value that exists as a path must be a directory holding the expected files (checked at once,
cheaply). A value that does not exist must look like a Hugging Face hub id (`org/name`, or a
single name such as `gpt2`); `transformers` downloads it, or reads it from its cache, when the
model is built (set HF_HUB_OFFLINE=1 on a machine without network). Anything else -- `/nope`,
`./runs/x`, `a/b/c` -- is a local path that does not exist: a config error.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlhfzoo.errors import UserError

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")

# The hub's rule for repository ids: one optional namespace, letters, digits, `-`, `_`, `.`.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class LoadError(UserError, ValueError):
    """A model or tokenizer named in a config could not be loaded; `cause` says why, in one line."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and ".." not in value and "--" not in value and not value.endswith((".", "-"))


def check_source(value: str, what: str, files: tuple[str, ...], fix: str) -> str:
    """Return `value` if it names an existing directory holding one of `files`, or a hub id;
    else raise ValueError (a pydantic field validator turns it into a config error) saying
    what is wrong and `fix`."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{value!r} is a file, not a {what} directory. {fix}")
        if not any((path / name).is_file() for name in files):
            raise ValueError(f"{value!r} holds no {' or '.join(files)}: it is not a {what} directory. {fix}")
        return value
    if is_hub_id(value):
        return value
    raise ValueError(f"{value!r} does not exist (and is not a hub id such as 'org/name'). {fix}")


def load_error(field: str, value: str, what: str, error: BaseException, fix: str) -> LoadError:
    """One message for a failed `from_pretrained(value)`: the config field, where it looked,
    the cause (its first line), and `fix`."""
    first_line = str(error).strip().splitlines()[0][:300].rstrip(".") if str(error).strip() else ""
    cause = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    if Path(value).expanduser().exists():
        where = f"a {what} from the directory {value!r}"
    else:
        where = f"the {what} {value!r} from the Hugging Face hub or its local cache (is there a network?)"
    return LoadError(f"{field}: could not load {where}: {cause}. {fix}", cause)
