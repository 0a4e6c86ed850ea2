"""Per-token log-probabilities and entropy from full-vocabulary logits.

``logprobs(logits, targets)`` equals
``log_softmax(logits / T, -1).gather(-1, targets)`` (0 where the target is
``ignore_index``) but never materialises the ``[N, V]`` log-softmax:

* forward: one pass over each row with a log-sum-exp (online in Triton,
  cache-blocked in PyTorch), accumulated in fp32 even for bf16/fp16 logits;
  only the per-row ``lse`` (float64, see ``_dispatch.split_lse``) is saved
  besides the logits themselves;
* backward: ``d logprob_t / d logits = (onehot(t) - softmax(logits / T)) / T``
  (the negative of the familiar cross-entropy gradient ``softmax - onehot``)
  times the incoming gradient, recomputed tile by tile from ``lse`` and
  written straight into a gradient tensor of the logits' dtype.

``entropy(logits)`` shares the machinery:
``H = lse - sum_v p_v z_v`` and ``dH/dz = -p (log p + H)``.
"""
from __future__ import annotations

import torch

from . import _reference
from ._dispatch import LSE_DTYPE, acc_dtype, check_temperature, implementation, resolve_backend, row_segments, scale_for


class _TokenStats(torch.autograd.Function):
    """Log-prob of ``targets`` and/or entropy of ``softmax(logits / T)`` per row."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, want_lp, want_ent, impl):
        lead = logits.shape[:-1]
        acc = acc_dtype(logits.dtype)
        N = lead.numel()
        flat_t = targets.reshape(-1) if want_lp else None
        lse = torch.empty(N, dtype=LSE_DTYPE, device=logits.device)
        lp = torch.empty(N, dtype=acc, device=logits.device) if want_lp else None
        ent = torch.empty(N, dtype=acc, device=logits.device) if want_ent else None
        inv_temp = scale_for(acc, temperature)
        if N > 0:
            for off, seg in row_segments(logits):
                r = slice(off, off + seg.shape[0])
                impl.stats_fwd(
                    seg, flat_t[r] if want_lp else None, inv_temp, ignore_index,
                    lp[r] if want_lp else None, lse[r], ent[r] if want_ent else None,
                )
        ctx.save_for_backward(logits, flat_t, lse, ent)
        ctx.inv_temp, ctx.ignore_index, ctx.impl = inv_temp, ignore_index, impl
        ctx.set_materialize_grads(False)
        outs = []
        if want_lp:
            outs.append(lp.view(lead))
        if want_ent:
            outs.append(ent.view(lead))
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        logits, flat_t, lse, ent = ctx.saved_tensors
        it = iter(grads)
        g_lp = next(it) if flat_t is not None else None
        g_ent = next(it) if ent is not None else None
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None, None
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g_lp = g_lp.reshape(-1) if g_lp is not None else None
        g_ent = g_ent.reshape(-1) if g_ent is not None else None
        grad2d = grad.view(-1, logits.shape[-1]) if logits.dim() > 1 else grad.view(1, -1)
        for off, seg in row_segments(logits):
            r = slice(off, off + seg.shape[0])
            ctx.impl.stats_bwd(
                seg, flat_t[r] if flat_t is not None else None, lse[r],
                ent[r] if ent is not None else None,
                g_lp[r] if g_lp is not None else None, g_ent[r] if g_ent is not None else None,
                ctx.inv_temp, ctx.ignore_index, grad2d[r],
            )
        return grad, None, None, None, None, None, None


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() < 1 or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor of shape [..., V]")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")


def logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token ``log_softmax(logits / temperature)[targets]``.

    Args:
        logits: ``[..., V]`` floating tensor of any dtype and layout.
        targets: ``[...]`` integer token ids; ``ignore_index`` entries give 0.
        temperature: softmax temperature ``T > 0``.
        ignore_index: target value whose log-prob is reported as 0 (no grad).
        backend: internal/testing switch - ``"auto"`` (Triton on CUDA, chunked
            PyTorch elsewhere), ``"triton"`` (interpreter on CPU tensors),
            ``"torch"`` or ``"eager"``.

    Returns:
        fp32 tensor shaped like ``targets`` (fp64 for fp64 logits), every
        entry ``<= 0``, differentiable w.r.t. ``logits``.
    """
    _check_logits(logits)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits.shape[:-1] {tuple(logits.shape[:-1])}")
    temperature = check_temperature(temperature)
    backend = resolve_backend(backend, logits)
    if backend == "eager":
        return _reference.logprobs(logits, targets, temperature, ignore_index)
    if targets.dtype != torch.long:
        targets = targets.long()
    impl = implementation(backend, logits)
    return _TokenStats.apply(logits, targets, temperature, int(ignore_index), True, False, impl)


def entropy(logits: torch.Tensor, temperature: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """Per-token entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)``.

    Same dtype/layout handling and backends as :func:`logprobs`; returns fp32
    (fp64 for fp64 logits) shaped ``logits.shape[:-1]``, differentiable.
    """
    _check_logits(logits)
    temperature = check_temperature(temperature)
    backend = resolve_backend(backend, logits)
    if backend == "eager":
        return _reference.entropy(logits, temperature)
    impl = implementation(backend, logits)
    return _TokenStats.apply(logits, None, temperature, 0, False, True, impl)
