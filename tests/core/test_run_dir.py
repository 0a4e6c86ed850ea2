"""The run directory: what --overwrite may delete, unusable output_dirs (a file, under a file,
read-only, disk full), and the bookkeeping of --resume (metrics.jsonl, summary.json, config.yaml,
stale temporary checkpoints). Tiny scratch SFT runs of a few steps."""

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from rlhfzoo.cli import main as cli_main
from rlhfzoo.config import load_config
from rlhfzoo.testing import contract_config
from rlhfzoo.trainer import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sft(out, **train):
    data = contract_config("sft", out, reward=None)
    data["train"].update(train)
    return load_config(data=data)


def run(out, resume=False, overwrite=False, logs=None, **train):
    log = logs.append if logs is not None else (lambda *_: None)
    return Trainer(sft(out, **train), log=log).fit(resume=resume, overwrite=overwrite)


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def config_file(tmp_path, out):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(contract_config("sft", out, reward=None)))
    return str(path)


# ------------------------------------------------------------------------------ --overwrite


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my_notes.txt").write_text("precious")
    code = cli_main(["train", config_file(tmp_path, mine), f"output_dir={mine}", "--overwrite"])
    assert code == 2
    assert (mine / "my_notes.txt").read_text() == "precious"
    with pytest.raises(TrainingError, match=r"my_notes\.txt.*not a run"):
        run(mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["my_notes.txt"]
    with pytest.raises(TrainingError, match=r"is not a run \(it holds my_notes\.txt\); choose a new or empty output_dir"):
        run(mine)


def test_overwrite_refuses_a_run_holding_other_files_and_names_them(tmp_path):
    out = tmp_path / "run"
    run(out, steps=1)
    for i in range(7):
        (out / f"notes-{i}.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"notes-0\.txt, notes-1\.txt, .* and 2 more"):
        run(out, overwrite=True)
    assert len(list(out.glob("notes-*.txt"))) == 7 and (out / "summary.json").exists()


def test_overwrite_refuses_foreign_files_inside_checkpoints(tmp_path):
    out = tmp_path / "run"
    run(out, steps=2, save_every=1)
    (out / "checkpoints" / "thesis.tex").write_text("mine")
    with pytest.raises(TrainingError, match=r"checkpoints/thesis\.tex"):
        run(out, overwrite=True)
    assert (out / "checkpoints" / "thesis.tex").exists() and (out / "summary.json").exists()


def test_overwrite_replaces_a_run_and_its_leftover_temporary_files(tmp_path):
    out = tmp_path / "run"
    run(out, steps=2, save_every=1)
    (out / ".policy.tmp").mkdir()
    (out / ".summary.json.tmp").write_text("{")
    (out / "checkpoints" / ".tmp-step-000009").mkdir()
    run(out, overwrite=True, steps=1)
    assert steps_logged(out) == [1]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "policy", "summary.json"]


def test_lock_files_are_kept_and_do_not_count_as_contents(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("4242")  # e.g. `rlhfzoo bench` locks a run directory its worker owns
    run(out, steps=1)
    run(out, steps=1, overwrite=True)
    assert (out / ".lock").read_text() == "4242" and (out / "summary.json").exists()


# ------------------------------------------------------------------------------ unusable output_dir


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    with pytest.raises(TrainingError, match=rf"output_dir {a_file} is a file"):
        run(a_file)
    with pytest.raises(TrainingError, match=rf"{a_file} is a file"):
        run(a_file / "run")
    assert a_file.read_text() == "mine"
    assert cli_main(["train", config_file(tmp_path, a_file / "run")]) == 2


def mount_tmpfs(path: Path, options: str) -> None:
    """Mount a small tmpfs at `path` (needs root); skip the test where that is not possible."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); the test needs root")


@pytest.fixture
def mounts():
    mounted: list[Path] = []
    yield mounted
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)  # lazy: a failed test may still hold a file open


def test_read_only_output_dir(tmp_path, mounts):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
        mount_tmpfs(ro, "ro,size=64k")
        mounts.append(ro)
    else:
        ro.mkdir()
        ro.chmod(0o555)
    with pytest.raises(TrainingError, match=rf"{ro}.*(read-only|permission denied).*writable"):
        run(ro / "run")
    with pytest.raises(TrainingError, match=rf"{ro}.*(read-only|permission denied).*writable"):
        run(ro)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, mounts):
    # Size a tmpfs that holds the run and one checkpoint but not a second one.
    probe = tmp_path / "probe"
    run(probe, steps=3, stop_after=1)
    pages = sum(-(-p.stat().st_size // 4096) for p in (probe / "checkpoints").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    mount_tmpfs(disk, f"size={(pages * 3 // 2 + 4) * 4096}")
    mounts.append(disk)
    out = disk / "run"
    with pytest.raises(TrainingError, match=rf"disk holding output_dir {out} is full.*--resume"):
        run(out, steps=3, save_every=1, keep_checkpoints=3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert not (out / "summary.json").exists()


def test_disk_full_in_any_checkpoint_file_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(sft(out, steps=3, save_every=1), log=lambda *_: None)
    real_save = trainer.policy.save_weights

    def save_weights(file):
        real_save(file)
        if trainer.step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)

    monkeypatch.setattr(trainer.policy, "save_weights", save_weights)
    with pytest.raises(TrainingError, match=r"is full"):
        trainer.fit()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]


# ------------------------------------------------------------------------------ --resume bookkeeping


def test_resume_without_a_checkpoint_starts_the_metrics_over(tmp_path):
    out = tmp_path / "run"
    run(out, steps=3)
    logs: list[str] = []
    run(out, resume=True, logs=logs, steps=3)
    assert any("no complete checkpoint" in line for line in logs)
    assert steps_logged(out) == [1, 2, 3]


def test_resume_tolerates_a_torn_last_metrics_line(tmp_path):
    out = tmp_path / "run"
    run(out, steps=4, stop_after=2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a write
    logs: list[str] = []
    summary = run(out, resume=True, logs=logs, steps=4)
    assert summary["finished"] and steps_logged(out) == [1, 2, 3, 4]
    assert any("metrics.jsonl" in line and "unreadable" in line for line in logs)


def test_resume_rewrites_metrics_by_replacing_the_file(tmp_path):
    """A new file moved into place (not truncated and rewritten): a kill leaves the old or the new one."""
    out = tmp_path / "run"
    run(out, steps=4, stop_after=2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n')
    before = (out / "metrics.jsonl").stat().st_ino
    with open(out / "metrics.jsonl") as held:  # still reads the old contents after the swap
        run(out, resume=True, steps=4)
        assert [json.loads(line)["step"] for line in held.read().splitlines()] == [1, 2, 3]
    assert (out / "metrics.jsonl").stat().st_ino != before
    assert steps_logged(out) == [1, 2, 3, 4]


def rewrite_checkpoint(ckpt: Path, **state) -> None:
    from rlhfzoo import artifacts

    meta = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**meta, **state}))
    (ckpt / artifacts.MANIFEST).unlink()
    artifacts.write_manifest(ckpt, {"step": meta["step"]})


def test_a_resume_that_fails_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    run(out, steps=4, save_every=2)
    rewrite_checkpoint(out / "checkpoints" / "step-000002", world=2)
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="2 processes"):
        run(out, resume=True, steps=4, save_every=2)
    assert (out / "summary.json").exists() and (out / "metrics.jsonl").read_text() == metrics


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path):
    out = tmp_path / "run"
    run(out, steps=4, stop_after=2)
    stored = (out / "config.yaml").read_text()
    with pytest.raises(TrainingError, match=r"train\.batch_size: 4 -> 2; train\.lr: 0\.001 -> 0\.01.*--overwrite"):
        run(out, resume=True, steps=4, lr=1e-2, batch_size=2)
    assert (out / "config.yaml").read_text() == stored
    # More steps, another stopping point, another logging interval: the same run, continued.
    summary = run(out, resume=True, steps=5, stop_after=2, log_every=2, progress=True)
    assert summary == {"finished": False, "step": 4}
    assert "steps: 5" in (out / "config.yaml").read_text()


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    out = tmp_path / "run"
    run(out, steps=4, stop_after=2)
    stale = out / "checkpoints" / ".tmp-step-000003"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    run(out, resume=True, steps=4)
    assert not stale.exists()
