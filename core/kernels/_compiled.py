"""``torch.compile``d CPU passes for large inputs: the place where compiling pays.

The chunked path (:mod:`._torch_impl`) computes the unshifted ``sum_v exp(x_v / T)`` of a
log-sum-exp in three passes over a cache-sized tile (upcast to fp32, ``exp``, ``sum``), and
the log-prob gradient ``coef * exp(x / T - hi)`` in two or three.  Inductor fuses each into one
loop per row (load, convert, ``exp``, accumulate or store in fp32).  Measured with
``benchmarks/kernels.py`` on 2 cores (two runs): the forward over ``[2, 512, 128256]`` logits
went from 2.36x / 1.82x a read pass (bf16 / fp32) to 1.31-1.67x / 1.60-1.79x, and the
fused-linear forward+backward from 1.21x to 1.02-1.07x eager's time (median).

Used only for CPU inputs of at least :data:`MIN_ELEMENTS` elements, so small models never
pay the one-off compile (~6 s per process and function; shapes and temperature are dynamic,
so one compile serves every call).  Where compiling fails (no C++ compiler, an unsupported
platform) a warning is given once and the chunked path is used from then on;
``RLHFZOO_KERNELS_COMPILE=0`` turns it off.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

# Smallest input (elements) worth the compiled path: 16M, e.g. 128 rows of a 128k vocabulary.
MIN_ELEMENTS = 1 << 24

_state: dict = {"fn": None, "grad_fn": None, "failed": False}
_lock = threading.Lock()
_FAILED = object()


def _sum_exp(x: torch.Tensor, inv_temp: float) -> torch.Tensor:
    return torch.exp(x.to(torch.float32) * inv_temp).sum(-1)


def _logprob_grad(x: torch.Tensor, hi: torch.Tensor, coef: torch.Tensor, inv_temp: float, out: torch.Tensor) -> None:
    # -g p / T = exp(z - hi) * coef, coef = -g exp(-lo) / T; the caller adds g / T at the targets.
    # z = x * inv_temp is rounded before the subtraction (C++ without floating-point contraction),
    # as in the forward: inv_temp is already rounded to fp32 by the caller.
    out.copy_(torch.exp(x.to(torch.float32) * inv_temp - hi[:, None]) * coef[:, None])


def enabled() -> bool:
    return os.environ.get("RLHFZOO_KERNELS_COMPILE", "1") != "0" and not _state["failed"]


def _usable(x: torch.Tensor) -> bool:
    return enabled() and x.device.type == "cpu" and x.dtype != torch.float64 and x.numel() >= MIN_ELEMENTS


def _call(key: str, python_fn, *args):
    with _lock:  # compiling is not thread-safe; the call itself parallelises over rows (OpenMP)
        try:
            if _state[key] is None:
                _state[key] = torch.compile(python_fn, dynamic=True)
            with torch.no_grad():
                return _state[key](*args)
        except Exception as e:  # pragma: no cover - depends on the machine's toolchain
            _state["failed"] = True
            warnings.warn(
                f"rlhfzoo.kernels: torch.compile failed ({type(e).__name__}: {e}); using the chunked CPU path. "
                "Set RLHFZOO_KERNELS_COMPILE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return _FAILED


def sum_exp(x: torch.Tensor, inv_temp: float) -> torch.Tensor | None:
    """fp32 ``sum(exp(x * inv_temp), -1)`` of a 2-D CPU tensor, or None (use the chunked path)."""
    if not _usable(x):
        return None
    s = _call("fn", _sum_exp, x, float(inv_temp))
    return None if s is _FAILED else s


def logprob_grad_(x: torch.Tensor, hi: torch.Tensor, coef: torch.Tensor, inv_temp: float, out: torch.Tensor) -> bool:
    """``out = exp(x * inv_temp - hi) * coef`` row-wise in one pass (``out`` may be ``x``);
    False: not done, use the chunked path."""
    return _usable(x) and _call("grad_fn", _logprob_grad, x, hi, coef, float(inv_temp), out) is not _FAILED
