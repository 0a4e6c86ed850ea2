"""Chunked PyTorch implementation of the row primitives (CPU fast path).

All primitives work on a 2-D view ``x[R, V]`` (any strides, any float dtype)
and write into caller-provided outputs, so the autograd wrappers can tile a
tensor however they like.  The vocabulary is never materialised in fp32 for
more than ``rows_per_chunk`` rows at a time: each chunk of rows is read once
from memory, and the follow-up passes (``exp``, ``sum``) hit the cache.

Maths.  ``z = x * inv_temp`` is rounded once to the accumulation dtype (as
eager ``logits / T`` is), and every pass recomputes the same ``z``.  A row is
described by two numbers, a shift ``S`` near the top of ``z`` and
``c = log sum_v exp(z_v - S)``, so that ``lse = S + c`` and ``p = softmax z``::

    log p_v         = (z_v - S) - c
    logprob(t)      = log p_t                      (clamped to <= 0)
    entropy         = c - sum_v p_v (z_v - S)      (S = M = max z here)
    d logprob / d x = (onehot(t) - p) / T
    d entropy / d x = -p * (log p + H) / T
    KL(p || q)      = sum_v p_v (log p_v - log q_v)
    d KL / d x      = p * (log p - log q - KL) / T
    d KL / d y      = (q - p) / T

Precision: ``lse`` itself is never stored.  At logits of size ``|z|`` its fp32
rounding (``|z| * 6e-8``, 5e-4 at ``|z| = 1e4``) would become a relative error
of every ``p`` recomputed from it (it did: 1e-3 of the largest gradient entry).
``z_v - S`` is exact for every ``v`` that matters and ``c`` is small and kept
to fp32 precision, so ``p`` is as accurate as eager ``softmax(logits / T)``
whatever the magnitude.  ``S`` is ``M = max z`` (0 for a row of ``-inf``) or,
on the log-prob fast path when the caller keeps ``S``, ``lse`` rounded; a
caller that keeps no ``S`` (the fused LM head) gets ``M``, recomputed in the
backward by an ``amax``.

Shift-free fast path: ``s = sum exp z`` needs no max pass and is exact to
rounding whenever it comes out finite and not tiny (``exp`` overflows to
``inf`` instead of silently losing accuracy, and terms below the underflow
threshold are negligible next to ``s >= 1e-20``); ``c = log s - S`` is then
evaluated in float64, which keeps all of ``c``'s digits.  Only rows whose
``s`` is ``inf``/``nan``/tiny (logits beyond ~88 or all far below 0) are
redone with the shift ``M``.  The entropy takes the same ``s`` (and
``sum exp(z) (z - M)``), so asking for it changes no log-prob by a bit.  The
log-prob backward likewise skips the subtraction when every row's ``lse`` is
moderate: ``p = exp(z) * exp(-lse)`` with ``exp(-lse)`` from ``S + c`` in
float64.

``-inf`` logits (masked vocabularies) have ``p = 0``: they add 0 to the
entropy (``0 * -inf`` taken as 0) and to the KL where ``p = 0``, and get a 0
gradient.  A row of only ``-inf`` has no distribution: ``c = -inf`` and its
outputs are NaN.  Rows whose upstream gradient is 0 get an exactly-0 gradient
even where their value is NaN or infinite.

Rows are spread over single-threaded workers (``_threads.run_rows``); each
worker walks its rows in chunks of ``rows_per_chunk`` rows with its own fp32
scratch tile.
"""
from __future__ import annotations

import math
import struct

import torch

from . import _compiled
from ._threads import run_rows, scratch

# Bytes of fp32 scratch per chunk: a chunk of input rows plus its fp32 copy
# should stay in the per-core L2 cache on CPU.  On GPUs (torch fallback when
# Triton is missing) large chunks keep the kernel count down.
CPU_CHUNK_BYTES = 1 << 20
GPU_CHUNK_BYTES = 256 << 20
NEG_INF = float("-inf")


def rows_per_chunk(V: int, device: torch.device, max_rows: int) -> int:
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(max_rows, budget // (4 * max(V, 1))))


def _safe_targets(tgt: torch.Tensor, ignore_index: int):
    ignore = tgt == ignore_index
    return ignore, tgt.masked_fill(ignore, 0).long()


def _inv_temp(inv_temp: float, acc: torch.dtype) -> float:
    """``inv_temp`` rounded to ``acc``: ``x * inv_temp`` then rounds identically in eager and compiled code."""
    return inv_temp if acc == torch.float64 else struct.unpack("f", struct.pack("f", inv_temp))[0]


def _to_shift(xmax: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """In place: row max of ``x`` -> ``M = max z`` (rounding is monotone); 0 for a row of ``-inf``."""
    if inv_temp != 1.0:
        xmax.mul_(inv_temp)
    return xmax.masked_fill_(xmax == NEG_INF, 0.0)


def _z_minus_shift(c: torch.Tensor, b: torch.Tensor, shift: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """``b = z - S = c * inv_temp - shift`` (rounding ``z`` first, like every other pass); ``c`` may be ``b``."""
    if inv_temp != 1.0:
        return torch.mul(c, inv_temp, out=b).sub_(shift.unsqueeze(1))
    return torch.sub(c, shift.unsqueeze(1), out=b)


def _no_gradient_rows(dx: torch.Tensor, rows: torch.Tensor, g: torch.Tensor) -> None:
    """``rows`` have no finite value: a NaN gradient, or 0 where their upstream gradient ``g`` is 0."""
    if bool(rows.any()):
        dx[rows & (g != 0)] = float("nan")
        dx[rows & (g == 0)] = 0.0


def _shifted_sums(b: torch.Tensor, want_w: bool):
    """``b`` holds ``z - S``; returns ``s = sum exp(z - S)`` and, if asked, ``w = sum exp(z - S) (z - S)``."""
    e = torch.exp(b)
    s = e.sum(-1)
    if not want_w:
        return s, None
    return s, torch.nansum(b.mul_(e), -1)  # exp(-inf) * -inf = nan -> 0


def stats_fwd(x, tgt, inv_temp, ignore_index, lp_out, rel_out, ent_out, shift_out=None):
    """Per-row shift ``S`` and ``c = lse - S``; optionally log-prob of ``tgt`` and entropy.

    ``S`` is ``M = max z`` (for the entropy, for rows redone with the shift, and
    whenever ``shift_out`` is None: the backward then recomputes it) or else
    ``lse`` rounded to ``rel_out.dtype``, which costs no ``amax`` pass.  Asking
    for the entropy does not change ``c`` or the log-probs by a bit.
    """
    R, V = x.shape
    if R == 0:
        return
    acc = rel_out.dtype
    inv_temp = _inv_temp(inv_temp, acc)
    upcast = x.dtype != acc
    tiny = 1e-20 if acc == torch.float32 else 1e-200
    want_ent = ent_out is not None
    keep_max = want_ent or shift_out is None
    shift = shift_out if shift_out is not None else torch.empty(R, dtype=acc, device=x.device)
    ssum = rel_out  # s = sum exp(z), turned into c at the end
    # entropy: w = sum exp(z) (z - M) here, w / s then (shifted rows: both relative to M)

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        buf = scratch(C, V, acc, x.device)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            c = x[j]
            b = buf[: c.shape[0]]
            if upcast:
                c = b.copy_(c)  # chunked upcast: bf16/fp16 -> fp32 in cache
            if keep_max:
                shift[j] = c.amax(-1)
            if want_ent:  # the same s as without the entropy, and w
                z = c if inv_temp == 1.0 else torch.mul(c, inv_temp, out=b)
                e = torch.exp(z)
                torch.sum(e, dim=-1, out=ssum[j])
                z_m = torch.sub(z, _to_shift(shift[j].clone(), inv_temp).unsqueeze(1), out=b)
                ent_out[j] = torch.nansum(z_m.mul_(e), -1)  # exp(-inf) * -inf = nan -> 0
            elif inv_temp == 1.0:
                torch.sum(torch.exp(c, out=b), dim=-1, out=ssum[j])
            else:
                torch.sum(torch.mul(c, inv_temp, out=b).exp_(), dim=-1, out=ssum[j])

    fused = None if want_ent else _compiled.sum_exp(x, inv_temp)
    if fused is not None:  # one fused pass (large CPU inputs)
        ssum.copy_(fused)
        if keep_max:
            shift.copy_(x.amax(-1))
    else:
        run_rows(R, R * V, x.device, work)

    bad = (ssum < tiny) | ~torch.isfinite(ssum)
    log_s = ssum.double().log()
    if want_ent:
        ent_out.div_(ssum)
    if keep_max:
        _to_shift(shift, inv_temp)
    else:
        shift.copy_(log_s)  # S = lse, rounded: any S near lse will do
    rel_out.copy_(log_s.sub_(shift))  # c = log s - S in float64: both may be large, c is not
    rows = bad.nonzero().flatten()
    if rows.numel():  # rare: overflowed / underflowed sums, redone with the shift M
        C = rows_per_chunk(V, x.device, rows.numel())
        for k in range(0, rows.numel(), C):
            idx = rows[k : k + C]
            xs = x.index_select(0, idx).to(acc)
            m = _to_shift(xs.amax(-1), inv_temp)
            s, w = _shifted_sums(_z_minus_shift(xs, xs, m, inv_temp), want_ent)
            shift[idx] = m
            rel_out[idx] = s.log()  # -inf for a row of -inf
            if want_ent:
                ent_out[idx] = w / s
    if want_ent:
        # H = c - sum_v p_v (z_v - M), the shift of c being M too (nan for a row of -inf)
        torch.sub(rel_out, ent_out, out=ent_out).clamp_(min=0.0)
    if tgt is not None:
        ignore, safe = _safe_targets(tgt, ignore_index)
        zt = x.gather(1, safe.unsqueeze(1)).squeeze(1).to(acc).mul_(inv_temp)
        torch.sub(zt.sub_(shift), rel_out, out=lp_out)
        lp_out.clamp_(max=0.0).masked_fill_(ignore, 0.0)


def stats_bwd(x, tgt, rel, ent, g_lp, g_ent, inv_temp, ignore_index, dx_out, shift=None):
    """Gradient of ``g_lp . logprob + g_ent . entropy`` w.r.t. ``x`` into ``dx_out``.

    ``rel``/``shift`` are the forward's ``c`` and ``S`` (``shift=None``: ``S = M``, recomputed).
    ``dx_out`` may alias ``x`` (the fused-linear backward overwrites its
    recomputed logits chunk in place).
    """
    R, V = x.shape
    if R == 0:
        return
    acc = rel.dtype
    inv_temp = _inv_temp(inv_temp, acc)
    if shift is None:
        shift = _to_shift(x.amax(-1).to(acc), inv_temp)
    direct = dx_out.dtype == acc  # write straight into the gradient
    lse = shift.double() + rel  # float64: exact
    lo, hi = (v.item() for v in torch.aminmax(lse))
    odd = not (math.isfinite(lo) and math.isfinite(hi))  # rows of -inf (or NaN): fixed up at the end
    if g_lp is not None:
        ignore, safe = _safe_targets(tgt, ignore_index)
        gl = g_lp.to(acc).masked_fill(ignore, 0.0).mul_(inv_temp).unsqueeze(1)
        neg_gl = gl.neg()
        safe = safe.unsqueeze(1)
    if g_ent is not None:
        # -p (g_lp + g_ent (log p + H)) / T with p = exp(z - S) exp(-c), log p + H = (z - S) + (H - c):
        # exp(-c) goes into the per-row factors
        e_c = torch.exp(-rel).unsqueeze(1)
        ge = g_ent.to(acc).mul(-inv_temp).unsqueeze(1) * e_c  # -g_ent exp(-c) / T
        H_c = (ent - rel).unsqueeze(1)
        neg_gl_c = neg_gl * e_c if g_lp is not None else None
    else:
        # -g p / T = exp(z - S') * coef with coef = -g exp(S' - lse) / T.  When every lse is
        # moderate, S' = 0: exp(z) neither overflows nor loses precision, and the
        # subtraction pass is saved.
        unshifted = lo >= -20.0 and hi <= 80.0
        if unshifted:
            shift = torch.zeros_like(shift)
        coef = neg_gl * torch.exp(shift - lse).to(acc).unsqueeze(1)

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        buf = None if direct else scratch(C, V, acc, x.device)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            c = x[j]
            d = dx_out[j]
            b = d if direct else buf[: c.shape[0]]
            if not direct:
                c = b.copy_(c)  # upcast in cache
            if g_ent is None:
                if not unshifted:
                    _z_minus_shift(c, b, shift[j], inv_temp).exp_()
                elif inv_temp == 1.0:
                    torch.exp(c, out=b)
                else:
                    torch.mul(c, inv_temp, out=b).exp_()
                b.mul_(coef[j])  # -p * g / T
            else:
                _z_minus_shift(c, b, shift[j], inv_temp)
                e = torch.exp(b)
                b.add_(H_c[j]).mul_(ge[j])
                if g_lp is not None:
                    b.add_(neg_gl_c[j])
                b.mul_(e)
                b.masked_fill_(e == 0, 0.0)  # p log p -> 0 where p underflows / -inf logits
            if g_lp is not None:
                b.scatter_add_(1, safe[j], gl[j])  # + onehot(t) * g / T
            if not direct:
                d.copy_(b)

    fused = direct and g_ent is None and g_lp is not None
    if fused and _compiled.logprob_grad_(x, shift, coef.squeeze(1), inv_temp, dx_out):
        dx_out.scatter_add_(1, safe, gl)  # one fused pass (large CPU inputs), then + onehot(t) g / T
    else:
        run_rows(R, R * V, x.device, work)
    if odd:  # rows without a distribution
        g_all = torch.zeros_like(rel)
        if g_lp is not None:
            g_all += gl.squeeze(1).abs()
        if g_ent is not None:
            g_all += g_ent.to(acc).abs()
        _no_gradient_rows(dx_out, ~torch.isfinite(rel), g_all)


def _log_softmax_(z: torch.Tensor):
    """In place ``z -> log softmax z`` via ``(z - M) - c``; returns ``(M, c)`` per row and ``p``."""
    shift = _to_shift(z.amax(-1), 1.0)
    z.sub_(shift.unsqueeze(1))
    e = torch.exp(z)
    s = e.sum(-1, keepdim=True)
    rel = s.log()
    z.sub_(rel)
    return shift, rel.squeeze(1), e.div_(s)


def kl_fwd(x, y, inv_temp, kl_out, shift_p_out, rel_p_out, shift_q_out, rel_q_out):
    """Exact per-row KL(softmax(x/T) || softmax(y/T)); saves each side's shift ``M`` and ``c``."""
    R, V = x.shape
    if R == 0:
        return
    acc = kl_out.dtype
    inv_temp = _inv_temp(inv_temp, acc)

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            logp = x[j].to(acc) * inv_temp
            logq = y[j].to(acc) * inv_temp
            shift_p_out[j], rel_p_out[j], p = _log_softmax_(logp)
            shift_q_out[j], rel_q_out[j], _ = _log_softmax_(logq)
            # p > 0 = q gives +inf; p = 0 terms (-inf logits, underflow) give 0
            diff = logp.sub_(logq).mul_(p).masked_fill_(p == 0, 0.0)
            torch.sum(diff, dim=-1, out=kl_out[j])

    run_rows(R, R * V, x.device, work)
    kl_out.clamp_(min=0.0)


def kl_bwd(x, y, shift_p, rel_p, shift_q, rel_q, kl, g, inv_temp, dx_out, dy_out):
    """Gradients of ``g . KL``; a row with ``KL = +inf`` has a NaN ``dx`` (0 where ``g = 0``)."""
    R, V = x.shape
    if R == 0:
        return
    acc = kl.dtype
    inv_temp = _inv_temp(inv_temp, acc)
    gs = g.to(acc).mul(inv_temp).unsqueeze(1)
    # p = exp(z - S_p) exp(-c_p): the exp(-c)s go into per-row factors, and
    # log p - log q - KL = (z - S_p) - (z_q - S_q) - (c_p - c_q + KL)
    gp = gs * torch.exp(-rel_p).unsqueeze(1)
    gq = gs * torch.exp(-rel_q).unsqueeze(1)
    const = (rel_p - rel_q + kl).unsqueeze(1)

    def work(r0, r1):
        C = rows_per_chunk(V, x.device, r1 - r0)
        for i in range(r0, r1, C):
            j = slice(i, min(i + C, r1))
            dp = (x[j].to(acc) * inv_temp).sub_(shift_p[j].unsqueeze(1))
            dq = (y[j].to(acc) * inv_temp).sub_(shift_q[j].unsqueeze(1))
            ep = dp.exp()
            if dy_out is not None:  # g (q - p) / T
                dy_out[j] = dq.exp().mul_(gq[j]).addcmul_(ep, gp[j], value=-1.0)
            if dx_out is not None:
                d = dp.sub_(dq).sub_(const[j]).mul_(ep).masked_fill_(ep == 0, 0.0)
                dx_out[j] = d.mul_(gp[j])

    run_rows(R, R * V, x.device, work)
    gf = g.to(acc)
    if dx_out is not None:  # an infinite KL has no gradient w.r.t. the logits
        _no_gradient_rows(dx_out, ~torch.isfinite(kl), gf)
    if dy_out is not None:  # w.r.t. the reference logits it still has (q - p) / T, unless NaN
        _no_gradient_rows(dy_out, torch.isnan(kl), gf)
