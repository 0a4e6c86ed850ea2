"""KL penalties between the policy and a reference model.

``token_kl`` works on the sampled tokens' log-probs only (Schulman,
"Approximating KL Divergence", 2020).  With ``r = logprobs - ref_logprobs``
(log of policy over reference for the sampled token)::

    k1 = r                      unbiased, high variance, can be negative
    k2 = r**2 / 2               biased, low variance, >= 0
    k3 = exp(-r) + r - 1        unbiased for KL(pi || ref), >= 0

``vocab_kl`` is the exact per-token ``KL(pi || pi_ref) =
sum_v p_v (log p_v - log q_v)`` over the whole vocabulary, computed without a
``[N, V]`` temporary (see ``_triton.py`` for the online formulation).
Gradients::

    d KL / d logits     = p * (log p - log q - KL) / T
    d KL / d ref_logits = (q - p) / T
"""
from __future__ import annotations

import torch

from . import _reference
from ._dispatch import LSE_DTYPE, acc_dtype, check_temperature, implementation, paired_row_segments, resolve_backend, scale_for

KL_ESTIMATORS = ("k1", "k2", "k3")


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate from sampled-token log-probs (see module docstring).

    Elementwise and differentiable w.r.t. both inputs; returns the broadcast
    shape of the inputs.  Raises ``ValueError`` for an unknown estimator.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}")
    r = logprobs - ref_logprobs
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r * r
    # expm1(-r) + r == exp(-r) - 1 + r, without cancellation for small r
    return torch.expm1(-r) + r


class _VocabKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, impl):
        lead = logits.shape[:-1]
        N = lead.numel()
        acc = acc_dtype(logits.dtype)
        kl = torch.empty(N, dtype=acc, device=logits.device)
        lse_p = torch.empty(N, dtype=LSE_DTYPE, device=logits.device)
        lse_q = torch.empty_like(lse_p)
        inv_temp = scale_for(acc, temperature)
        if N > 0:
            for off, xs, ys in paired_row_segments(logits, ref_logits):
                r = slice(off, off + xs.shape[0])
                impl.kl_fwd(xs, ys, inv_temp, kl[r], lse_p[r], lse_q[r])
        ctx.save_for_backward(logits, ref_logits, lse_p, lse_q, kl)
        ctx.inv_temp, ctx.impl = inv_temp, impl
        return kl.view(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        logits, ref_logits, lse_p, lse_q, kl = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        V = logits.shape[-1]
        dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_x else None
        dy = torch.empty(ref_logits.shape, dtype=ref_logits.dtype, device=ref_logits.device) if need_y else None
        dx2 = dx.view(-1, V) if need_x else None
        dy2 = dy.view(-1, V) if need_y else None
        g = g.reshape(-1)
        for off, xs, ys in paired_row_segments(logits, ref_logits):
            r = slice(off, off + xs.shape[0])
            ctx.impl.kl_bwd(xs, ys, lse_p[r], lse_q[r], kl[r], g[r], ctx.inv_temp,
                            dx2[r] if need_x else None, dy2[r] if need_y else None)
        return dx, dy, None, None


def vocab_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact per-token ``KL(softmax(logits/T) || softmax(ref_logits/T))``.

    ``logits`` and ``ref_logits`` are ``[..., V]`` of any float dtype/layout
    (same shape).  Returns fp32 (fp64 for fp64 logits) ``[...]``, clamped to
    ``>= 0``, differentiable w.r.t. both inputs (pass a detached
    ``ref_logits`` to skip its gradient).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError("logits must have shape [..., V] with V > 0")
    temperature = check_temperature(temperature)
    backend = resolve_backend(backend, logits)
    if backend == "eager":
        return _reference.vocab_kl(logits, ref_logits, temperature)
    impl = implementation(backend, logits)
    return _VocabKL.apply(logits, ref_logits, temperature, impl)
