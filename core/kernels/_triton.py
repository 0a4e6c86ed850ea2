"""Triton kernels for the row primitives (same signatures as ``_torch_impl``).

One program handles one row of ``x[R, V]`` and walks the vocabulary in blocks
of ``BLOCK`` columns, so any ``V`` works (the last block is masked).

A row is described by its shift ``m = max_v x_v`` (raw logits; 0 for a row of
``-inf``) and ``c = log sum_v exp((x_v - m) / T)``, so ``lse = m / T + c`` and
``log p_v = (x_v - m) / T - c``.  ``x_v - m`` is exact for every ``v`` that
matters and ``c`` is in ``[0, log V]``, so the backward's ``p`` is accurate at
any logit magnitude, whereas ``exp(x / T - lse)`` with ``lse`` rounded to fp32
(``|lse| * 6e-8``) is not; and no step depends on whether the compiler fuses a
multiply and an add into an FMA.  (The chunked PyTorch path shifts ``z = x / T``
instead; each backend's backward reads only what its own forward saved.)

Forward: an *online* log-sum-exp.  With running maximum ``m`` and running sum
``s = sum exp((x - m) / T)``, a new block updates::

    m' = max(m, max(x_block))
    s' = s * exp((m - m') / T) + sum exp((x_block - m') / T)

so the row is read exactly once.  The entropy uses the same trick for
``w = sum exp(d) d`` with ``d = (x - m) / T`` (kept relative to ``m`` so that
huge logits do not cancel catastrophically)::

    w' = exp((m - m') / T) (w + (m - m') / T s) + sum exp(d_block) d_block
    H  = c - w / s

and the KL kernel tracks both distributions, with
``w = sum exp(dp) (dp - dq)`` so that ``KL = w / sp - log sp + log sq``.

Backward: recompute ``p`` block by block from the saved ``m`` (recomputed by an
``amax`` for callers that keep none) and ``c``, and
write the gradient directly in the gradient tensor's dtype, so no ``[R, V]``
fp32 temporary exists.  Accumulation happens in ``ACC`` (fp32, or fp64 for
fp64 inputs so that ``gradcheck`` works under the interpreter).

``-inf`` logits and rows of only ``-inf``: see ``_torch_impl.py`` (same
results; ``0 * -inf`` terms are dropped with ``tl.where``, and the clamps are
written as ``where`` so that NaN survives them on every target).
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
    X, stride_xr, stride_xc, TGT, LP, SHIFT, REL, ENT,
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
        x = tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.reduce(x, 0, _max))
        # Shift by the new maximum; while no finite logit has been seen
        # (m_new == -inf) shift by 0 so that no "-inf - -inf" NaN appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        step = (m - shift) * inv_temp
        alpha = tl.exp(step)  # rescales the old sums (0 when s is empty)
        d = (x - shift) * inv_temp
        e = tl.exp(d)
        if HAS_ENT:
            carry = tl.where(s > 0, step, 0.0) * s
            w = alpha * (w + carry) + tl.reduce(e * tl.where(e > 0, d, 0.0), 0, _add)
        s = alpha * s + tl.reduce(e, 0, _add)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    c = tl.log(s)  # -inf for a row of -inf
    one = tl.arange(0, 1)
    tl.store(SHIFT + row + one, shift)
    tl.store(REL + row + one, c)
    if HAS_ENT:
        ent = c - w / s
        tl.store(ENT + row + one, tl.where(ent < 0, 0.0, ent))
    if HAS_TGT:
        tgt = tl.load(TGT + row + one)
        ignored = tgt == ignore_index
        safe = tl.where(ignored, 0, tgt)
        xt = tl.load(x_row + safe * stride_xc).to(ACC)
        lp = (xt - shift) * inv_temp - c
        lp = tl.where(ignored | (lp > 0), 0.0, lp)
        tl.store(LP + row + one, lp)


@triton.jit
def _stats_bwd_kernel(
    X, stride_xr, stride_xc, DX, stride_dr, stride_dc, TGT, SHIFT, REL, ENT, GLP, GENT,
    V, inv_temp, ignore_index,
    HAS_TGT: tl.constexpr, HAS_ENT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    dx_row = DX + row * stride_dr
    cols = tl.arange(0, BLOCK)
    one = tl.arange(0, 1)
    shift = tl.load(SHIFT + row + one)
    c = tl.load(REL + row + one)
    live = tl.full([1], 0.0, ACC)  # > 0: the row has an upstream gradient
    if HAS_TGT:
        tgt = tl.load(TGT + row + one)
        g_lp = tl.load(GLP + row + one).to(ACC) * inv_temp
        g_lp = tl.where(tgt == ignore_index, 0.0, g_lp)
        live += tl.where(g_lp == 0, 0.0, 1.0)
    if HAS_ENT:
        H = tl.load(ENT + row + one)
        g_ent = tl.load(GENT + row + one).to(ACC) * inv_temp
        live += tl.where(g_ent == 0, 0.0, 1.0)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        x = tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC)
        logp = (x - shift) * inv_temp - c
        p = tl.exp(logp)
        grad = tl.full([BLOCK], 0.0, ACC)
        if HAS_TGT:
            grad += g_lp * (tl.where(idx == tgt, 1.0, 0.0) - p)
        if HAS_ENT:
            grad -= g_ent * p * (tl.where(p > 0, logp, 0.0) + H)
        grad = tl.where(live > 0, grad, 0.0)  # exactly 0, even for a NaN row
        tl.store(dx_row + idx * stride_dc, grad.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _kl_fwd_kernel(
    X, stride_xr, stride_xc, Y, stride_yr, stride_yc, KL, SHIFTP, RELP, SHIFTQ, RELQ,
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
        xp = tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC)
        xq = tl.load(y_row + idx * stride_yc, mask=mask, other=float("-inf")).to(ACC)
        mp_new = tl.maximum(mp, tl.reduce(xp, 0, _max))
        mq_new = tl.maximum(mq, tl.reduce(xq, 0, _max))
        shift_p = tl.where(mp_new == float("-inf"), 0.0, mp_new)
        shift_q = tl.where(mq_new == float("-inf"), 0.0, mq_new)
        step_p = (mp - shift_p) * inv_temp
        ap = tl.exp(step_p)
        aq = tl.exp((mq - shift_q) * inv_temp)
        dp = (xp - shift_p) * inv_temp
        dq = (xq - shift_q) * inv_temp
        ep = tl.exp(dp)
        eq = tl.exp(dq)
        # old terms were relative to the old shifts; re-express them relative
        # to the new ones (an empty history, sp == 0, contributes nothing)
        old_q = tl.where(mq == float("-inf"), 0.0, mq)
        carry = tl.where(sp > 0, step_p - (old_q - shift_q) * inv_temp, 0.0) * sp
        live = ep > 0
        w = ap * (w + carry) + tl.reduce(ep * (tl.where(live, dp, 0.0) - tl.where(live, dq, 0.0)), 0, _add)
        sp = ap * sp + tl.reduce(ep, 0, _add)
        sq = aq * sq + tl.reduce(eq, 0, _add)
        mp = mp_new
        mq = mq_new
    one = tl.arange(0, 1)
    log_sp = tl.log(sp)
    log_sq = tl.log(sq)
    kl = w / sp - log_sp + log_sq
    tl.store(KL + row + one, tl.where(kl < 0, 0.0, kl))
    tl.store(SHIFTP + row + one, tl.where(mp == float("-inf"), 0.0, mp))
    tl.store(RELP + row + one, log_sp)
    tl.store(SHIFTQ + row + one, tl.where(mq == float("-inf"), 0.0, mq))
    tl.store(RELQ + row + one, log_sq)


@triton.jit
def _kl_bwd_kernel(
    X, stride_xr, stride_xc, Y, stride_yr, stride_yc, DX, stride_dxr, DY, stride_dyr,
    SHIFTP, RELP, SHIFTQ, RELQ, KL, G, V, inv_temp,
    HAS_DX: tl.constexpr, HAS_DY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xr
    y_row = Y + row * stride_yr
    cols = tl.arange(0, BLOCK)
    one = tl.arange(0, 1)
    shift_p = tl.load(SHIFTP + row + one)
    c_p = tl.load(RELP + row + one)
    shift_q = tl.load(SHIFTQ + row + one)
    c_q = tl.load(RELQ + row + one)
    kl = tl.load(KL + row + one)
    g = tl.load(G + row + one).to(ACC) * inv_temp
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        xp = tl.load(x_row + idx * stride_xc, mask=mask, other=float("-inf")).to(ACC)
        xq = tl.load(y_row + idx * stride_yc, mask=mask, other=float("-inf")).to(ACC)
        logp = (xp - shift_p) * inv_temp - c_p
        logq = (xq - shift_q) * inv_temp - c_q
        p = tl.exp(logp)
        if HAS_DX:
            live = p > 0
            dx = g * p * (tl.where(live, logp, 0.0) - tl.where(live, logq, 0.0) - kl)
            dx = tl.where(kl == float("inf"), float("nan"), dx)  # an infinite KL has no gradient
            dx = tl.where(g == 0, 0.0, dx)  # exactly 0, even for an infinite or NaN row
            tl.store(DX + row * stride_dxr + idx, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DY:
            dy = tl.where(g == 0, 0.0, g * (tl.exp(logq) - p))
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


def _shift_of(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The saved shift recomputed, for callers that keep none: row maximum, 0 for a row of -inf."""
    m = x.amax(-1).to(acc)
    return m.masked_fill_(m == float("-inf"), 0.0)


def stats_fwd(x, tgt, inv_temp, ignore_index, lp_out, rel_out, ent_out, shift_out=None):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    has_tgt = tgt is not None
    has_ent = ent_out is not None
    if shift_out is None:
        shift_out = torch.empty_like(rel_out)
    _stats_fwd_kernel[(R,)](
        x, x.stride(0), x.stride(1),
        tgt if has_tgt else rel_out, lp_out if has_tgt else rel_out, shift_out, rel_out,
        ent_out if has_ent else rel_out,
        V, float(inv_temp), int(ignore_index),
        HAS_TGT=has_tgt, HAS_ENT=has_ent, ACC=_acc(rel_out), BLOCK=block, num_warps=warps,
    )


def stats_bwd(x, tgt, rel, ent, g_lp, g_ent, inv_temp, ignore_index, dx_out, shift=None):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    has_tgt = g_lp is not None
    has_ent = g_ent is not None
    if shift is None:
        shift = _shift_of(x, rel.dtype)
    _stats_bwd_kernel[(R,)](
        x, x.stride(0), x.stride(1), dx_out, dx_out.stride(0), dx_out.stride(1),
        tgt if has_tgt else rel, shift, rel, ent if has_ent else rel,
        g_lp.contiguous() if has_tgt else rel, g_ent.contiguous() if has_ent else rel,
        V, float(inv_temp), int(ignore_index),
        HAS_TGT=has_tgt, HAS_ENT=has_ent, ACC=_acc(rel), BLOCK=block, num_warps=warps,
    )


def kl_fwd(x, y, inv_temp, kl_out, shift_p_out, rel_p_out, shift_q_out, rel_q_out):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    _kl_fwd_kernel[(R,)](
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1),
        kl_out, shift_p_out, rel_p_out, shift_q_out, rel_q_out,
        V, float(inv_temp), ACC=_acc(kl_out), BLOCK=block, num_warps=warps,
    )


def kl_bwd(x, y, shift_p, rel_p, shift_q, rel_q, kl, g, inv_temp, dx_out, dy_out):
    R, V = x.shape
    if R == 0:
        return
    block, warps = _config(V)
    for out in (dx_out, dy_out):
        assert out is None or out.stride(1) == 1
    _kl_bwd_kernel[(R,)](
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1),
        dx_out if dx_out is not None else kl, dx_out.stride(0) if dx_out is not None else 0,
        dy_out if dy_out is not None else kl, dy_out.stride(0) if dy_out is not None else 0,
        shift_p, rel_p, shift_q, rel_q, kl, g.contiguous(), V, float(inv_temp),
        HAS_DX=dx_out is not None, HAS_DY=dy_out is not None, ACC=_acc(kl), BLOCK=block,
        num_warps=warps,
    )
