"""Chunked PyTorch implementation of the row primitives (CPU fast path).

All primitives work on a 2-D view ``x[R, V]`` (any strides, any float dtype)
and write into caller-provided outputs, so the autograd wrappers can tile a
tensor however they like.  The vocabulary is never materialised in fp32 for
more than ``rows_per_chunk`` rows at a time: each chunk of rows is read once
from memory, and the follow-up passes (``exp``, ``sum``) hit the cache.

Maths (``z = x / T``, ``lse = log sum_v exp z_v``, ``p = softmax z``)::

    logprob(t)        = z_t - lse                      (clamped to <= 0)
    entropy           = lse - sum_v p_v z_v
    d logprob / d x   = (onehot(t) - p) / T
    d entropy / d x   = -p * (log p + H) / T
    KL(p || q)        = sum_v p_v (log p_v - log q_v)
    d KL / d x        = p * (log p - log q - KL) / T
    d KL / d y        = (q - p) / T

Rows are spread over single-threaded workers (``_threads.run_rows``); each
worker walks its rows in chunks of ``rows_per_chunk`` rows with its own fp32
scratch tile.

Shift-free fast path (log-probs): ``log sum exp z`` is normally computed as
``m + log sum exp(z - m)`` with ``m = max z``, which costs a separate max
pass.  Without the shift, ``s = sum exp z`` is exact to rounding whenever it
comes out finite and not tiny (``exp`` overflows to ``inf`` instead of
silently losing accuracy, and terms below the underflow threshold are
negligible next to ``s >= 1e-20``).  So each chunk first tries the unshifted
sum and only rows whose ``s`` is ``inf``/``nan``/tiny (logits beyond ~88 or
all far below 0) are redone with the max shift.
"""
from __future__ import annotations

import torch

from . import _compiled
from ._threads import run_rows, scratch

# Bytes of fp32 scratch per chunk: a chunk of input rows plus its fp32 copy
# should stay in the per-core L2 cache on CPU.  On GPUs (torch fallback when
# Triton is missing) large chunks keep the kernel count down.
CPU_CHUNK_BYTES = 1 << 20
GPU_CHUNK_BYTES = 256 << 20


def rows_per_chunk(V: int, device: torch.device, max_rows: int) -> int:
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(max_rows, budget // (4 * max(V, 1))))


def _safe_targets(tgt: torch.Tensor, ignore_index: int):
    ignore = tgt == ignore_index
    return ignore, tgt.masked_fill(ignore, 0).long()


def stats_fwd(x, tgt, inv_temp, ignore_index, lp_out, lse_out, ent_out):
    """Per-row log-sum-exp of ``x * inv_temp``; optionally log-prob of ``tgt`` and entropy."""
    R, V = x.shape
    if R == 0:
        return
    acc = lse_out.dtype
    upcast = x.dtype != acc
    tiny = 1e-20 if acc == torch.float32 else 1e-200
    ssum = torch.empty(R, dtype=acc, device=x.device)  # sum of exp(z - shift)
    shift = lse_out  # per-row shift (0 on the fast path) until the final combine
    if ent_out is None:
        shift.zero_()

    def shifted(src, b, j):
        """b = exp(z - max z) for the rows j; returns nothing, fills shift/ssum/ent."""
        m = shift[j]
        torch.amax(src, dim=-1, out=m)
        m.mul_(inv_temp)
        torch.add(m.neg().unsqueeze(1), src, alpha=inv_temp, out=b)  # z - max(z)
        if ent_out is None:
            b.exp_()
            torch.sum(b, dim=-1, out=ssum[j])
        else:
            e = torch.exp(b)
            torch.sum(e, dim=-1, out=ssum[j])
            b.mul_(e).masked_fill_(e == 0, 0.0)  # e * (z - m); 0 where e underflows or z = -inf (not 0 * -inf)
            torch.sum(b, dim=-1, out=ent_out[j])

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        buf = scratch(C, V, acc, x.device)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            c = x[j]
            b = buf[: c.shape[0]]
            if upcast:
                b.copy_(c)  # chunked upcast: bf16/fp16 -> fp32 in cache
                src = b
            else:
                src = c
            if ent_out is not None:
                shifted(src, b, j)
                continue
            # shift-free attempt: s = sum exp(x / T)
            if inv_temp == 1.0:
                torch.exp(src, out=b)
            else:
                torch.mul(src, inv_temp, out=b).exp_()
            torch.sum(b, dim=-1, out=ssum[j])

    fused = _compiled.sum_exp(x, inv_temp) if ent_out is None else None
    if fused is not None:  # one fused pass (large CPU inputs)
        ssum.copy_(fused)
    else:
        run_rows(R, R * V, x.device, work)
    if ent_out is None:
        # rare: rows whose unshifted sum overflowed/underflowed get the max shift
        bad = ((ssum < tiny) | ~torch.isfinite(ssum)).nonzero().flatten().tolist()
        buf = scratch(1, V, acc, x.device) if bad else None
        for k in bad:
            row = slice(k, k + 1)
            shifted(x[row].to(acc) if upcast else x[row], buf, row)

    logs = ssum.log()
    if ent_out is not None:
        # H = log s - sum e (z - m) / s
        ent_out.div_(ssum).neg_().add_(logs).clamp_(min=0.0)
    lse_out.add_(logs)
    if tgt is not None:
        ignore, safe = _safe_targets(tgt, ignore_index)
        xt = x.gather(1, safe.unsqueeze(1)).squeeze(1).to(acc)
        torch.sub(xt.mul_(inv_temp), lse_out, out=lp_out)
        lp_out.clamp_(max=0.0).masked_fill_(ignore, 0.0)


def stats_bwd(x, tgt, lse, ent, g_lp, g_ent, inv_temp, ignore_index, dx_out):
    """Gradient of ``g_lp . logprob + g_ent . entropy`` w.r.t. ``x`` into ``dx_out``.

    ``dx_out`` may alias ``x`` (the fused-linear backward overwrites its
    recomputed logits chunk in place).
    """
    R, V = x.shape
    if R == 0:
        return
    acc = lse.dtype
    direct = dx_out.dtype == acc  # write straight into the gradient
    neg_lse = lse.neg().unsqueeze(1)
    if g_lp is not None:
        ignore, safe = _safe_targets(tgt, ignore_index)
        gl = g_lp.to(acc).masked_fill(ignore, 0.0).mul_(inv_temp).unsqueeze(1)
        neg_gl = gl.neg()
        safe = safe.unsqueeze(1)
    if g_ent is not None:
        ge = g_ent.to(acc).mul(-inv_temp).unsqueeze(1)  # -g_ent / T
        H = ent.unsqueeze(1)

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        buf = None if direct else scratch(C, V, acc, x.device)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            c = x[j]
            d = dx_out[j]
            if direct:
                b = d
                torch.add(neg_lse[j], c, alpha=inv_temp, out=b)  # log p
            else:
                b = buf[: c.shape[0]]
                b.copy_(c)  # upcast in cache (a mixed-dtype add would allocate)
                torch.add(neg_lse[j], b, alpha=inv_temp, out=b)  # log p
            if g_ent is None:
                b.exp_().mul_(neg_gl[j])  # -p * g / T
            else:
                p = torch.exp(b)
                # -p * (g_lp + g_ent (log p + H)) / T
                b.add_(H[j]).mul_(ge[j])
                if g_lp is not None:
                    b.add_(neg_gl[j])
                b.mul_(p)
                b.masked_fill_(p == 0, 0.0)  # p log p -> 0 where p underflows / -inf logits
            if g_lp is not None:
                b.scatter_add_(1, safe[j], gl[j])  # + onehot(t) * g / T
            if not direct:
                d.copy_(b)

    fused = direct and g_ent is None and g_lp is not None
    if fused and _compiled.logprob_grad_(x, lse.neg(), neg_gl.squeeze(1), inv_temp, dx_out):
        dx_out.scatter_add_(1, safe, gl)  # one fused pass (large CPU inputs), then + onehot(t) g / T
        return
    run_rows(R, R * V, x.device, work)


def kl_fwd(x, y, inv_temp, kl_out, lse_p_out, lse_q_out):
    """Exact per-row KL(softmax(x/T) || softmax(y/T))."""
    R, V = x.shape
    if R == 0:
        return
    acc = kl_out.dtype

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            zp = x[j].to(acc) * inv_temp
            zq = y[j].to(acc) * inv_temp
            lse_p = torch.logsumexp(zp, dim=-1, keepdim=True)
            lse_q = torch.logsumexp(zq, dim=-1, keepdim=True)
            lse_p_out[j] = lse_p.squeeze(1)
            lse_q_out[j] = lse_q.squeeze(1)
            logp = zp.sub_(lse_p)
            logq = zq.sub_(lse_q)
            p = logp.exp()
            diff = logp.sub_(logq).mul_(p).masked_fill_(p == 0, 0.0)
            torch.sum(diff, dim=-1, out=kl_out[j])

    run_rows(R, R * V, x.device, work)
    kl_out.clamp_(min=0.0)


def kl_bwd(x, y, lse_p, lse_q, kl, g, inv_temp, dx_out, dy_out):
    R, V = x.shape
    if R == 0:
        return
    acc = kl.dtype
    gs = g.to(acc).mul(inv_temp).unsqueeze(1)

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            logp = (x[j].to(acc) * inv_temp).sub_(lse_p[j].unsqueeze(1))
            logq = (y[j].to(acc) * inv_temp).sub_(lse_q[j].unsqueeze(1))
            p = logp.exp()
            if dy_out is not None:
                dy_out[j] = (logq.exp() - p).mul_(gs[j])
            if dx_out is not None:
                d = logp.sub_(logq).sub_(kl[j].unsqueeze(1)).mul_(p).masked_fill_(p == 0, 0.0)
                dx_out[j] = d.mul_(gs[j])

    run_rows(R, R * V, x.device, work)
