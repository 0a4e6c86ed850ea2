"""Triton kernels for the row primitives (same signatures as ``_torch_impl``).

One program handles one row of ``x[R, V]`` and walks the vocabulary in blocks
of ``BLOCK`` columns, so any ``V`` works (the last block is masked).

Forward: an *online* log-sum-exp.  With ``z = x / T`` and running maximum
``m`` and running sum ``s = sum exp(z - m)``, a new block updates::

    m' = max(m, max(z_block))
    s' = s * exp(m - m') + sum exp(z_block - m')

so the row is read exactly once.  The entropy uses the same trick for
``w = sum exp(z - m) (z - m)`` (kept relative to ``m`` so that huge logits do
not cancel catastrophically)::

    w' = exp(m - m') (w + (m - m') s) + sum exp(z_block - m') (z_block - m')
    H  = log s - w / s

and the KL kernel tracks both distributions, with
``w = sum exp(zp - mp) ((zp - mp) - (zq - mq))`` so that
``KL = w / sp - log sp + log sq``.

The log-sum-exp ``lse = m + log s`` is stored in float64, one number per
row; the backward splits it into an ``ACC`` head and tail (``hi + lo``, see
``_dispatch.split_lse``) and recomputes ``log p = (z - hi) - lo`` block by
block, which is as accurate as eager ``log_softmax`` at any magnitude of the
logits.  It writes the gradient directly in the gradient tensor's dtype, so no
``[R, V]`` fp32 temporary exists.  Accumulation happens in ``ACC`` (fp32, or
fp64 for fp64 inputs so that ``gradcheck`` works under the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction

# The kernels use only core builtins plus ``tl.reduce`` - no ``tl.sum`` /
# ``tl.max`` / ``tl.zeros``.  Those live in triton.language.standard and are
# themselves @triton.jit functions, fixed to "compiled" or "interpreted" when
# triton is first imported; avoiding them lets ``_dispatch.triton_module`` load
# an interpreted copy of this file whatever was imported before.
#
# The combine functions are the ones tl.sum / tl.max use when available: the
# compiler treats them like any jit function, and the interpreter recognises
# them and reduces with numpy instead of element by element in Python.


@triton.jit
def _add_fallback(a, b):
    return a + b


@triton.jit
def _max_fallback(a, b):
    return tl.maximum(a, b)


_add = getattr(tl.standard, "_sum_combine", _add_fallback)
_max = getattr(tl.standard, "_elementwise_max", _max_fallback)


@triton.jit
def _stats_fwd_kernel(
    X, stride_xr, stride_xc, TGT, LP, LSE, ENT,
    V, inv_temp, ignore_index,
    HAS_TGT: tl.constexpr, HAS_ENT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    cols = tl.arange(0, BLOCK)
    m = tl.full([1], float("-inf"), ACC)
    s = tl.full([1], 0.0, ACC)
    w = tl.full([1], 0.0, ACC)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        z = tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC) * inv_temp
        m_new = tl.maximum(m, tl.reduce(z, 0, _max))
        # Shift by the new maximum; while no finite logit has been seen
        # (m_new == -inf) shift by 0 so that no "-inf - -inf" NaN appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)  # rescales the old sums (0 when s is empty)
        d = z - shift
        e = tl.exp(d)
        if HAS_ENT:
            carry = tl.where(s > 0, m - shift, 0.0) * s
            w = alpha * (w + carry) + tl.reduce(e * tl.where(e > 0, d, 0.0), 0, _add)
        s = alpha * s + tl.reduce(e, 0, _add)
        m = m_new
    log_s = tl.log(s)
    lse = m.to(tl.float64) + log_s.to(tl.float64)
    one = tl.arange(0, 1)
    tl.store(LSE + row + one, lse)
    if HAS_ENT:
        ent = tl.maximum(log_s - w / s, 0.0)
        tl.store(ENT + row + one, ent)
    if HAS_TGT:
        tgt = tl.load(TGT + row + one)
        ignored = tgt == ignore_index
        safe = tl.where(ignored, 0, tgt)
        zt = tl.load(x_row + safe * stride_xc).to(ACC) * inv_temp
        lp = tl.where(ignored, 0.0, tl.minimum((zt.to(tl.float64) - lse).to(ACC), 0.0))
        tl.store(LP + row + one, lp)


@triton.jit
def _stats_bwd_kernel(
    X, stride_xr, stride_xc, DX, stride_dr, stride_dc, TGT, LSE, ENT, GLP, GENT,
    V, inv_temp, ignore_index,
    HAS_TGT: tl.constexpr, HAS_ENT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    dx_row = DX + row * stride_dr
    cols = tl.arange(0, BLOCK)
    one = tl.arange(0, 1)
    lse = tl.load(LSE + row + one)
    hi = lse.to(ACC)
    lo = (lse - hi.to(tl.float64)).to(ACC)
    if HAS_TGT:
        tgt = tl.load(TGT + row + one)
        g_lp = tl.load(GLP + row + one).to(ACC) * inv_temp
        g_lp = tl.where(tgt == ignore_index, 0.0, g_lp)
    if HAS_ENT:
        H = tl.load(ENT + row + one)
        g_ent = tl.load(GENT + row + one).to(ACC) * inv_temp
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        z = tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC) * inv_temp
        logp = (z - hi) - lo
        p = tl.exp(logp)
        grad = tl.full([BLOCK], 0.0, ACC)
        if HAS_TGT:
            grad += g_lp * (tl.where(idx == tgt, 1.0, 0.0) - p)
        if HAS_ENT:
            grad -= g_ent * p * (tl.where(p > 0, logp, 0.0) + H)
        tl.store(dx_row + idx * stride_dc, grad.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _kl_fwd_kernel(
    X, stride_xr, stride_xc, Y, stride_yr, stride_yc, KL, LSEP, LSEQ,
    V, inv_temp, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    y_row = Y + row * stride_yr
    cols = tl.arange(0, BLOCK)
    mp = tl.full([1], float("-inf"), ACC)
    mq = tl.full([1], float("-inf"), ACC)
    sp = tl.full([1], 0.0, ACC)
    sq = tl.full([1], 0.0, ACC)
    w = tl.full([1], 0.0, ACC)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        zp = tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC) * inv_temp
        zq = tl.load(y_row + idx * stride_yc, mask=mask, other=float("-inf")).to(ACC) * inv_temp
        mp_new = tl.maximum(mp, tl.reduce(zp, 0, _max))
        mq_new = tl.maximum(mq, tl.reduce(zq, 0, _max))
        shift_p = tl.where(mp_new == float("-inf"), 0.0, mp_new)
        shift_q = tl.where(mq_new == float("-inf"), 0.0, mq_new)
        ap = tl.exp(mp - shift_p)
        aq = tl.exp(mq - shift_q)
        dp = zp - shift_p
        dq = zq - shift_q
        ep = tl.exp(dp)
        eq = tl.exp(dq)
        # old terms were relative to (mp, mq); re-express them relative to the
        # new shifts (an empty history, sp == 0, contributes nothing)
        old_p = tl.where(sp > 0, mp, shift_p)
        old_q = tl.where(sp > 0, mq, shift_q)
        carry = ((old_p - shift_p) - (old_q - shift_q)) * sp
        live = ep > 0
        w = ap * (w + carry) + tl.reduce(ep * (tl.where(live, dp, 0.0) - tl.where(live, dq, 0.0)), 0, _add)
        sp = ap * sp + tl.reduce(ep, 0, _add)
        sq = aq * sq + tl.reduce(eq, 0, _add)
        mp = mp_new
        mq = mq_new
    one = tl.arange(0, 1)
    log_sp = tl.log(sp)
    log_sq = tl.log(sq)
    tl.store(KL + row + one, tl.maximum(w / sp - log_sp + log_sq, 0.0))
    tl.store(LSEP + row + one, mp.to(tl.float64) + log_sp.to(tl.float64))
    tl.store(LSEQ + row + one, mq.to(tl.float64) + log_sq.to(tl.float64))


@triton.jit
def _kl_bwd_kernel(
    X, stride_xr, stride_xc, Y, stride_yr, stride_yc, DX, stride_dxr, DY, stride_dyr,
    LSEP, LSEQ, KL, G, V, inv_temp,
    HAS_DX: tl.constexpr, HAS_DY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    y_row = Y + row * stride_yr
    cols = tl.arange(0, BLOCK)
    one = tl.arange(0, 1)
    lse_p = tl.load(LSEP + row + one)
    lse_q = tl.load(LSEQ + row + one)
    hi_p = lse_p.to(ACC)
    lo_p = (lse_p - hi_p.to(tl.float64)).to(ACC)
    hi_q = lse_q.to(ACC)
    lo_q = (lse_q - hi_q.to(tl.float64)).to(ACC)
    kl = tl.load(KL + row + one)
    g = tl.load(G + row + one).to(ACC) * inv_temp
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        logp = (tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC) * inv_temp - hi_p) - lo_p
        logq = (tl.load(y_row + idx * stride_yc, mask=mask, other=float("-inf")).to(ACC) * inv_temp - hi_q) - lo_q
        p = tl.exp(logp)
        if HAS_DX:
            live = p > 0
            dx = g * p * (tl.where(live, logp, 0.0) - tl.where(live, logq, 0.0) - kl)
            tl.store(DX + row * stride_dxr + idx, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DY:
            dy = g * (tl.exp(logq) - p)
            tl.store(DY + row * stride_dyr + idx, dy.to(DY.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# launchers

INTERPRETED = isinstance(_stats_fwd_kernel, InterpretedFunction)
# Under the interpreter small blocks keep the (numpy) work per step small and
# make the tests walk several blocks; on GPU 4096 columns per step.
MAX_BLOCK = 128 if INTERPRETED else 4096


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _config(V: int):
    block = min(triton.next_power_of_2(max(V, 1)), MAX_BLOCK)
    warps = 4 if block <= 1024 else 8 if block <= 2048 else 16
    return block, warps


def stats_fwd(x, tgt, inv_temp, ignore_index, lp_out, lse_out, ent_out):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    has_tgt = tgt is not None
    has_ent = ent_out is not None
    _stats_fwd_kernel[(R,)](
        x, x.stride(0), x.stride(1),
        tgt if has_tgt else lse_out, lp_out if has_tgt else lse_out, lse_out,
        ent_out if has_ent else lse_out,
        V, float(inv_temp), int(ignore_index),
        HAS_TGT=has_tgt, HAS_ENT=has_ent, ACC=_acc(x), BLOCK=block, num_warps=warps,
    )


def stats_bwd(x, tgt, lse, ent, g_lp, g_ent, inv_temp, ignore_index, dx_out):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    has_tgt = g_lp is not None
    has_ent = g_ent is not None
    _stats_bwd_kernel[(R,)](
        x, x.stride(0), x.stride(1), dx_out, dx_out.stride(0), dx_out.stride(1),
        tgt if has_tgt else lse, lse, ent if has_ent else lse,
        g_lp.contiguous() if has_tgt else lse, g_ent.contiguous() if has_ent else lse,
        V, float(inv_temp), int(ignore_index),
        HAS_TGT=has_tgt, HAS_ENT=has_ent, ACC=_acc(x), BLOCK=block, num_warps=warps,
    )


def kl_fwd(x, y, inv_temp, kl_out, lse_p_out, lse_q_out):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    _kl_fwd_kernel[(R,)](
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), kl_out, lse_p_out, lse_q_out,
        V, float(inv_temp), ACC=_acc(kl_out), BLOCK=block, num_warps=warps,
    )


def kl_bwd(x, y, lse_p, lse_q, kl, g, inv_temp, dx_out, dy_out):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    for out in (dx_out, dy_out):
        assert out is None or out.stride(1) == 1
    _kl_bwd_kernel[(R,)](
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1),
        dx_out if dx_out is not None else lse_p, dx_out.stride(0) if dx_out is not None else 0,
        dy_out if dy_out is not None else lse_p, dy_out.stride(0) if dy_out is not None else 0,
        lse_p, lse_q, kl, g.contiguous(), V, float(inv_temp),
        HAS_DX=dx_out is not None, HAS_DY=dy_out is not None, ACC=_acc(kl), BLOCK=block,
        num_warps=warps,
    )
