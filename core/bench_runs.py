"""Running one `rlhfzoo bench` row in its own worker process, safely.

Each run executes in `python -m rlhfzoo.bench --worker <run dir>/spec.json`, so a crash is
contained (its row is marked failed) and its peak memory is its own; `bench_launch` decides
where and how many at once (`execute` here is one run, start to end). Two guarantees keep a
run directory owned by exactly one live worker:

- **The run directory is locked while a worker owns it.** The process that starts the worker
  (the bench; with `--launcher ray`, the Ray task running `execute` on its node, the bench
  holding nothing meanwhile) takes an exclusive, non-blocking `flock` on `<run dir>/.lock`
  before touching the directory, and hands that lock to its worker (the same open file), so
  the lock lasts until both are gone. A second bench on the same `--out` that finds a
  directory locked leaves it alone and marks the row failed ("in use", naming the process); a
  worker started by hand on a locked directory refuses.
- **A worker dies with its parent**, even on `kill -9`: on Linux the kernel kills it the
  moment the parent dies (the worker asks for it first thing, `prctl(PR_SET_PDEATHSIG,
  SIGKILL)`, then checks that the parent has not died already); everywhere, a watchdog thread
  in the worker stops it within a second of its parent's death (its parent process id changes).
  The worker does this itself rather than in a `preexec_fn`, which is unsafe in a process with
  threads (the bench's progress bar has one). The parent is the bench, or with Ray the Ray
  worker process running the task, which Ray ends when the task is cancelled or the bench ends.

POSIX only (`fcntl`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from rlhfzoo.bench_plan import BenchError, RunSpec

LOCK_FILE = ".lock"  # in every run directory; holds the pid of its last owner
WATCH_INTERVAL = 0.5  # seconds between the watchdog's checks of the parent
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# ------------------------------------------------------------------------------------ the lock


class RunBusy(BenchError):
    """The run directory is locked by another process (a bench or its worker)."""


class RunLock:
    """An exclusive lock on a run directory, held while its lock file is open.

    `RunLock(directory)` opens (creating) the lock file; `RunLock(directory, fd)` takes over an
    inherited open lock file, as a worker does from its bench. `acquire` never waits: a
    directory locked by another process raises `RunBusy`."""

    def __init__(self, directory: str | Path, fd: int | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.fd = fd

    def acquire(self) -> RunLock:
        inherited = self.fd is not None
        fd = self.fd if inherited else os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if inherited and not same_file(fd, self.path):
            raise BenchError(f"file descriptor {fd} is not the lock file {self.path}; start workers through `rlhfzoo bench`.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # on an inherited, already locked file: a no-op
        except BlockingIOError:
            if not inherited:
                os.close(fd)
            holder = self.holder()
            raise RunBusy(
                f"the run directory {self.directory} is in use by another bench worker"
                + (f" (process {holder})" if holder else "")
                + "; wait for it to finish, or stop that process, then run the command again."
            ) from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def holder(self) -> int | None:
        """The pid the lock file names, if any."""
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Close the lock file: the lock is free once no process holds it open any more."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ------------------------------------------------------------------------------------ dying with the parent


def die_with_parent(parent_pid: int) -> None:
    """In a worker started by the bench `parent_pid`: end this process when the bench ends."""
    request_death_signal()
    if os.getppid() != parent_pid:  # the bench died before the request took effect
        stop_orphan(parent_pid)
    watch_parent(parent_pid, lambda: stop_orphan(parent_pid))


def request_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux's `PR_SET_PDEATHSIG`;
    strictly, when the parent's thread that started it ends, which is why the bench starts
    workers from its main thread). False where that does not exist."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return False
    return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def watch_parent(parent_pid: int, on_gone: Callable[[], Any], interval: float = WATCH_INTERVAL) -> threading.Thread:
    """Call `on_gone` from a background thread once the parent `parent_pid` is gone (an orphan's
    parent pid changes to whichever process adopts it). Works on every POSIX system."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        on_gone()

    thread = threading.Thread(target=watch, name="bench-parent-watchdog", daemon=True)
    thread.start()
    return thread


def stop_orphan(parent_pid: int) -> None:
    print(f"error: the bench (process {parent_pid}) that started this worker is gone; stopping.", file=sys.stderr, flush=True)
    os._exit(1)


# ------------------------------------------------------------------------------------ one run (in the bench)


def read_spec(path: str | Path) -> RunSpec:
    return RunSpec(**json.loads(Path(path).read_text()))


def same_spec(path: Path, spec: RunSpec) -> bool:
    """Whether a finished run was made from this very spec (a changed config or budget reruns it).
    A field added to `RunSpec` since the run was made counts at its default, so finished runs
    survive an upgrade that does not change what they did."""
    try:
        made = RunSpec(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return json.loads(json.dumps(asdict(made))) == json.loads(json.dumps(asdict(spec)))


def worker_args(spec_path: Path) -> list[str]:
    """The worker's command line after the interpreter. The launchers add `--lock-fd` and
    `--parent-pid`; `bench_launch.run_all` takes a stand-in (tests give it a script)."""
    return ["-m", "rlhfzoo.bench", "--worker", str(spec_path)]


def worker_env(threads: int | None, variables: dict[str, str] | None = None) -> dict[str, str] | None:
    """The worker's environment: this process's, plus `variables`, with `threads` CPU threads
    (OMP_NUM_THREADS, MKL_NUM_THREADS: torch's intra-op default). None: this process's as is."""
    if threads is None and not variables:
        return None
    env = {**os.environ, **(variables or {})}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def start_worker(spec_path: Path, lock: RunLock, log, env: dict[str, str] | None = None, args: list[str] | None = None) -> subprocess.Popen:
    """Start the worker on `spec_path`, handing it the run directory's lock, with its output to
    `log`. Call it from the main thread (see `request_death_signal`)."""
    command = [sys.executable, *(args or worker_args(spec_path)), "--lock-fd", str(lock.fd), "--parent-pid", str(os.getpid())]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock.fd,), env=env)


def wait_or_kill(proc: subprocess.Popen) -> int:
    """The worker's exit status; killed (and reaped) if this process is interrupted meanwhile."""
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def lock_run(spec: RunSpec) -> RunLock | dict[str, Any]:
    """The run directory, created and locked for this bench; or, where another holds it, the row
    that says so (a failed row, the directory left untouched)."""
    d = Path(spec.directory)
    d.mkdir(parents=True, exist_ok=True)
    lock = RunLock(d)
    try:
        return lock.acquire()
    except RunBusy as e:
        return busy_row(spec, e)


def execute(spec: RunSpec, force: bool, env: dict[str, str] | None = None, args: list[str] | None = None) -> dict[str, Any]:
    """One row's result: reused when finished from the same spec, else run by a worker (with
    `env` and the command line `args`, as `start_worker`). A run directory locked by another
    bench is left untouched and its row marked failed."""
    d = Path(spec.directory)
    lock = lock_run(spec)
    if isinstance(lock, dict):
        return lock
    try:
        reused = prepare(spec, force)
        if reused is not None:
            return reused
        with open(d / "log.txt", "w") as log:
            returncode = wait_or_kill(start_worker(d / "spec.json", lock, log, env, args))
        return finish(spec, returncode)
    finally:
        lock.release()


def busy_row(spec: RunSpec, error: RunBusy) -> dict[str, Any]:
    """The failed row of a run whose directory another bench holds."""
    return {"label": spec.label, "name": spec.name, "seed": spec.seed, "kind": spec.kind, "status": "failed", "error": str(error)}


def reusable(spec: RunSpec) -> dict[str, Any] | None:
    """The run's finished result, marked reused, when it was made from this very spec."""
    d = Path(spec.directory)
    done = d / "result.json"
    if done.exists() and same_spec(d / "spec.json", spec):
        result = json.loads(done.read_text())
        if result.get("status") == "ok":
            result["reused"] = True
            return result
    return None


def prepare(spec: RunSpec, force: bool) -> dict[str, Any] | None:
    """Holding the run directory's lock: the finished result to reuse (unless `force`), else None
    once the directory is ready for a worker (its old result gone, spec.json written)."""
    reused = None if force else reusable(spec)
    if reused is not None:
        return reused
    d = Path(spec.directory)
    (d / "result.json").unlink(missing_ok=True)
    (d / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return None


def finish(spec: RunSpec, returncode: int) -> dict[str, Any]:
    """Holding the run directory's lock, its worker gone: the run's result, or its row marked
    failed (and failed.json written). A worker stopped by Ctrl-C raises KeyboardInterrupt."""
    d = Path(spec.directory)
    done = d / "result.json"
    if returncode == 0 and done.exists():
        return json.loads(done.read_text())
    if returncode in (-2, 130):  # Ctrl-C reached the worker too
        raise KeyboardInterrupt
    failed = {
        "label": spec.label, "name": spec.name, "seed": spec.seed, "kind": spec.kind,
        "status": "failed", "error": failure_message(d / "log.txt"), "log": str(d / "log.txt"),
    }
    (d / "failed.json").write_text(json.dumps(failed, indent=1))
    return failed


def failure_message(log: Path) -> str:
    """What a failed worker's log says went wrong: its `error: ...` message (a user error), else
    the last line naming an error, else its last line."""
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    for i, line in enumerate(tail):
        if line.startswith("error: "):  # the message may go on over several lines
            return " ".join(x.strip() for x in [line[len("error: "):], *tail[i + 1 :]] if x.strip())
    return next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "no output").strip()
