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

``z = x * inv_temp`` is rounded to the accumulation dtype before anything else
in every pass (``inv_temp`` itself rounded by the caller), and ``lse`` is kept
in float64 and split into ``hi + lo`` for the backward
(``_dispatch.split_lse``): ``p = exp(z - hi) * exp(-lo)`` is then as accurate
as eager ``softmax`` at any magnitude of the logits.

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
from ._dispatch import acc_dtype, split_lse
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


def _z(src: torch.Tensor, inv_temp: float, out: torch.Tensor) -> torch.Tensor:
    """``out = z = src * inv_temp``, rounded to ``out``'s dtype (``src`` may be ``out``)."""
    if inv_temp == 1.0:
        return out if src is out else out.copy_(src)
    return torch.mul(src, inv_temp, out=out)


def _z_minus(src: torch.Tensor, inv_temp: float, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = z - shift`` (``shift`` a column), ``z`` rounded first as in :func:`_z`; ``src`` may be ``out``."""
    if inv_temp == 1.0:
        return torch.sub(src, shift, out=out)
    return torch.mul(src, inv_temp, out=out).sub_(shift)


def stats_fwd(x, tgt, inv_temp, ignore_index, lp_out, lse_out, ent_out):
    """Per-row float64 log-sum-exp of ``x * inv_temp``; optionally log-prob of ``tgt`` and entropy.

    Asking for the entropy does not change ``lse`` or the log-probs by a bit: both paths take the
    same sums (the entropy's ``w = sum exp(z - S) (z - M)`` is relative to the row max ``M``).
    """
    R, V = x.shape
    if R == 0:
        return
    acc = acc_dtype(x.dtype)
    upcast = x.dtype != acc
    want_ent = ent_out is not None
    tiny = 1e-20 if acc == torch.float32 else 1e-200
    ssum = torch.empty(R, dtype=acc, device=x.device)  # s = sum exp(z - shift)
    shift = torch.zeros(R, dtype=acc, device=x.device)  # 0 on the fast path, max z on redone rows
    zmax = torch.empty(R, dtype=acc, device=x.device) if want_ent else None  # M, for the entropy

    def sums(src, b, j, shifted):
        """For the rows j: ssum (and the entropy's w into ent_out), unshifted or shifted by max z."""
        if want_ent or shifted:
            m = torch.amax(src, dim=-1).mul_(inv_temp)  # rounding is monotone: = max z
            if want_ent:
                zmax[j] = m
            if shifted:
                shift[j] = m
        if not want_ent:
            if shifted:
                e = _z_minus(src, inv_temp, m.unsqueeze(1), b).exp_()
            else:
                e = torch.exp(src, out=b) if inv_temp == 1.0 else _z(src, inv_temp, b).exp_()
            torch.sum(e, dim=-1, out=ssum[j])
            return
        z = _z(src, inv_temp, b)
        e = torch.exp(z - shift[j].unsqueeze(1))
        torch.sum(e, dim=-1, out=ssum[j])
        z.sub_(m.unsqueeze(1)).mul_(e).masked_fill_(e == 0, 0.0)  # e (z - M); 0, not 0 * -inf, where e = 0
        torch.sum(z, dim=-1, out=ent_out[j])

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        buf = scratch(C, V, acc, x.device)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            c = x[j]
            b = buf[: c.shape[0]]
            sums(b.copy_(c) if upcast else c, b, j, shifted=False)  # upcast chunk by chunk, in cache

    fused = None if want_ent else _compiled.sum_exp(x, inv_temp)
    if fused is not None:  # one fused pass (large CPU inputs)
        ssum.copy_(fused)
    else:
        run_rows(R, R * V, x.device, work)
    # rare: rows whose unshifted sum overflowed/underflowed (logits beyond ~88) are redone with the max shift
    bad = ((ssum < tiny) | ~torch.isfinite(ssum)).nonzero().flatten().tolist()
    buf = scratch(1, V, acc, x.device) if bad else None
    for k in bad:
        row = slice(k, k + 1)
        sums(x[row].to(acc) if upcast else x[row], buf, row, shifted=True)

    log_s = ssum.to(lse_out.dtype).log()  # float64: log s - (M - S) below cancels up to ~88
    if want_ent:
        # H = lse - sum p z = log s - (M - S) - w / s
        h = log_s - (zmax.to(log_s.dtype) - shift.to(log_s.dtype)) - ent_out.div(ssum).to(log_s.dtype)
        ent_out.copy_(h.clamp_(min=0.0))
    torch.add(shift.to(lse_out.dtype), log_s, out=lse_out)
    if tgt is not None:
        ignore, safe = _safe_targets(tgt, ignore_index)
        zt = _z(x.gather(1, safe.unsqueeze(1)).squeeze(1).to(acc), inv_temp, torch.empty(R, dtype=acc, device=x.device))
        lp_out.copy_(zt.to(lse_out.dtype).sub_(lse_out))
        lp_out.clamp_(max=0.0).masked_fill_(ignore, 0.0)


def stats_bwd(x, tgt, lse, ent, g_lp, g_ent, inv_temp, ignore_index, dx_out):
    """Gradient of ``g_lp . logprob + g_ent . entropy`` w.r.t. ``x`` into ``dx_out``.

    ``dx_out`` may alias ``x`` (the fused-linear backward overwrites its
    recomputed logits chunk in place).
    """
    R, V = x.shape
    if R == 0:
        return
    acc = acc_dtype(x.dtype)
    direct = dx_out.dtype == acc  # write straight into the gradient
    hi, lo = split_lse(lse, acc)
    hi = hi.unsqueeze(1)
    if g_lp is not None:
        ignore, safe = _safe_targets(tgt, ignore_index)
        gl = g_lp.to(acc).masked_fill(ignore, 0.0).mul_(inv_temp).unsqueeze(1)
        # -g / T, times exp(-lo) when p = exp(z - hi) is not multiplied by it (log-probs only)
        neg_gl = gl.neg() if lo is None or g_ent is not None else gl.neg().mul_(lo.neg().exp_().unsqueeze(1))
        safe = safe.unsqueeze(1)
    if g_ent is not None:
        ge = g_ent.to(acc).mul(-inv_temp).unsqueeze(1)  # -g_ent / T
        H = ent.unsqueeze(1)
        if lo is not None:
            lo = lo.unsqueeze(1)

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        buf = None if direct else scratch(C, V, acc, x.device)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            c = x[j]
            d = dx_out[j]
            if direct:
                b = d
            else:
                b = buf[: c.shape[0]]
                c = b.copy_(c)  # upcast in cache (a mixed-dtype op would allocate)
            _z_minus(c, inv_temp, hi[j], b)  # z - hi
            if g_ent is None:
                b.exp_().mul_(neg_gl[j])  # -p * g / T
            else:
                if lo is not None:
                    b.sub_(lo[j])  # log p
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
    if fused and _compiled.logprob_grad_(x, hi.squeeze(1), neg_gl.squeeze(1), inv_temp, dx_out):
        dx_out.scatter_add_(1, safe, gl)  # one fused pass (large CPU inputs), then + onehot(t) g / T
        return
    run_rows(R, R * V, x.device, work)


def _row_lse(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float64 log-sum-exp of the rows of ``z`` into ``out``: ``max z + log sum exp(z - max z)``."""
    m = z.amax(-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    s = torch.exp(z - m).sum(-1)
    return torch.add(m.squeeze(1).to(out.dtype), s.to(out.dtype).log(), out=out)


def _log_softmax_(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """In place: ``z -> z - lse`` with the float64 ``lse`` split into ``hi - lo`` (see the module docstring)."""
    hi, lo = split_lse(lse, z.dtype)
    z.sub_(hi.unsqueeze(1))
    return z if lo is None else z.sub_(lo.unsqueeze(1))


def kl_fwd(x, y, inv_temp, kl_out, lse_p_out, lse_q_out):
    """Exact per-row KL(softmax(x/T) || softmax(y/T)); float64 log-sum-exps into ``lse_*_out``."""
    R, V = x.shape
    if R == 0:
        return
    acc = kl_out.dtype

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            zp = _z(x[j].to(acc), inv_temp, torch.empty(x[j].shape, dtype=acc, device=x.device))
            zq = _z(y[j].to(acc), inv_temp, torch.empty(y[j].shape, dtype=acc, device=y.device))
            logp = _log_softmax_(zp, _row_lse(zp, lse_p_out[j]))
            logq = _log_softmax_(zq, _row_lse(zq, lse_q_out[j]))
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
            logp = _log_softmax_(_z(x[j].to(acc), inv_temp, torch.empty(x[j].shape, dtype=acc, device=x.device)), lse_p[j])
            logq = _log_softmax_(_z(y[j].to(acc), inv_temp, torch.empty(y[j].shape, dtype=acc, device=y.device)), lse_q[j])
            p = logp.exp()
            if dy_out is not None:
                dy_out[j] = (logq.exp() - p).mul_(gs[j])
            if dx_out is not None:
                d = logp.sub_(logq).sub_(kl[j].unsqueeze(1)).mul_(p).masked_fill_(p == 0, 0.0)
                dx_out[j] = d.mul_(gs[j])

    run_rows(R, R * V, x.device, work)
