"""Running bench rows: a worker dies with its bench parent (even on `kill -9`), and a run
directory is locked while a worker owns it, so a second bench on the same directory refuses
the row instead of running on it."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from rlhfzoo.bench import RunLock, RunSpec, execute
from rlhfzoo.bench_runs import RunBusy
from rlhfzoo.testing import contract_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def endless_spec(d: Path) -> RunSpec:
    """A real run that trains a tiny model for a million steps: its worker runs until stopped."""
    config = contract_config("sft", d / "train", reward=None)
    config["train"]["steps"] = 1_000_000
    return RunSpec("sft", "sft", "objective", 0, config, str(d), 0)


def state(pid: int) -> str | None:
    """The process's state letter, None once it is gone (a zombie counts as gone)."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if s in ("Z", "X") else s


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            kids.append(int(stat.parent.name))
    return kids


def wait_for(condition, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return condition()


def lockable(directory) -> bool:
    try:
        RunLock(directory).acquire().release()
    except RunBusy:
        return False
    return True


PARENT = "import json, sys\nfrom rlhfzoo.bench import RunSpec, execute\nexecute(RunSpec(**json.loads(sys.argv[1])), force=True)\n"


@pytest.mark.slow
@pytest.mark.timeout(300)  # a regression would otherwise wait on an endless run
def test_kill_9_of_the_bench_parent_kills_its_worker_and_a_rerun_meanwhile_is_refused(tmp_path):
    spec = endless_spec(tmp_path / "run")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(asdict(spec))])
    worker = None
    try:
        kids = wait_for(lambda: children(parent.pid), 60)
        assert kids, "the bench started no worker"
        worker = kids[0]
        owner = RunLock(spec.directory).holder
        assert wait_for(lambda: owner() == worker, 60), "the worker never took over its run directory"  # it is under way

        rerun = execute(spec, force=True)  # a second bench on the same --out, meanwhile
        assert rerun["status"] == "failed" and f"in use by another bench worker (process {worker})" in rerun["error"], rerun

        assert state(worker) is not None
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert wait_for(lambda: state(worker) is None, 8), "the worker outlived its bench parent"
        assert wait_for(lambda: lockable(spec.directory), 5), "the run directory stayed locked"  # its last threads gone too
    finally:
        for pid in [parent.pid, worker]:
            if pid and state(pid) is not None:
                os.kill(pid, signal.SIGKILL)
        parent.wait(10)


def test_a_worker_whose_parent_is_already_gone_stops_before_touching_its_directory(tmp_path):
    """The bench died between starting the worker and the worker's first breath."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "spec.json").write_text(json.dumps(asdict(endless_spec(d))))
    not_my_parent = os.getpid() + 1_000_000
    r = subprocess.run([sys.executable, "-m", "rlhfzoo.bench", "--worker", str(d / "spec.json"), "--parent-pid", str(not_my_parent)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"the bench (process {not_my_parent}) that started this worker is gone" in r.stderr, r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["spec.json"]  # no lock taken, nothing trained


def test_the_watchdog_notices_the_parent_is_gone():
    """The parent-pid watchdog, all a system without Linux's death signal has."""
    import threading

    from rlhfzoo.bench_runs import watch_parent

    alive, gone = threading.Event(), threading.Event()
    watch_parent(os.getppid(), alive.set, interval=0.2)
    watch_parent(os.getppid() + 1_000_000, gone.set, interval=0.05)  # not our parent: as if ours had died
    assert gone.wait(5)
    time.sleep(0.3)
    assert not alive.is_set()


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_a_locked_run_directory_is_refused_by_bench_and_worker(tmp_path):
    d = tmp_path / "run"
    spec = RunSpec("broken", "dpo", "objective", 0, {"algorithm": {"name": "dpo"}}, str(d), 0)  # fails fast if run
    d.mkdir()
    (d / "result.json").write_text('{"status": "ok"}')
    with RunLock(d):  # another bench's worker owns the directory
        row = execute(spec, force=True)
        assert row["status"] == "failed" and "in use" in row["error"] and str(d) in row["error"], row
        assert (d / "result.json").read_text() == '{"status": "ok"}'  # nothing touched
        assert not (d / "log.txt").exists() and not (d / "failed.json").exists()

        (d / "spec.json").write_text(json.dumps(asdict(spec)))
        r = subprocess.run([sys.executable, "-m", "rlhfzoo.bench", "--worker", str(d / "spec.json")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert lockable(d)  # released on exit
