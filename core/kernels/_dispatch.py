"""Backend selection and small shared helpers.

Every public function in :mod:`rlhfzoo.kernels` has one entry point that picks
an implementation from the input tensors:

* ``"triton"`` - the Triton kernels in :mod:`._triton`, used automatically for
  CUDA tensors when Triton imports.  It can be *forced* for CPU tensors (tests):
  the kernels then run under the Triton interpreter.  Triton decides between
  "compile" and "interpret" when a kernel is *decorated* (``TRITON_INTERPRET``
  is read by ``@triton.jit``), so for CPU tensors we load a private copy of
  ``_triton.py`` with ``TRITON_INTERPRET=1`` set while it executes.  That copy
  works whatever was imported before, so callers never have to order imports.
* ``"torch"`` - chunked PyTorch (:mod:`._torch_impl`), the CPU fast path and
  the fallback everywhere else.
* ``"eager"`` - the plain, memory-hungry reference formulas
  (:mod:`._reference`); handy for comparisons, never chosen automatically.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import threading
from types import ModuleType
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch", "eager")

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it is optional)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _is_interpreted(module: ModuleType) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module._stats_fwd_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def triton_module(interpret: bool) -> ModuleType:
    """The module with the Triton launchers, compiled (GPU) or interpreted (CPU)."""
    if not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not installed")
    with _lock:
        from . import _triton

        if _is_interpreted(_triton) == interpret:
            return _triton
        # Load a second copy of _triton.py whose @triton.jit decorators see the
        # wanted TRITON_INTERPRET value.
        name = __package__ + (("._triton_interpreted") if interpret else "._triton_compiled")
        spec = importlib.util.spec_from_file_location(name, _triton.__file__)
        module = importlib.util.module_from_spec(spec)
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            spec.loader.exec_module(module)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        sys.modules[name] = module
        return module


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map ``backend`` ("auto" or an explicit name) to a concrete backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    return backend


def implementation(backend: str, x: torch.Tensor) -> ModuleType:
    """Module implementing the row primitives (``stats_fwd`` ...) for ``backend``."""
    if backend == "triton":
        # CPU tensors can only run interpreted; TRITON_INTERPRET=1 in the
        # environment means the user wants the interpreter everywhere.
        return triton_module(interpret=not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if backend == "torch":
        from . import _torch_impl

        return _torch_impl
    raise ValueError(f"no row primitives for backend {backend!r}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype: float64 stays float64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def row_segments(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Cover the rows of ``x[..., V]`` with 2-D views, never copying.

    Yields ``(first_row, view)`` pairs in row-major order of the leading
    dimensions.  A contiguous tensor (or any layout whose leading dimensions
    merge) gives a single ``[N, V]`` view; something like ``logits[:, :-1]``
    gives one view per batch element instead of a full copy.
    """
    if x.dim() == 1:
        yield 0, x.unsqueeze(0)
        return
    try:
        yield 0, x.view(-1, x.shape[-1])
        return
    except RuntimeError:
        pass
    per = math.prod(x.shape[1:-1])
    for i in range(x.shape[0]):
        for off, seg in row_segments(x[i]):
            yield i * per + off, seg


def paired_row_segments(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Like :func:`row_segments` for two same-shaped tensors (segments aligned)."""
    if x.dim() == 1:
        yield 0, x.unsqueeze(0), y.unsqueeze(0)
        return
    try:
        yield 0, x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        return
    except RuntimeError:
        pass
    per = math.prod(x.shape[1:-1])
    for i in range(x.shape[0]):
        for off, xs, ys in paired_row_segments(x[i], y[i]):
            yield i * per + off, xs, ys


# ----------------------------------------------------------------------------
# The per-row log-sum-exp, kept to float64.
#
# The backward recomputes ``p = exp(z - lse)``.  An fp32 ``lse`` is off by up to
# ``|lse| * 6e-8`` (5e-4 at logits ~1e4), and that error becomes a relative
# error of every ``p``, where eager ``log_softmax`` in fp32 is off by ~1e-7.
# So the forward saves ``lse`` in float64 (one number per row) and the backward
# splits it into an fp32 head and tail: ``z - hi`` is exact wherever ``p``
# matters (``z`` within a factor 2 of ``hi``), and the small ``lo`` is
# subtracted after it, or folded into a per-row factor ``exp(-lo)``.

LSE_DTYPE = torch.float64


def scale_for(acc: torch.dtype, temperature: float) -> float:
    """``1 / T`` rounded to ``acc``: ``z = x * inv_temp`` then rounds the same in every pass and path
    (eager, chunked, compiled, Triton), so a backward recomputes exactly the forward's ``z``."""
    inv_temp = 1.0 / temperature
    if acc == torch.float64:
        return inv_temp
    return torch.tensor(inv_temp, dtype=acc).item()


def split_lse(lse: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 ``lse`` -> ``(hi, lo)`` in ``acc`` with ``hi + lo == lse`` to float64 precision
    (``lo`` is None for float64 ``acc``: ``hi`` is exact)."""
    if acc == torch.float64:
        return lse, None
    hi = lse.to(acc)
    return hi, (lse - hi.double()).to(acc)
