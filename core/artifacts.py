"""A cache of pipeline stages (SFT models, reward models, generated datasets), keyed by config.

    path = artifact("my-stage", {"task": ..., "train": ...}, build)   # build(tmp_dir) writes files
    path = finished("my-stage", {"task": ..., "train": ...})          # the finished artifact, or None

Registered stages (`rlhfzoo.interfaces.Stage`) are built and read through `rlhfzoo.stages`,
which keys each artifact by the stage's name and its `key(task)`.

An artifact is a directory `<cache>/<stage>/<key>/` where key hashes the stage's config and the
code version. It is built in a temporary sibling directory and moved into place with one
`os.replace`, after a `MANIFEST.json` listing every file's size and SHA-256 has been written, so
a killed build never leaves something that looks finished. On reuse the manifest is checked;
a corrupt or partial artifact is rebuilt. A file lock serialises concurrent builders. A build
killed outright (`kill -9`) leaves its temporary directory; the next use of the same key removes
it, holding the key's lock, so that no live builder's directory is ever touched.

The cache root is `$RLHFZOO_CACHE`, else `~/.cache/rlhfzoo`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from rlhfzoo import __version__
from rlhfzoo.config import config_hash

MANIFEST = "MANIFEST.json"
# Bump when a stage's output would change for the same config.
CODE_VERSION = f"{__version__}-1"


def cache_root() -> Path:
    root = os.environ.get("RLHFZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlhfzoo")
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, meta: dict[str, Any]) -> None:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(directory))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    (directory / MANIFEST).write_text(json.dumps({"meta": meta, "files": files}, indent=1, default=str))


def verify(directory: Path) -> bool:
    """True when the directory holds a manifest and every listed file matches it."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        for rel, info in manifest["files"].items():
            p = directory / rel
            if not p.is_file() or p.stat().st_size != info["size"] or _sha256(p) != info["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _leftover_builds(final: Path) -> list[Path]:
    return list(final.parent.glob(f".{final.name}.tmp-*"))


def _remove_leftover_builds(final: Path) -> None:
    """Delete the temporary directories of earlier builds of this key. Call it only while holding
    the key's lock: a builder makes its directory under the lock and renames or deletes it before
    letting go, so any that is left then belongs to a builder that was killed."""
    for tmp in _leftover_builds(final):
        shutil.rmtree(tmp, ignore_errors=True)


def artifact_path(stage: str, config: Any) -> Path:
    return cache_root() / stage / config_hash({"config": config, "code": CODE_VERSION})


def finished(stage: str, config: Any) -> Path | None:
    """The directory of the finished artifact of this key, or None; never builds anything."""
    final = artifact_path(stage, config)
    return final if verify(final) else None


def artifact(stage: str, config: Any, build: Callable[[Path], None], log: Callable[[str], None] | None = print) -> Path:
    """Return the directory of a finished artifact, building it first if needed."""
    final = artifact_path(stage, config)
    lock = final.parent / f".{final.name}.lock"
    if verify(final):
        if _leftover_builds(final):  # a build killed before another one finished the key
            with _locked(lock):
                _remove_leftover_builds(final)
        return final
    with _locked(lock):
        _remove_leftover_builds(final)
        if verify(final):  # another process built it while we waited
            return final
        if final.exists():
            if log:
                log(f"[rlhfzoo] cached {stage} artifact at {final} is incomplete or corrupt; rebuilding it")
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            start = time.time()
            build(tmp)
            write_manifest(tmp, {"stage": stage, "config": config, "code": CODE_VERSION, "seconds": time.time() - start})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST).read_text())["meta"]
