"""The stage cache: build once, reuse, and clean up what killed builds leave behind."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhfzoo import artifacts


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def build_file(tmp: Path) -> None:
    (tmp / "out.txt").write_text("built")


def leftovers(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in stage_dir.iterdir() if ".tmp-" in p.name)


def test_builds_once_and_reuses(cache):
    calls = []

    def build(tmp):
        calls.append(tmp)
        build_file(tmp)

    first = artifacts.artifact("stage", {"a": 1}, build, log=None)
    again = artifacts.artifact("stage", {"a": 1}, build, log=None)
    assert first == again and len(calls) == 1 and (first / "out.txt").read_text() == "built"


def test_a_killed_build_leaves_nothing_behind_after_the_next_build(cache):
    """`kill -9` during a build leaves its `.<key>.tmp-*` directory; the next build of the key
    (holding the key's lock, so no live builder owns it) removes it."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from rlhfzoo import artifacts
        def build(tmp):
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        artifacts.artifact("stage", {"a": 1}, build, log=None)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RLHFZOO_CACHE": str(cache)}, timeout=120)
    assert r.returncode == -signal.SIGKILL
    stage_dir = cache / "stage"
    final = artifacts.artifact_path("stage", {"a": 1})
    assert leftovers(stage_dir) and not final.exists()  # what the kill left

    other = stage_dir / f".{'0' * 16}.tmp-keep"  # another key's build: not provably stale, kept
    other.mkdir()
    path = artifacts.artifact("stage", {"a": 1}, build_file, log=None)
    assert path == final and artifacts.verify(path)
    assert leftovers(stage_dir) == [other.name]


def test_leftovers_of_a_finished_key_are_removed_on_reuse(cache):
    final = artifacts.artifact("stage", {"a": 1}, build_file, log=None)
    stale = final.parent / f".{final.name}.tmp-dead"  # a builder killed before another finished the key
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    assert artifacts.artifact("stage", {"a": 1}, build_file, log=None) == final
    assert not stale.exists() and (final / "out.txt").read_text() == "built"


def test_finished_reads_without_building(cache):
    assert artifacts.finished("stage", {"a": 1}) is None and not cache.exists()  # nothing created
    path = artifacts.artifact("stage", {"a": 1}, build_file, log=None)
    assert artifacts.finished("stage", {"a": 1}) == path and artifacts.finished("stage", {"a": 2}) is None
    (path / "out.txt").write_text("changed")  # a corrupt artifact is not a finished one
    assert artifacts.finished("stage", {"a": 1}) is None
