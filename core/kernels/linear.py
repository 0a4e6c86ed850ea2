"""Fused LM-head + log-prob (+ entropy): ``logprobs(hidden @ weight.T + bias)``.

The ``[N, V]`` logits of a language-model head are the largest tensor in an
RLHF step.  :func:`linear_logprobs` processes the tokens in chunks of
``chunk_size`` rows:

forward, per chunk ``c``::

    logits_c = hidden_c @ W.T + b                  # [C, V], model dtype
    lp_c, lse_c (, H_c) = row statistics of logits_c / T

and keeps only ``lse`` (and ``H``) per token, plus the last chunk's logits.
The backward goes through the chunks last to first, recomputes ``logits_c``
(except for that kept last chunk) and turns it *in place* into ``dlogits_c``::

    dlogits_c = [g_lp (onehot(t) - p) - g_H p (log p + H)] / T
    d hidden_c = dlogits_c @ W
    dW        += dlogits_c.T @ hidden_c            # fp32 accumulator
    db        += dlogits_c.sum(0)                  # fp32 accumulator

so the peak extra memory is one ``[C, V]`` chunk plus an fp32 ``[V, H]``
accumulator (only when ``W`` needs a gradient), instead of several ``[N, V]``
tensors.  The price is one extra ``hidden @ W.T`` GEMM in the backward for
every chunk but the last (none when all tokens fit in one chunk).  The kept
chunk is the buffer the backward would allocate anyway, so the peak does not
grow; it is held from the forward to the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _reference
from ._dispatch import LSE_DTYPE, acc_dtype, check_temperature, implementation, resolve_backend, scale_for

# Target size of one chunk of fp32-equivalent logits.  Bigger chunks mean
# fewer, larger GEMMs (the dW update ``dlogits_c.T @ hidden_c`` has only
# ``chunk`` as its inner dimension and re-reads dW each time); smaller chunks
# mean less memory.  128 MiB is 1024 tokens at V=32000: on CPU about as fast
# as a single chunk (~5% slower) while the peak stays ~10x below eager's.
CPU_CHUNK_BYTES = 128 << 20
GPU_CHUNK_BYTES = 256 << 20


def default_chunk_size(N: int, V: int, device: torch.device) -> int:
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = max(64, budget // (4 * V))
    return max(1, min(N, rows))


def _accumulate_dw(dw: torch.Tensor, dlogits: torch.Tensor, hc: torch.Tensor) -> None:
    """``dw += dlogits.T @ hc`` with ``dw`` in fp32/fp64 and the GEMM inputs in the model dtype."""
    if dlogits.dtype == dw.dtype and hc.dtype == dw.dtype:
        dw.addmm_(dlogits.t(), hc)
        return
    hc = hc.to(dlogits.dtype)
    if dlogits.is_cuda and _CUDA_OUT_DTYPE[0]:
        # cuBLAS bf16/fp16 GEMM accumulating straight into the fp32 buffer
        try:
            torch.addmm(dw, dlogits.t(), hc, out_dtype=dw.dtype, out=dw)
            return
        except (RuntimeError, TypeError):
            _CUDA_OUT_DTYPE[0] = False
    # low-precision GEMM (fp32 accumulation inside it), fp32 sum over chunks
    dw.add_(torch.mm(dlogits.t(), hc))


_CUDA_OUT_DTYPE = [True]  # does torch.addmm(..., out_dtype=) work here? (torch >= 2.8)


def _logits_buffer(h2: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor | None:
    """One ``[chunk, V]`` buffer that every chunk's logits reuse on CPU: a fresh tensor per chunk
    (128 MiB at the default size) would be fresh pages from the OS, page-faulted in, each time.
    None under autocast (the GEMM picks its own output dtype there)."""
    if h2.device.type != "cpu" or torch.is_autocast_enabled("cpu") or h2.shape[0] <= chunk:
        return None
    return torch.empty(chunk, weight.shape[0], dtype=torch.promote_types(h2.dtype, weight.dtype))


def _chunk_logits(hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor | None) -> torch.Tensor:
    """``hc @ weight.T + bias``, into ``buf`` when given."""
    if buf is None or hc.dtype != buf.dtype or weight.dtype != buf.dtype:
        return F.linear(hc, weight, bias)
    out = buf[: hc.shape[0]]
    if bias is None:
        return torch.mm(hc, weight.t(), out=out)
    return torch.addmm(bias.to(out.dtype), hc, weight.t(), out=out)


class _LinearStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, want_ent, chunk, impl):
        H = hidden.shape[-1]
        lead = hidden.shape[:-1]
        h2 = hidden.reshape(-1, H)
        t = targets.reshape(-1)
        N = h2.shape[0]
        acc = acc_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        lp = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=LSE_DTYPE, device=hidden.device)
        ent = torch.empty_like(lp) if want_ent else None
        inv_temp = scale_for(acc, temperature)
        buf = _logits_buffer(h2, weight, chunk)
        kept = None
        for i in range(0, N, chunk):
            r = slice(i, i + chunk)
            logits = _chunk_logits(h2[r], weight, bias, buf)
            impl.stats_fwd(logits, t[r], inv_temp, ignore_index, lp[r], lse[r],
                           ent[r] if want_ent else None)
            kept = (i, logits)
        # The last chunk's logits stay alive until the backward, which starts with that chunk
        # and so skips one recomputing GEMM (all of them when everything fit in one chunk).
        # Held between forward and backward: one chunk, the buffer the backward needs anyway.
        # (Without autograd, e.g. under no_grad, ctx and with it the chunk go when this returns.)
        ctx.kept = kept
        ctx.buf = buf
        ctx.save_for_backward(h2, weight, bias, t, lse, ent)
        ctx.inv_temp, ctx.ignore_index, ctx.chunk, ctx.impl = inv_temp, ignore_index, chunk, impl
        ctx.hidden_shape = hidden.shape
        ctx.set_materialize_grads(False)
        if want_ent:
            return lp.view(lead), ent.view(lead)
        return lp.view(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        h2, weight, bias, t, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N = h2.shape[0]
        acc = acc_dtype(torch.promote_types(h2.dtype, weight.dtype))
        # the kept chunk is used once: a second backward (retain_graph=True) recomputes it
        kept, buf, ctx.kept, ctx.buf = ctx.kept, ctx.buf, None, None
        if (g_lp is None and g_ent is None) or not (need_h or need_w or need_b):
            return (None,) * 9
        dh = torch.empty_like(h2) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        g_lp = g_lp.reshape(-1) if g_lp is not None else None
        g_ent = g_ent.reshape(-1) if g_ent is not None else None
        if buf is None:
            buf = _logits_buffer(h2, weight, ctx.chunk)
        for i in reversed(range(0, N, ctx.chunk)):  # last chunk first: its logits were kept
            r = slice(i, i + ctx.chunk)
            hc = h2[r]
            if kept is not None and kept[0] == i:
                dlogits, kept = kept[1], None
            else:
                dlogits = _chunk_logits(hc, weight, bias, buf)  # recompute
            # overwritten in place with the gradient w.r.t. the logits
            ctx.impl.stats_bwd(
                dlogits, t[r], lse[r], ent[r] if g_ent is not None else None,
                g_lp[r] if g_lp is not None else None, g_ent[r] if g_ent is not None else None,
                ctx.inv_temp, ctx.ignore_index, dlogits,
            )
            if need_h:
                if dlogits.dtype == dh.dtype:
                    torch.mm(dlogits, weight.to(dlogits.dtype), out=dh[r])
                else:  # e.g. logits computed under autocast
                    dh[r] = torch.mm(dlogits, weight.to(dlogits.dtype))
            if need_w:
                _accumulate_dw(dw, dlogits, hc)
            if need_b:
                db.add_(dlogits.sum(0, dtype=acc))
            del dlogits
        return _finish(ctx, dh, dw, weight, db, bias)


def _finish(ctx, dh, dw, weight, db, bias):
    if dh is not None:
        dh = dh.view(ctx.hidden_shape)
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return dh, dw, db, None, None, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    *,
    backend: str = "auto",
):
    """Per-token log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / T)``.

    Args:
        hidden: ``[..., H]`` final hidden states.
        weight: ``[V, H]`` LM-head weight; ``bias``: optional ``[V]``.
        targets: ``[...]`` token ids (``ignore_index`` -> log-prob 0).
        return_entropy: also return the per-token entropy.
        chunk_size: tokens per chunk (default: ~128 MiB of fp32 logits per
            chunk on CPU, ~256 MiB on GPU, at least 64 tokens).
        backend: internal/testing switch, see :func:`rlhfzoo.kernels.logprobs`.

    Returns:
        fp32 log-probs shaped like ``targets`` (fp64 for fp64 inputs), or
        ``(logprobs, entropy)`` when ``return_entropy``.  Differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    temperature = check_temperature(temperature)
    backend = resolve_backend(backend, hidden)
    if backend == "eager":
        return _reference.linear_logprobs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy)
    N = targets.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(N, weight.shape[0], hidden.device)
    chunk_size = max(1, int(chunk_size))
    if targets.dtype != torch.long:
        targets = targets.long()
    impl = implementation(backend, hidden)
    return _LinearStats.apply(hidden, weight, bias, targets, temperature, int(ignore_index),
                              bool(return_entropy), chunk_size, impl)
