"""The run directory (`output_dir`): creating it, what `--overwrite` may delete, the metrics log,
what `--resume` checks and forgets, and disk errors turned into one message for the user.

    config.yaml  metrics.jsonl  checkpoints/  policy/  summary.json     a run's own entries
    .config.yaml.tmp  .metrics.jsonl.tmp  .summary.json.tmp  .policy.tmp    written, then renamed
    *.lock                                                              lock files, never deleted

`--overwrite` deletes a directory's contents only when it is recognisably a run: it holds
config.yaml, metrics.jsonl or checkpoints/, and nothing but the entries above (inside
checkpoints/, only `step-N` and `.tmp-step-N` directories). Anything else there is the user's:
the run stops, naming it, and deletes nothing.

Files are replaced atomically (written under a temporary name, then `os.replace`), so a kill
leaves the old contents or the new, never a half-written file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from safetensors import SafetensorError

from rlhfzoo.checkpoint import PARTIAL_DIR, STEP_DIR
from rlhfzoo.training_errors import TrainingError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", ".config.yaml.tmp", ".metrics.jsonl.tmp", ".summary.json.tmp")
RUN_DIRS = ("checkpoints", "policy", ".policy.tmp", "trackers")
MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")  # a run has at least one of these
# Config keys a resumed run may change: they decide how long it runs and what it logs or keeps,
# not what it computes. Anything else would make the resumed run differ from an uninterrupted one.
RESUMABLE_KEYS = (
    "output_dir", "train.steps", "train.stop_after", "train.progress", "train.log_every", "train.save_every",
    "train.keep_checkpoints", "train.report_to",
)


# ------------------------------------------------------------------------------ disk errors


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"os error (\d+)", str(e))  # safetensors reports I/O errors in its message
    return int(found.group(1)) if found else None


def disk_error_message(out: Path, doing: str, e: BaseException) -> str:
    code = _errno(e)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the disk holding output_dir {out} is full ({doing}); free some space or set output_dir to another "
            "disk, then continue with --resume (the last complete checkpoint is kept)"
        )
    if code == errno.EROFS:
        return f"cannot write to output_dir {out}: it is on a read-only file system ({doing}); choose a writable output_dir"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write to output_dir {out}: permission denied ({doing}); make it writable or choose another output_dir"
    return f"cannot write to output_dir {out} ({doing}): {e}; check the disk and output_dir"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def disk_errors(out: Path, doing: str, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a failed write under `out` (disk full, read-only, ...) into a TrainingError saying
    what was being done; on any failure first remove `cleanup`, the half-written temporary."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            _remove(cleanup)
        if isinstance(e, (OSError, SafetensorError)):
            raise TrainingError(disk_error_message(out, doing, e)) from e
        raise


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a kill leaves the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_errors(path.parent, f"writing {path.name}", cleanup=tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


# ------------------------------------------------------------------------------ a new run


def make_dir(out: Path) -> None:
    """Create output_dir (and its parents) and check that files can be written in it."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file, not a directory; choose another output_dir, or move the file away")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainingError(f"output_dir {out} cannot be created: {parent} is a file; choose another output_dir")
            break
    with disk_errors(out, "creating output_dir"):
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # an unnamed file: nothing is left behind


def _is_lock(p: Path) -> bool:
    return p.name.endswith(".lock") and p.is_file() and not p.is_symlink()


def foreign_entries(out: Path) -> list[str]:
    """Entries of `out` (paths relative to it) that a run does not write: the user's."""
    foreign = []
    for p in sorted(out.iterdir()):
        if _is_lock(p):
            continue
        own = not p.is_symlink() and ((p.name in RUN_FILES and p.is_file()) or (p.name in RUN_DIRS and p.is_dir()))
        if not own:
            foreign.append(p.name)
        elif p.name == "checkpoints":
            foreign += [
                f"checkpoints/{c.name}"
                for c in sorted(p.iterdir())
                if c.is_symlink() or not c.is_dir() or not (STEP_DIR.fullmatch(c.name) or PARTIAL_DIR.fullmatch(c.name))
            ]
    return foreign


def _listing(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def clear_for_new_run(out: Path, overwrite: bool) -> None:
    """Make `out` ready for a run from step 0: empty already, or (with --overwrite) a previous run,
    which is deleted. Anything else stops with a message and deletes nothing."""
    entries = [p for p in sorted(out.iterdir()) if not _is_lock(p)]
    if not entries:
        return
    foreign = foreign_entries(out)
    is_run = not foreign and any((out / m).exists() for m in MARKERS)
    named = _listing(foreign or [p.name for p in entries])
    if not overwrite:
        if is_run:
            raise TrainingError(f"output_dir {out} already holds a run; continue it with --resume, or start over with --overwrite")
        raise TrainingError(f"output_dir {out} is not empty and is not a run (it holds {named}); choose a new or empty output_dir")
    if not is_run:
        raise TrainingError(
            f"--overwrite refused: output_dir {out} holds {named}, so it is not a run directory; nothing was deleted. "
            "--overwrite only replaces a run (config.yaml, metrics.jsonl, checkpoints/, policy/, summary.json): "
            "choose another output_dir, or move those files away"
        )
    with disk_errors(out, "deleting the previous run (--overwrite)"):
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# ------------------------------------------------------------------------------ metrics


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended (by the main process only)."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / "metrics.jsonl", enabled

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with disk_errors(self.path.parent, f"appending to {self.path.name}"):
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")


def trim_metrics(out: Path, step: int, log: Callable[[str], None]) -> None:
    """Keep the rows of metrics.jsonl up to `step` (0: none), so a resumed run's log reads as one
    run. Lines that do not parse (cut short by a kill) are dropped with a warning."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    with disk_errors(out, f"reading {path.name}"):
        text = path.read_bytes().decode("utf-8", errors="replace")
    kept, unreadable = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = row["step"]
            if not isinstance(row_step, int):
                raise TypeError("step is not an integer")
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if row_step <= step:
            kept.append(line + "\n")
    if unreadable:
        log(f"[rlhfzoo] warning: dropped {unreadable} unreadable line(s) of {path} (e.g. cut short when a run was killed)")
    new = "".join(kept)
    if new != text:
        write_atomic(path, new)


# ------------------------------------------------------------------------------ resuming


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every dotted key that differs, except RESUMABLE_KEYS."""
    a, b = _flatten(old), _flatten(new)
    missing = object()

    def show(v: Any) -> str:
        return "(absent)" if v is missing else json.dumps(v)

    keys = [*b, *(k for k in a if k not in b)]
    return [
        f"{k}: {show(a.get(k, missing))} -> {show(b.get(k, missing))}"
        for k in keys
        if k not in RESUMABLE_KEYS and a.get(k, missing) != b.get(k, missing)
    ]


def check_config_unchanged(out: Path, new: dict[str, Any]) -> None:
    """Refuse to resume with a config that would compute another run than the stored one."""
    path = out / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise TrainingError(
            f"--resume: cannot check that the config is unchanged: {path} is missing or unreadable ({e}); "
            "restore it, or start over with --overwrite"
        ) from None
    changes = config_changes(old, new)
    if changes:
        raise TrainingError(
            f"--resume: the config is not the one this run started with ({path}): {'; '.join(changes)}. A resumed run "
            f"must compute what the uninterrupted one would: only {', '.join(RESUMABLE_KEYS)} may change. Put the old "
            "values back, or start a new run with --overwrite (or another output_dir)"
        )


def forget_after(out: Path, step: int, log: Callable[[str], None]) -> None:
    """Once a resume from `step` is known to work: drop the metrics logged after it and the
    summary of a previous finish (the run is not finished any more)."""
    trim_metrics(out, step, log)
    with disk_errors(out, "removing the old summary.json"):
        (out / "summary.json").unlink(missing_ok=True)
