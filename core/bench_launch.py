"""Launching a bench's runs: one after another, several at once on this machine (`--jobs N`), or
as Ray tasks (`--launcher ray`).

`run_all` returns one result per spec, in the specs' order, whatever order the runs finish in.
Every run goes through the same steps as `bench_runs.execute`, so the outputs, resuming (a
run finished from the same spec is reused), crash containment (a failing run is a failed row,
the others finish) and the run-directory lock are the same with every launcher and `--jobs`.

Threads: each run gets `max(1, cores // jobs)` CPU threads, through its worker's environment
(OMP_NUM_THREADS and MKL_NUM_THREADS, which set torch's intra-op threads), never through its
config: the config is part of the spec that decides whether a finished run is reused, and a
run's results do not depend on `--jobs` beyond float nondeterminism (the order of a threaded
sum). A run config's `train.num_threads` still wins inside the trainer.

- `local`: workers are children of the bench, started from its main thread (a worker's death
  signal is tied to the thread that started it); up to `jobs` run at once; `cores` are this
  machine's.
- `ray`: each run is a Ray task (`ray.remote(num_cpus=threads)`, no retries) that runs
  `bench_runs.execute` where Ray puts it: it takes the run directory's lock itself (the bench
  holds none meanwhile, so a row whose directory is locked is still a failed row), starts the
  same worker command as a child of the task's process, and returns the row. The bench connects
  to the cluster at RAY_ADDRESS when set (`ray.init(address=...)`), else starts a Ray instance
  of its own with this machine's cores (`ray.init(address="local", num_cpus=...)`), stopped at
  the end; within a process that already called `ray.init`, that one is used. `cores` are the
  cluster's CPUs, a run's threads at most its smallest node's. The run directories, the bench's
  working directory (when --out is relative) and the artifact cache (RLHFZOO_CACHE, passed on
  with every RLHFZOO_* variable) must be on a filesystem every Ray node mounts at the same path,
  one whose `flock` locks hold across machines (e.g. NFSv4). Ctrl-C cancels the tasks under way,
  which ends their processes and so their workers. Ray is an optional extra (`pip install
  'rlhfzoo[ray]'`).

Ctrl-C with either launcher kills the workers under way (their runs are not finished: the next
bench reruns them) and keeps every finished run, raising `RunsInterrupted`.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from rlhfzoo.bench_plan import BenchError, RunSpec
from rlhfzoo.bench_runs import RunBusy, RunLock, busy_row, execute, finish, lock_run, prepare, reusable, start_worker, worker_args, worker_env

LAUNCHERS = ("local", "ray")
POLL_SECONDS = 0.05  # how often the local launcher looks for finished workers
RAY_EXTRA = "pip install 'rlhfzoo[ray]'"

Progress = Callable[[RunSpec, dict[str, Any] | None], None]  # (spec, None) when a run starts, (spec, result) when it ends


class RunsInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_all`: the workers under way were stopped; `finished` runs are kept."""

    def __init__(self, finished: int):
        super().__init__(f"{finished} runs finished")
        self.finished = finished


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_run(n_cores: int, jobs: int) -> int:
    """CPU threads for each of `jobs` runs at once on `n_cores` CPUs, without oversubscribing them."""
    return max(1, n_cores // jobs)


def run_all(
    specs: list[RunSpec],
    force: bool,
    jobs: int = 1,
    launcher: str = "local",
    progress: Progress | None = None,
    command: Callable[[Path], list[str]] = worker_args,
) -> list[dict[str, Any]]:
    """Every run's result, in the order of `specs`: up to `jobs` at once, on this machine or on
    Ray. `command` is the worker's command line after the interpreter, given its spec.json.
    Call it from the main thread."""
    if launcher not in LAUNCHERS:
        raise BenchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}.")
    run = run_ray if launcher == "ray" else run_local
    return run(specs, force, jobs, progress or (lambda spec, result: None), command)


def bar_progress(bar) -> Progress:
    """A `progress` for `run_all` that advances a tqdm bar as runs end and names the runs under way."""
    under_way: list[str] = []

    def update(spec: RunSpec, result: dict[str, Any] | None) -> None:
        name = f"{spec.label} seed {spec.seed}"
        if result is None:
            under_way.append(name)
        else:
            if name in under_way:
                under_way.remove(name)
            bar.update(1)
        bar.set_postfix_str(", ".join(under_way))

    return update


# ------------------------------------------------------------------------------------ local


class LocalRun:
    """A worker under way on this machine, with the run directory's lock and its log."""

    def __init__(self, spec: RunSpec, lock: RunLock, env: dict[str, str] | None, command: Callable[[Path], list[str]]):
        self.spec, self.lock = spec, lock
        d = Path(spec.directory)
        self.log = open(d / "log.txt", "w")
        try:
            self.proc = start_worker(d / "spec.json", lock, self.log, env, command(d / "spec.json"))
        except BaseException:
            self.log.close()
            raise

    def finish(self, returncode: int) -> dict[str, Any]:
        try:
            self.log.close()
            return finish(self.spec, returncode)
        finally:
            self.lock.release()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.lock.release()


def begin_local(spec: RunSpec, force: bool, env: dict[str, str] | None, command: Callable[[Path], list[str]]) -> dict[str, Any] | LocalRun:
    """A run's result when it needs no worker (its directory in use, or finished already), else
    its worker, started."""
    lock = lock_run(spec)
    if isinstance(lock, dict):
        return lock
    try:
        reused = prepare(spec, force)
        if reused is not None:
            lock.release()
            return reused
        return LocalRun(spec, lock, env, command)
    except BaseException:
        lock.release()
        raise


def run_local(specs: list[RunSpec], force: bool, jobs: int, progress: Progress, command: Callable[[Path], list[str]]) -> list[dict[str, Any]]:
    env = worker_env(threads_per_run(cores(), jobs))
    results: list[dict[str, Any] | None] = [None] * len(specs)
    pending, running = deque(range(len(specs))), {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.popleft()
                started = begin_local(specs[i], force, env, command)
                if isinstance(started, LocalRun):
                    running[i] = started
                    progress(specs[i], None)
                else:
                    results[i] = started
                    progress(specs[i], started)
            ended = [(i, run.proc.poll()) for i, run in running.items()]
            ended = [(i, code) for i, code in ended if code is not None]
            for i, code in ended:
                run = running.pop(i)
                results[i] = run.finish(code)
                progress(specs[i], results[i])
            if running and not ended:
                time.sleep(POLL_SECONDS)
    except BaseException as e:  # Ctrl-C, or a failing `progress`: no worker left behind
        for run in running.values():
            run.kill()
        if isinstance(e, KeyboardInterrupt):
            raise RunsInterrupted(sum(r is not None for r in results)) from None
        raise
    return results  # type: ignore[return-value]  # every one set


# ------------------------------------------------------------------------------------ Ray


def import_ray():
    """The `ray` module, or a BenchError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise BenchError(f"--launcher ray needs Ray, which is not installed: {RAY_EXTRA} (or use --launcher local).") from None
    return ray


def connect_ray(ray) -> bool:
    """Connect to the cluster at RAY_ADDRESS, else start a Ray instance on this machine; whether
    this call started the connection (and so stops it)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=cores(), include_dashboard=False)
    return True


def ray_threads(ray, jobs: int) -> int:
    """Threads per run on the cluster: its CPUs // jobs, at most its smallest node's."""
    nodes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
    return max(1, min(min(nodes, default=1), threads_per_run(sum(nodes), jobs)))


def execute_remote(spec: dict[str, Any], force: bool, args: list[str], variables: dict[str, str], threads: int, cwd: str) -> dict[str, Any] | None:
    """A Ray task: `execute` the run in the bench's working directory (on a shared filesystem),
    its worker a child of this process. None when the worker was stopped by Ctrl-C."""
    here = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError as e:
        return {
            "label": spec["label"], "name": spec["name"], "seed": spec["seed"], "kind": spec["kind"], "status": "failed",
            "error": f"the Ray worker on {socket.gethostname()} cannot enter the bench's directory {cwd} ({e.strerror or e}): "
            "put --out on a filesystem every Ray node mounts at the same path.",
        }
    try:
        return execute(RunSpec(**spec), force, worker_env(threads, variables), args)
    except KeyboardInterrupt:
        return None
    finally:
        os.chdir(here)


def precheck(spec: RunSpec, force: bool) -> dict[str, Any] | None:
    """On the bench's side, before a task is sent: the row when its directory is in use or its run
    is finished already (the lock held only for the look)."""
    d = Path(spec.directory)
    d.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(d):
            return None if force else reusable(spec)
    except RunBusy as e:
        return busy_row(spec, e)


def run_ray(specs: list[RunSpec], force: bool, jobs: int, progress: Progress, command: Callable[[Path], list[str]]) -> list[dict[str, Any]]:
    ray = import_ray()
    started = connect_ray(ray)
    results: list[dict[str, Any] | None] = [None] * len(specs)
    pending, running = deque(range(len(specs))), {}
    try:
        threads = ray_threads(ray, jobs)
        task = ray.remote(execute_remote).options(num_cpus=threads, max_retries=0)
        variables = {k: v for k, v in os.environ.items() if k.startswith("RLHFZOO_")}
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.popleft()
                spec = specs[i]
                row = precheck(spec, force)
                if row is not None:
                    results[i] = row
                    progress(spec, row)
                    continue
                args = command(Path(spec.directory) / "spec.json")
                running[task.remote(asdict(spec), force, args, variables, threads, os.getcwd())] = i
                progress(spec, None)
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                i = running.pop(ref)
                results[i] = ray_result(ray, ref, specs[i])
                progress(specs[i], results[i])
    except BaseException as e:  # Ctrl-C, or a failing `progress`: no task left behind
        for ref in running:
            ray.cancel(ref, force=True)
        if isinstance(e, KeyboardInterrupt):
            raise RunsInterrupted(sum(r is not None for r in results)) from None
        raise
    finally:
        if started:
            ray.shutdown()
    return results  # type: ignore[return-value]  # every one set


def ray_result(ray, ref, spec: RunSpec) -> dict[str, Any]:
    """A finished task's row; a failed row when the task itself failed (its process died, ...)."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as e:
        message = str(e).strip().splitlines()
        return {"label": spec.label, "name": spec.name, "seed": spec.seed, "kind": spec.kind, "status": "failed",
                "error": f"the Ray task running it failed: {message[-1] if message else type(e).__name__}"}
    if result is None:  # its worker was stopped by Ctrl-C
        raise KeyboardInterrupt
    return result
