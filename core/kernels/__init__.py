"""Fused log-prob, KL and entropy kernels for RLHF.

Public API (one entry point per function; the implementation is picked from
the inputs - Triton kernels for CUDA tensors, a cache-blocked PyTorch path on
CPU with ``torch.compile``d single passes for large inputs - so callers never choose):

* :func:`logprobs` - ``log_softmax(logits / T)[targets]`` without the
  ``[N, V]`` log-softmax, fp32 accumulation, memory-lean backward.
* :func:`linear_logprobs` - the same fused with the LM head
  (``hidden @ W.T + b``), chunked over tokens; optional entropy.
* :func:`token_kl` - k1 / k2 / k3 per-token KL estimators.
* :func:`vocab_kl` - exact full-vocabulary per-token KL.
* :func:`entropy` - per-token entropy of ``softmax(logits / T)``.

Every function also takes an internal keyword ``backend=`` (``"auto"``,
``"triton"``, ``"torch"``, ``"eager"``) used by the tests and benchmarks;
``"triton"`` on CPU tensors runs the kernels under the Triton interpreter.
"""
from __future__ import annotations

from ._dispatch import BACKENDS, triton_available
from .kl import KL_ESTIMATORS, token_kl, vocab_kl
from .linear import linear_logprobs
from .logprobs import entropy, logprobs

__all__ = [
    "logprobs",
    "linear_logprobs",
    "token_kl",
    "vocab_kl",
    "entropy",
    "KL_ESTIMATORS",
    "BACKENDS",
    "triton_available",
]
