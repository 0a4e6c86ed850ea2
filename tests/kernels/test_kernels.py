"""Correctness of rlhfzoo.kernels against float64 PyTorch references.

Every numerical test runs on two backends:

* ``torch``  - the chunked CPU fast path (what CPU callers get);
* ``triton`` - the Triton kernels, run on CPU tensors by the Triton
  interpreter.  ``rlhfzoo.kernels`` loads an interpreted copy of its kernel
  module on demand, so this works in the same pytest process whatever imported
  ``triton`` before and whether or not ``TRITON_INTERPRET`` is set
  (``test_triton_interpreter_independent_of_import_order`` checks both).

The interpreter is slow (~10 ms per program and block), so Triton cases use a
handful of rows and V = 300 (three 128-wide blocks, the last one partial).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhfzoo.kernels as K
from rlhfzoo.kernels import _dispatch

from kernel_references import (  # tests/kernels is on the test path (pyproject: pythonpath)
    BACKENDS, HAS_TRITON, V, assert_grad_close, grad_of, make_logits, make_targets, randn, ref_entropy, ref_kl, ref_logprobs, tol,
)


# ----------------------------------------------------------------------------
# logprobs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("noncontig", [False, True])
def test_logprobs_matches_reference(backend, dtype, T, noncontig):
    x = make_logits((2, 3, V), dtype, noncontig=noncontig)
    # non-contiguous case: logits[:, :-1] of a leaf [2, 4, V] buffer
    leaf = (x._base if noncontig else x).detach().requires_grad_(True)
    x = leaf[:, :-1] if noncontig else leaf
    t = make_targets((2, 3), V)
    fwd_tol, _ = tol(dtype)

    out = K.logprobs(x, t, temperature=T, backend=backend)
    ref = ref_logprobs(x.detach(), t, T)
    assert out.dtype == torch.float32 and out.shape == t.shape
    torch.testing.assert_close(out.double(), ref, **fwd_tol)
    assert (out <= 0).all()

    g = randn(*t.shape)
    got = grad_of(out, leaf, g)
    xr = leaf.detach().double().requires_grad_(True)
    want = grad_of(ref_logprobs(xr[:, :-1] if noncontig else xr, t, T), xr, g)
    assert got.dtype == dtype
    assert_grad_close(got, want, dtype)
    if noncontig:  # the unused last position gets no gradient
        assert (got[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_single_token(backend):
    x = make_logits((V,), torch.float32).requires_grad_(True)
    t = torch.tensor(7)
    out = K.logprobs(x, t, backend=backend)
    assert out.shape == ()
    torch.testing.assert_close(out.double(), ref_logprobs(x.detach(), t), atol=2e-5, rtol=1e-5)
    out.backward()
    want = -torch.softmax(x.detach().double(), -1)
    want[7] += 1
    torch.testing.assert_close(x.grad.double(), want, atol=1e-6, rtol=1e-4)
    # [1, V] too
    out1 = K.logprobs(x.detach()[None], t[None], backend=backend)
    torch.testing.assert_close(out1[0], out.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_ignore_whole_row(backend):
    x = make_logits((2, 4, V), torch.float32).requires_grad_(True)
    t = make_targets((2, 4), V, ignore_frac=0.0)
    t[1] = -100
    out = K.logprobs(x, t, backend=backend)
    assert (out[1] == 0).all() and (out[0] < 0).all()
    out.sum().backward()
    assert (x.grad[1] == 0).all()
    assert x.grad[0].abs().sum() > 0
    # custom ignore_index
    t2 = t.masked_fill(t == -100, 5)
    t2[0, 0] = 5
    out2 = K.logprobs(x.detach(), t2, ignore_index=5, backend=backend)
    assert out2[0, 0] == 0 and (out2[1] == 0).all() and (out2[0, 1:] < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_large_magnitude(backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = ((torch.rand(2, 3, V, generator=g, dtype=torch.float64) * 2 - 1) * 9e3).to(dtype)
    x[0, 0, 11] = 1e4  # a dominant target: log-prob is exactly 0, never > 0
    t = make_targets((2, 3), V, ignore_frac=0.0)
    t[0, 0] = 11
    x.requires_grad_(True)
    for T in (1.0, 0.5):
        out = K.logprobs(x, t, temperature=T, backend=backend)
        ref = ref_logprobs(x.detach(), t, T)
        assert torch.isfinite(out).all() and (out <= 0).all()
        assert out[0, 0] == 0
        # values are ~1e4: relative fp32 accuracy
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-5)
        gx = grad_of(out, x, torch.ones(2, 3, dtype=torch.float64))
        assert torch.isfinite(gx).all()
        xr = x.detach().double().requires_grad_(True)
        want = grad_of(ref_logprobs(xr, t, T), xr, torch.ones(2, 3, dtype=torch.float64))
        torch.testing.assert_close(gx.double(), want, atol=1e-5, rtol=1e-2)


def test_logprobs_shift_free_fast_path_agrees():
    # moderate logits take the shift-free path, wide ones the shifted path
    t = make_targets((4, 6), 1000)
    for scale in (1.0, 20.0, 200.0):
        x = make_logits((4, 6, 1000), torch.float32, scale=scale)
        torch.testing.assert_close(K.logprobs(x, t).double(), ref_logprobs(x, t), atol=3e-5, rtol=1e-6)
    # mixed rows in one chunk: overflowing (> 88), all far below 0, ordinary
    x = make_logits((4, 6, 1000), torch.float32, scale=2.0)
    x[0, 1] += 500.0
    x[1, 2] -= 500.0
    x[2, 3, 17] = 95.0
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        for T in (1.0, 0.5):
            torch.testing.assert_close(K.logprobs(xd, t, temperature=T).double(), ref_logprobs(xd, t, T),
                                       atol=1e-4, rtol=1e-6)


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_compiled_cpu_path(monkeypatch):
    """Large CPU inputs get the unshifted sum and the log-prob gradient from torch.compile'd
    passes; they must agree with the float64 reference, temperature included, and hand
    overflowing / underflowing rows to the shifted fallback exactly like the chunked path."""
    import warnings

    from rlhfzoo.kernels import _compiled

    monkeypatch.setattr(_compiled, "MIN_ELEMENTS", 1000)  # so a small test input takes the path
    monkeypatch.setitem(_compiled._state, "fn", None)
    t = make_targets((4, 6), 1000)
    x = make_logits((4, 6, 1000), torch.float32, scale=3.0)
    x[0, 1] += 500.0  # overflows exp
    x[1, 2] -= 500.0  # underflows
    x[2, 3, 17] = 95.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            for T in (1.0, 0.6):
                torch.testing.assert_close(K.logprobs(xd, t, temperature=T).double(), ref_logprobs(xd, t, T), atol=1e-4, rtol=1e-6)
        # the backward's fused pass -g p / T, on logits and inside the fused-linear backward
        xr = x.double().requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        g = randn(4, 6)
        for T in (1.0, 0.6):
            assert_grad_close(grad_of(K.logprobs(xg, t, temperature=T), xg, g), grad_of(ref_logprobs(xr, t, T), xr, g), torch.float32)
        # moderate logits (the unshifted sum) and logits ~1e4: as accurate as eager fp32
        moderate = make_logits((4, 6, 1000), torch.float32, scale=3.0)
        for xp in (moderate, moderate + 1e4):
            xp.requires_grad_(True)
            xpr = xp.detach().double().requires_grad_(True)
            for T in (1.0, 1.3):
                want = grad_of(ref_logprobs(xpr, t, T), xpr, g)
                ours = grad_of(K.logprobs(xp, t, temperature=T), xp, g).double()
                eager = grad_of(torch.log_softmax(xp / T, -1).gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
                                .masked_fill(t == -100, 0.0), xp, g).double()
                err, err_eager = ((a - want).abs().max() / want.abs().max() for a in (ours, eager))
                assert err <= 4 * err_eager + 2e-7, (T, err, err_eager)
        h = make_logits((40, 16), torch.float32, scale=1.0, seed=5).requires_grad_(True)
        w = make_logits((300, 16), torch.float32, scale=0.3, seed=6).requires_grad_(True)
        tl = make_targets((40,), 300)
        hr, wr = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        ours = K.linear_logprobs(h, w, tl, chunk_size=15)  # 15 x 300 > MIN_ELEMENTS; 15 does not divide 40
        ref = ref_logprobs(hr @ wr.T, tl)
        torch.testing.assert_close(ours.double(), ref.detach(), atol=2e-5, rtol=1e-5)
        gl = randn(40)
        for a, b in zip(torch.autograd.grad(ours, (h, w), gl.float()), torch.autograd.grad(ref, (hr, wr), gl)):
            torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)
    if _compiled._state["failed"]:
        pytest.skip(f"torch.compile is not usable here: {[str(w.message) for w in caught]}")
    assert _compiled._state["fn"] is not None and _compiled._state["grad_fn"] is not None  # compiled and used above
    assert _compiled.sum_exp(x[0, :, :100], 1.0) is None  # below the size threshold (600 elements)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_parallel_cpu_path(dtype):
    """Inputs above _threads.MIN_PARALLEL_ELEMENTS are split over worker threads."""
    from rlhfzoo.kernels import _threads

    shape = (4, 70, 8000)
    assert shape[0] * shape[1] * shape[2] >= _threads.MIN_PARALLEL_ELEMENTS
    x = make_logits(shape, dtype, scale=4.0).requires_grad_(True)
    y = make_logits(shape, dtype, seed=3)
    t = make_targets(shape[:2], shape[2])
    g = randn(*shape[:2])
    fwd_tol, _ = tol(dtype)
    xr = x.detach().double().requires_grad_(True)
    for T in (1.0, 0.7):
        for ours, ref in (
            (K.logprobs(x, t, temperature=T), ref_logprobs(xr, t, T)),
            (K.entropy(x, temperature=T), ref_entropy(xr, T)),
            (K.vocab_kl(x, y, temperature=T), ref_kl(xr, y, T)),
        ):
            torch.testing.assert_close(ours.double(), ref.detach(), **fwd_tol)
            assert_grad_close(grad_of(ours, x, g), grad_of(ref, xr, g), dtype)
    assert torch.get_num_threads() == torch.get_num_threads()  # pool set-up left the caller alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_never_positive(backend):
    # a nearly one-hot distribution in every row; rounding could give +eps
    x = torch.full((4, V), -30.0)
    t = torch.arange(4) * 7
    x[torch.arange(4), t] = 30.0
    out = K.logprobs(x, t, backend=backend)
    assert (out <= 0).all()
    assert out.abs().max() < 1e-6


def test_logprobs_fp16_and_int32_targets():
    x = make_logits((3, V), torch.float16)
    t = make_targets((3,), V, ignore_frac=0.0).int()
    out = K.logprobs(x, t)
    torch.testing.assert_close(out.double(), ref_logprobs(x, t.long()), atol=2e-5, rtol=1e-5)


def test_logprobs_no_grad_and_fp64_dtype():
    x = make_logits((3, V), torch.float64)
    t = make_targets((3,), V)
    with torch.no_grad():
        out = K.logprobs(x, t)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_logprobs(x, t), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------
# entropy and vocab KL

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 1.3])
def test_entropy_matches_reference(backend, dtype, T):
    x = make_logits((2, 3, V), dtype).requires_grad_(True)
    fwd_tol, _ = tol(dtype)
    out = K.entropy(x, temperature=T, backend=backend)
    torch.testing.assert_close(out.double(), ref_entropy(x.detach(), T), **fwd_tol)
    g = randn(2, 3)
    xr = x.detach().double().requires_grad_(True)
    assert_grad_close(grad_of(out, x, g), grad_of(ref_entropy(xr, T), xr, g), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_bitwise_unchanged_by_entropy(backend):
    """Asking linear_logprobs for the entropy too leaves the log-probs bit-for-bit the same (PPO's
    ratio is exactly 1 before an update whichever of the two computed the old log-probs), also
    for rows redone with the shift (logits beyond ~88)."""
    h = make_logits((12, 16), torch.float32, scale=1.0, seed=5)
    w = make_logits((V, 16), torch.float32, scale=0.4, seed=6)
    h[3] *= 200.0
    t = make_targets((12,), V)
    for T in (1.0, 0.7):
        lp = K.linear_logprobs(h, w, t, temperature=T, backend=backend)
        lp2, ent = K.linear_logprobs(h, w, t, temperature=T, return_entropy=True, backend=backend)
        assert torch.equal(lp, lp2)
        torch.testing.assert_close(ent.double(), ref_entropy(h.double() @ w.double().T, T), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_large_magnitude(backend):
    x = make_logits((3, V), torch.float32, scale=1e4)
    x[0] = 5e3  # uniform row: entropy log V
    out = K.entropy(x, backend=backend)
    assert (out >= 0).all()
    torch.testing.assert_close(out.double(), ref_entropy(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 0.8])
def test_vocab_kl_matches_reference(backend, dtype, T):
    x = make_logits((2, 3, V), dtype, seed=4, noncontig=False).requires_grad_(True)
    y = make_logits((2, 3, V), dtype, seed=5, noncontig=True)
    y_leaf = y._base.detach().requires_grad_(True)
    y = y_leaf[:, :-1]
    fwd_tol, _ = tol(dtype)
    out = K.vocab_kl(x, y, temperature=T, backend=backend)
    torch.testing.assert_close(out.double(), ref_kl(x.detach(), y.detach(), T), **fwd_tol)
    assert (out >= 0).all()
    g = randn(2, 3)
    gx, gy = torch.autograd.grad(out, [x, y_leaf], g.float())
    xr = x.detach().double().requires_grad_(True)
    yr = y_leaf.detach().double().requires_grad_(True)
    wx, wy = torch.autograd.grad(ref_kl(xr, yr[:, :-1], T), [xr, yr], g)
    assert_grad_close(gx, wx, dtype)
    assert_grad_close(gy, wy, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_kl_identical_and_shifted(backend):
    x = make_logits((3, V), torch.float32, scale=1e4)
    # KL is shift-invariant per row, and zero for identical distributions
    out = K.vocab_kl(x, x + 1e4, backend=backend)
    assert out.abs().max() < 1e-3
    y = make_logits((3, V), torch.float32, seed=9)
    x2 = make_logits((3, V), torch.float32, seed=8)
    kl = K.vocab_kl(x2, y, backend=backend)
    torch.testing.assert_close(kl.double(), ref_kl(x2, y), atol=2e-5, rtol=1e-5)
    # ref gradient skipped when ref is detached
    xg = x2.clone().requires_grad_(True)
    K.vocab_kl(xg, y, backend=backend).sum().backward()
    assert xg.grad is not None


# ----------------------------------------------------------------------------
# token KL estimators

def test_token_kl_estimators():
    lp = randn(4, 5, seed=5).requires_grad_(True)
    ref = randn(4, 5, seed=6)
    r = lp.detach() - ref
    torch.testing.assert_close(K.token_kl(lp, ref, "k1"), r)
    torch.testing.assert_close(K.token_kl(lp, ref, "k2"), r * r / 2)
    torch.testing.assert_close(K.token_kl(lp, ref, "k3"), torch.exp(-r) + r - 1)
    assert (K.token_kl(lp, ref, "k3") >= 0).all() and (K.token_kl(lp, ref, "k2") >= 0).all()
    assert K.token_kl(lp, ref).shape == lp.shape  # default k1
    for est in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda a, b: K.token_kl(a, b, est), (lp, ref.clone().requires_grad_(True)))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        K.token_kl(lp, ref, "k4")


# ----------------------------------------------------------------------------
# gradcheck in float64

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(9)
    n, v = (2, 20) if backend == "triton" else (3, 37)
    x = torch.randn(n, v, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, v, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[0] = -100 if n > 2 else t[0]
    # the interpreter is slow: check a random projection of the Jacobian for Triton
    fast = backend == "triton"
    gc = lambda f, inputs: torch.autograd.gradcheck(f, inputs, fast_mode=fast)  # noqa: E731
    assert gc(lambda a: K.logprobs(a, t, temperature=0.7, backend=backend), (x,))
    assert gc(lambda a: K.entropy(a, temperature=1.3, backend=backend), (x,))
    assert gc(lambda a, b: K.vocab_kl(a, b, temperature=0.9, backend=backend), (x, y))
    h = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    assert gc(lambda h_, w_, b_: K.linear_logprobs(h_, w_, t, b_, temperature=0.8, return_entropy=True,
                                                    chunk_size=2, backend=backend), (h, w, b))


# ----------------------------------------------------------------------------
# API and dispatch

def test_dispatch_and_validation():
    x = make_logits((2, V), torch.float32)
    t = make_targets((2,), V)
    assert _dispatch.resolve_backend("auto", x) == "torch"  # CPU tensor
    torch.testing.assert_close(K.logprobs(x, t, backend="eager"), K.logprobs(x, t), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        K.logprobs(x, t, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        K.logprobs(x, t, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        K.logprobs(x, t[:1])
    with pytest.raises(ValueError, match="shape"):
        K.vocab_kl(x, x[:1])
    with pytest.raises(ValueError):
        K.linear_logprobs(torch.randn(2, 4), torch.randn(V, 5), t)
    assert set(K.__all__) >= {"logprobs", "linear_logprobs", "token_kl", "vocab_kl", "entropy"}


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_interpreter_independent_of_import_order():
    import triton  # noqa: F401  (already imported, possibly without TRITON_INTERPRET)

    mod = _dispatch.triton_module(interpret=True)
    assert mod.INTERPRETED
    # and in a fresh process where TRITON_INTERPRET=1 is set before anything
    code = textwrap.dedent(
        """
        import torch, rlhfzoo.kernels as K
        from rlhfzoo.kernels import _dispatch, _triton
        assert _triton.INTERPRETED and _dispatch.triton_module(True) is _triton
        x = torch.randn(3, 200); t = torch.tensor([1, -100, 5])
        torch.testing.assert_close(K.logprobs(x, t, backend="triton"), K.logprobs(x, t), atol=1e-5, rtol=1e-5)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA")
def test_cuda_triton_matches_reference():
    x = make_logits((4, 1000), torch.bfloat16).cuda().requires_grad_(True)
    t = make_targets((4,), 1000).cuda()
    out = K.logprobs(x, t)
    torch.testing.assert_close(out.double().cpu(), ref_logprobs(x.detach().cpu(), t.cpu()), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    xr = x.detach().cpu().double().requires_grad_(True)
    ref_logprobs(xr, t.cpu()).sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=1e-6, rtol=1e-2)
