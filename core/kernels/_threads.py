"""Row-parallel execution of the chunked CPU path.

The chunked PyTorch path issues a few small ops per chunk of rows (``amax``,
``exp``, ``sum`` on a cache-sized tile).  With PyTorch's OpenMP intra-op
parallelism every one of those ops forks and joins the thread team; that
costs little on an idle machine but a lot when the cores are shared (one
descheduled thread stalls the barrier of every op).  Instead we split the
*rows* over a small pool of Python threads whose PyTorch ops are
single-threaded: each worker streams its own rows through its own cache,
with no synchronisation until the end.  PyTorch releases the GIL inside ops,
so the workers run in parallel.

Setting a worker single-threaded uses ``torch.set_num_threads(1)`` inside the
worker (OpenMP's thread count is per thread); that call also changes the
default that *new* threads inherit, so the creating thread puts it back right
after the workers are set up.  The pool has ``torch.get_num_threads()``
workers, is rebuilt after ``fork`` and when that number changes, and is
bypassed for small inputs.

Each thread also keeps its fp32 scratch tile (:func:`scratch`) between calls:
allocating and freeing cache-sized tiles in every task made glibc's
per-thread arenas grow by tens of MiB.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

# Below this many elements the work runs inline in the caller's thread.
MIN_PARALLEL_ELEMENTS = 1 << 21
# Tasks per worker: > 1 so that an unevenly loaded machine still balances.
TASKS_PER_WORKER = 4

_state: dict = {"pool": None, "workers": 0, "pid": None}
_lock = threading.Lock()
_local = threading.local()


def scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, cols]`` work tile owned by the calling thread (reused, CPU only).

    Valid until the same thread asks for another tile of the same dtype.
    """
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    n = rows * cols
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(rows, cols)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if _state["pool"] is not None and _state["workers"] == workers and _state["pid"] == os.getpid():
            return _state["pool"]
        if _state["pool"] is not None and _state["pid"] == os.getpid():
            _state["pool"].shutdown(wait=False)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlhfzoo-kernels")
        ready = threading.Barrier(workers + 1)

        def setup():
            torch.get_num_threads()  # let PyTorch initialise this thread first
            torch.set_num_threads(1)
            ready.wait()

        futures = [pool.submit(setup) for _ in range(workers)]
        ready.wait()
        for f in futures:
            f.result()
        torch.set_num_threads(workers)  # restore the process-wide default
        _state.update(pool=pool, workers=workers, pid=os.getpid())
        return pool


def run_rows(rows: int, numel: int, device: torch.device, fn: Callable[[int, int], None]) -> None:
    """Call ``fn(lo, hi)`` over a partition of ``range(rows)``, possibly in parallel."""
    if rows == 0:
        return
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers <= 1 or numel < MIN_PARALLEL_ELEMENTS or rows < 2:
        fn(0, rows)
        return
    tasks = min(rows, workers * TASKS_PER_WORKER)
    bounds = [rows * k // tasks for k in range(tasks + 1)]

    def task(lo: int, hi: int) -> None:
        with torch.no_grad():
            fn(lo, hi)

    pool = _pool(workers)
    futures = [pool.submit(task, bounds[k], bounds[k + 1]) for k in range(tasks) if bounds[k] < bounds[k + 1]]
    for f in futures:
        f.result()
