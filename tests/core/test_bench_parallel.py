"""`rlhfzoo bench --jobs N --launcher local|ray`: runs at the same time, results in the specs'
order, a crashing run a failed row, finished runs reused, a locked directory refused, Ctrl-C
stopping the workers under way, each worker's threads set through its environment.

The runs here are a stand-in worker (a plain Python script given as `run_all`'s `command`) that
sleeps, records what it saw and writes result.json as the real worker does, so nothing trains."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from rlhfzoo.bench import BenchError, RunSpec, build_parser, plan
from rlhfzoo.bench_launch import RunsInterrupted, cores, run_all, threads_per_run
from rlhfzoo.bench_runs import RunBusy, RunLock
from rlhfzoo.cli import main as cli_main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

FAKE_WORKER = r"""
import argparse, ctypes, fcntl, json, os, signal, sys, time
p = argparse.ArgumentParser()
p.add_argument("spec")
p.add_argument("--lock-fd", type=int)
p.add_argument("--parent-pid", type=int)
a = p.parse_args()
spec = json.load(open(a.spec))
fake, d = spec["config"]["fake"], spec["directory"]
start = time.time()
if fake.get("die_with_parent"):
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL, 0, 0, 0)
probe = os.open(os.path.join(d, ".lock"), os.O_RDWR)
try:
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    locked = False
except BlockingIOError:
    locked = True  # held for this worker
threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
if fake.get("sigint"):  # as Ctrl-C would end it, even where SIGINT is ignored (a job started in the background)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
time.sleep(fake.get("sleep", 0))
if fake.get("crash"):
    print("Traceback (most recent call last):\nerror: boom in " + spec["label"], file=sys.stderr)
    sys.exit(1)
result = {k: spec[k] for k in ("label", "name", "seed", "kind")}
result.update(status="ok", start=start, end=time.time(), threads=threads, locked=locked, holder=open(os.path.join(d, ".lock")).read().strip(),
              handed_lock=a.lock_fd is not None, parent=a.parent_pid, worker=os.getpid())
with open(os.path.join(d, ".result.json.tmp"), "w") as f:
    json.dump(result, f)
os.replace(os.path.join(d, ".result.json.tmp"), os.path.join(d, "result.json"))
"""


@pytest.fixture
def fake(tmp_path):
    """The stand-in worker's command line, as `run_all` takes it."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return lambda spec_path: [str(script), str(spec_path)]


def spec(root: Path, label: str, seed: int = 0, **fake) -> RunSpec:
    return RunSpec(label, label, "objective", seed, {"fake": fake}, str(root / "runs" / label / f"seed-{seed}"), 0)


def recorder():
    events: list[tuple[str, str]] = []
    return events, lambda s, result: events.append(("start" if result is None else "end", s.label))


def worker_processes(directory: str) -> list[int]:
    """Live worker processes of the run in `directory` (their command line names its spec.json)."""
    text, found = str(Path(directory) / "spec.json"), []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                stat = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if stat not in ("Z", "X"):
                    found.append(int(cmdline.parent.name))
        except (OSError, IndexError):
            continue
    return found


def lockable(directory) -> bool:
    try:
        RunLock(directory).acquire().release()
    except RunBusy:
        return False
    return True


def test_threads_per_run_by_hand():
    assert threads_per_run(8, 1) == 8 and threads_per_run(8, 3) == 2 and threads_per_run(2, 3) == 1


def test_jobs_2_runs_two_at_a_time_and_returns_results_in_spec_order(tmp_path, fake):
    specs = [spec(tmp_path, "a", sleep=1.5), spec(tmp_path, "b", sleep=0.2), spec(tmp_path, "c", sleep=0.2), spec(tmp_path, "d", sleep=0.2)]
    events, progress = recorder()
    results = run_all(specs, force=False, jobs=2, progress=progress, command=fake)

    assert [r["label"] for r in results] == ["a", "b", "c", "d"] and all(r["status"] == "ok" for r in results)
    ends = [label for kind, label in events if kind == "end"]
    assert sorted(ends) == ["a", "b", "c", "d"] and ends[0] != "a"  # b, c, d ran beside a and ended first
    for r in results:
        at_once = sum(o["start"] <= r["start"] < o["end"] for o in results)
        assert at_once <= 2, (r["label"], at_once)
    a, b = results[0], results[1]
    assert b["start"] < a["end"] and a["start"] < b["end"]  # a and b overlapped
    expected = str(max(1, cores() // 2))
    assert all(r["threads"] == {"OMP_NUM_THREADS": expected, "MKL_NUM_THREADS": expected} for r in results)
    assert all(r["locked"] and r["handed_lock"] and r["holder"] == str(os.getpid()) and r["parent"] == os.getpid() for r in results)
    assert all(lockable(s.directory) for s in specs)  # every lock released


@pytest.mark.parametrize("jobs", [1, 3])
def test_each_worker_gets_cores_over_jobs_threads(tmp_path, fake, jobs):
    [result] = run_all([spec(tmp_path, "a")], force=False, jobs=jobs, command=fake)
    expected = str(max(1, cores() // jobs))
    assert result["threads"] == {"OMP_NUM_THREADS": expected, "MKL_NUM_THREADS": expected}


def test_a_crashing_run_is_a_failed_row_and_the_others_finish(tmp_path, fake):
    specs = [spec(tmp_path, "a", sleep=0.3), spec(tmp_path, "boom", crash=True), spec(tmp_path, "c", sleep=0.3)]
    results = run_all(specs, force=False, jobs=2, command=fake)
    assert [r["status"] for r in results] == ["ok", "failed", "ok"]
    failed = results[1]
    assert failed["label"] == "boom" and failed["error"] == "boom in boom" and failed["log"] == str(Path(specs[1].directory) / "log.txt")
    assert json.loads((Path(specs[1].directory) / "failed.json").read_text()) == failed
    assert not (Path(specs[1].directory) / "result.json").exists()


def test_finished_runs_are_reused_and_a_changed_or_forced_run_reruns(tmp_path, fake):
    specs = [spec(tmp_path, "a", sleep=0.1), spec(tmp_path, "b", sleep=0.1)]
    first = run_all(specs, force=False, jobs=2, command=fake)
    stamps = [(Path(s.directory) / "result.json").stat().st_mtime_ns for s in specs]

    events, progress = recorder()
    again = run_all(specs, force=False, jobs=2, progress=progress, command=fake)
    assert all(r["reused"] for r in again) and [r["worker"] for r in again] == [r["worker"] for r in first]
    assert events == [("end", "a"), ("end", "b")]  # no worker started
    assert [(Path(s.directory) / "result.json").stat().st_mtime_ns for s in specs] == stamps

    changed = [specs[0], replace(specs[1], config={"fake": {"sleep": 0.0}})]
    rerun = run_all(changed, force=False, jobs=2, command=fake)
    assert rerun[0].get("reused") and not rerun[1].get("reused") and rerun[1]["worker"] != first[1]["worker"]

    forced = run_all(changed, force=True, jobs=2, command=fake)
    assert not any(r.get("reused") for r in forced) and forced[0]["worker"] != first[0]["worker"]


def test_a_locked_run_directory_is_a_failed_row_and_left_untouched(tmp_path, fake):
    specs = [spec(tmp_path, "a"), spec(tmp_path, "b"), spec(tmp_path, "c")]
    held = Path(specs[1].directory)
    held.mkdir(parents=True)
    with RunLock(held):  # another bench's worker owns b
        results = run_all(specs, force=True, jobs=2, command=fake)
    assert [r["status"] for r in results] == ["ok", "failed", "ok"]
    assert f"the run directory {held} is in use by another bench worker (process {os.getpid()})" in results[1]["error"]
    assert sorted(p.name for p in held.iterdir()) == [".lock"]  # no spec, log or result written


def test_ctrl_c_stops_the_workers_under_way_and_keeps_finished_runs(tmp_path, fake):
    specs = [spec(tmp_path, "a", sleep=0.5), spec(tmp_path, "b", sleep=60), spec(tmp_path, "c", sleep=60)]

    def ctrl_c_after_a(s, result):
        if result is not None and s.label == "a":
            raise KeyboardInterrupt

    begun = time.monotonic()
    with pytest.raises(RunsInterrupted) as e:
        run_all(specs, force=False, jobs=2, progress=ctrl_c_after_a, command=fake)
    assert e.value.finished == 1 and time.monotonic() - begun < 30
    assert (Path(specs[0].directory) / "result.json").exists()  # kept
    assert not (Path(specs[1].directory) / "result.json").exists() and not (Path(specs[1].directory) / "failed.json").exists()
    assert not worker_processes(specs[1].directory) and lockable(specs[1].directory)  # b's worker killed, its lock free
    assert not Path(specs[2].directory).exists()  # c never started

    # Ctrl-C that reached a worker (it ends by SIGINT) stops the bench too
    with pytest.raises(RunsInterrupted) as e:
        run_all([spec(tmp_path, "x", sigint=True), spec(tmp_path, "y", sleep=60)], force=True, jobs=2, command=fake)
    assert e.value.finished == 0 and not worker_processes(str(tmp_path / "runs" / "y"))


def test_jobs_below_1_is_refused(tmp_path, capsys):
    with pytest.raises(BenchError, match=r"^--jobs must be at least 1 \(runs at the same time\), got 0\.$"):
        plan(build_parser().parse_args(["--algorithms", "dpo", "--jobs", "0", "--out", str(tmp_path / "b")]))
    assert cli_main(["bench", "--algorithms", "dpo", "--jobs", "-1", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith("error: --jobs must be at least 1")
    assert not (tmp_path / "b").exists()


def test_launcher_ray_without_ray_is_one_message_before_any_run(tmp_path, capsys, monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    out = tmp_path / "b"
    assert cli_main(["bench", "--algorithms", "dpo", "--launcher", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --launcher ray needs Ray") and "pip install 'rlhfzoo[ray]'" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(BenchError, match=r"pip install 'rlhfzoo\[ray\]'"):
        run_all([spec(tmp_path, "a")], force=False, launcher="ray", command=fake)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- slower: Ray, kill -9


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_ray_launcher_gives_the_local_launchers_results(tmp_path, fake, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)  # relative run directories, as with a relative --out: the tasks run in the bench's directory
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    specs = [spec(Path("."), "a", sleep=0.3), spec(Path("."), "boom", crash=True), spec(Path("."), "c", sleep=0.3)]
    local = run_all(specs, force=False, jobs=2, command=fake)
    for s in specs:
        for f in Path(s.directory).iterdir():
            f.unlink()

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        events, progress = recorder()
        remote = run_all(specs, force=False, jobs=2, launcher="ray", progress=progress, command=fake)
        again = run_all(specs, force=False, jobs=2, launcher="ray", command=fake)
        with RunLock(specs[2].directory):
            [locked] = run_all([specs[2]], force=True, jobs=1, launcher="ray", command=fake)
        assert ray.is_initialized()  # a connection the caller made is left to the caller
    finally:
        ray.shutdown()

    def same(r):  # what does not depend on where or when the run ran
        keys = ("label", "name", "seed", "kind", "status") + (("threads", "locked", "handed_lock") if r["status"] == "ok" else ("error", "log"))
        return {k: r[k] for k in keys}

    assert [same(r) for r in remote] == [same(r) for r in local]
    assert remote[0]["threads"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 CPUs // 2 jobs
    assert all(r["holder"] != str(os.getpid()) and r["parent"] != os.getpid() for r in remote if r["status"] == "ok")  # the task's process
    assert sorted(events) == sorted([(kind, x) for kind in ("start", "end") for x in ("a", "boom", "c")])
    assert json.loads((Path(specs[1].directory) / "failed.json").read_text())["error"] == "boom in boom"
    assert [r.get("reused", False) for r in again] == [True, False, True]  # a failed run is run again
    assert locked["status"] == "failed" and "in use by another bench worker" in locked["error"]


KILLED_BENCH = """
import json, sys
from rlhfzoo.bench_launch import run_all
from rlhfzoo.bench_runs import RunSpec
script, specs = sys.argv[1], [RunSpec(**s) for s in json.loads(sys.argv[2])]
run_all(specs, force=True, jobs=2, command=lambda p: [script, str(p)])
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_9_of_a_bench_with_jobs_2_kills_both_workers(tmp_path, fake):
    specs = [spec(tmp_path, x, sleep=600, die_with_parent=True) for x in ("a", "b")]
    script = fake(Path("x"))[0]
    bench = subprocess.Popen([sys.executable, "-c", KILLED_BENCH, script, json.dumps([asdict(s) for s in specs])])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(worker_processes(s.directory) for s in specs):
            time.sleep(0.1)
        assert all(worker_processes(s.directory) for s in specs), "the bench did not start both workers"
        time.sleep(0.3)  # past the workers' prctl
        os.kill(bench.pid, signal.SIGKILL)
        bench.wait(10)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and any(worker_processes(s.directory) for s in specs):
            time.sleep(0.1)
        assert not any(worker_processes(s.directory) for s in specs), "a worker outlived its bench"
        assert all(lockable(s.directory) for s in specs)
    finally:
        for s in specs:
            for pid in worker_processes(s.directory):
                os.kill(pid, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
        bench.wait(10)


def test_the_fake_worker_probe_sees_a_held_lock(tmp_path):
    """The stand-in's `locked` is a real check: a lock held elsewhere blocks a fresh flock."""
    d = tmp_path / "d"
    d.mkdir()
    with RunLock(d):
        probe = os.open(d / ".lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
