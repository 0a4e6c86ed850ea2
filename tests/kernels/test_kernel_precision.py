"""Numerical edge cases of rlhfzoo.kernels: gradients at any logit magnitude, masked vocabularies.

Precision.  The fused backward recomputes ``p = softmax(logits / T)`` row by row.  Recomputing it
as ``exp(z - lse)`` from an fp32 ``lse`` turns the rounding of ``lse`` (``|lse| * 6e-8``) into a
relative error of every ``p``: at logits ~1e4 that puts the fp32 gradient off by 1e-3 of its
largest entry (2e-4 at T = 1, 3e-6 at logits ~30), where eager fp32 ``log_softmax(logits / T)`` is
off by ~1e-7.  So each fp32 gradient is measured against a float64 reference, as the largest error over
the rows relative to the largest gradient entry, and must stay within 4x eager fp32's error
+ 2e-7, for logits of magnitude 1, 30 (about the largest whose unshifted ``sum exp(z)`` fits fp32),
1e2 and 1e4, both peaked (``mag * randn``) and flat but far from 0 (``mag + 3 randn``).

Masked vocabularies: ``-inf`` logits (top-k masking) have probability 0 and must neither turn
entropy / KL / gradients into NaN nor change the values of the remaining distribution.
"""
from __future__ import annotations

import math

import pytest
import torch

import rlhfzoo.kernels as K

from kernel_references import HAS_TRITON

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))
KINDS_MAGS = [(kind, mag) for kind in ("scale", "offset") for mag in (1.0, 30.0, 1e2, 1e4)]
NEG_INF = float("-inf")
# the Triton interpreter runs the kernels in numpy, which warns about log(0) and 0/0 of masked rows
pytestmark = [pytest.mark.filterwarnings("ignore:(divide by zero|invalid value) encountered:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]


def make(kind, mag, rows, V, seed):
    """fp32 logits: peaked ``mag * randn`` or flat ``mag + 3 randn``."""
    r = torch.randn(rows, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (r * mag if kind == "scale" else mag + 3.0 * r).float()


def eager_logprobs(x, t, T):
    return torch.log_softmax(x / T, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def eager_entropy(x, T):
    lp = torch.log_softmax(x / T, -1)
    return -(lp.exp() * lp).sum(-1)


def eager_kl(x, y, T):
    lp, lq = torch.log_softmax(x / T, -1), torch.log_softmax(y / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def grads(fn, inputs, g):
    """Gradients of ``fn(*inputs) . g`` w.r.t. every input, in float64."""
    leaves = [a.detach().clone().requires_grad_(True) for a in inputs]
    out = fn(*leaves)
    return [d.double() for d in torch.autograd.grad(out, leaves, g.to(out.dtype))]


def check_precision(fused, eager, inputs, g, groups, label, scales=None):
    """Per row group: error of ``fused``'s fp32 gradients vs float64 ``eager``, against eager fp32's.

    ``scales``: per input, a function of the group's rows giving the error scale
    (default: the largest reference gradient entry).
    """
    want = grads(eager, [a.double() for a in inputs], g.double())
    ours, theirs = grads(fused, inputs, g), grads(eager, inputs, g)
    for name, rows in groups:
        for k in range(len(inputs)):
            s = scales[k](rows) if scales else want[k][rows].abs().max().item()
            e_ours = (ours[k][rows] - want[k][rows]).abs().max().item() / s
            e_eager = (theirs[k][rows] - want[k][rows]).abs().max().item() / s
            assert e_ours <= 4 * e_eager + 2e-7, \
                f"{label} {name} input {k}: gradient error {e_ours:.2e} vs eager fp32 {e_eager:.2e}"


def natural_scales(x, y, g, T):
    """Entropy gradients vanish on peaked rows: errors relative to max|g| / T.  The KL's logits
    gradient ``p (log p - log q - KL)`` cancels terms of the size of the KL, in eager fp32 too:
    relative to ``(1 + KL) max|g| / T`` there."""
    kl = eager_kl(x.double(), y.double(), T)
    gs = lambda rows: g[rows].abs().max().item() / T  # noqa: E731
    return [gs], [lambda rows: gs(rows) * (1 + kl[rows].max().item()), gs]


# ----------------------------------------------------------------------------
# precision: the chunked CPU path, one call per magnitude (rows with a moderate log-sum-exp take
# the unshifted paths, the others the shifted ones)

@pytest.mark.parametrize("T", [1.0, 1.3])
@pytest.mark.parametrize("kind, mag", KINDS_MAGS)
def test_grad_precision_torch(kind, mag, T):
    V, R = 300, 64
    x = make(kind, mag, R, V, seed=1)
    y = make(kind, mag, R, V, seed=2)
    t = torch.randint(0, V, (R,), generator=torch.Generator().manual_seed(3))
    g = torch.randn(R, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows = [(f"{kind} {mag:g} T={T}", slice(None))]
    ent_scales, kl_scales = natural_scales(x, y, g, T)
    check_precision(lambda a: K.logprobs(a, t, temperature=T, backend="torch"),
                    lambda a: eager_logprobs(a, t, T), [x], g, rows, "logprobs")
    check_precision(lambda a: K.entropy(a, temperature=T, backend="torch"),
                    lambda a: eager_entropy(a, T), [x], g, rows, "entropy", ent_scales)
    check_precision(lambda a, b: K.vocab_kl(a, b, temperature=T, backend="torch"),
                    lambda a, b: eager_kl(a, b, T), [x, y], g, rows, "vocab_kl", kl_scales)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("T", [1.0, 1.3])
def test_grad_precision_triton(T):
    """The Triton kernels (interpreted): all magnitudes in one call, 4 rows each (the interpreter is
    slow; 30 is left out, the online log-sum-exp has no unshifted path)."""
    V, R = 200, 4
    cases = [(kind, mag) for kind, mag in KINDS_MAGS if mag != 30.0]
    x = torch.cat([make(kind, mag, R, V, seed=1) for kind, mag in cases])
    y = torch.cat([make(kind, mag, R, V, seed=2) for kind, mag in cases])
    t = torch.randint(0, V, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    g = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    groups = [(f"{kind} {mag:g} T={T}", slice(k * R, (k + 1) * R)) for k, (kind, mag) in enumerate(cases)]
    check_precision(lambda a: K.logprobs(a, t, temperature=T, backend="triton"),
                    lambda a: eager_logprobs(a, t, T), [x], g, groups, "logprobs")
    if T != 1.0:  # entropy and KL once: each call walks every row twice
        ent_scales, kl_scales = natural_scales(x, y, g, T)
        check_precision(lambda a: K.entropy(a, temperature=T, backend="triton"),
                        lambda a: eager_entropy(a, T), [x], g, groups, "entropy", ent_scales)
        check_precision(lambda a, b: K.vocab_kl(a, b, temperature=T, backend="triton"),
                        lambda a, b: eager_kl(a, b, T), [x, y], g, groups, "vocab_kl", kl_scales)


# ----------------------------------------------------------------------------
# masked vocabularies

def masked_inputs(V=300):
    """Row 0 by hand: x keeps 4 equal logits, y those 4 and 4 more (p uniform on 4, q on 8):
    entropy log 4, log-prob of a kept token -log 4, KL log 2.  Row 1: top-8 of random logits
    (y keeps a superset); row 2: nothing masked."""
    x = make("scale", 3.0, 3, V, seed=5)
    y = make("scale", 3.0, 3, V, seed=6)
    x[0], y[0] = NEG_INF, NEG_INF
    x[0, [3, 50, 150, V - 1]] = 0.0
    y[0, [3, 50, 150, V - 1, 7, 60, 160, 250]] = 0.0
    top = x[1].topk(8).indices
    keep_y = torch.cat([top, x[1].topk(20).indices[8:]])
    x[1] = torch.full((V,), NEG_INF).index_copy(0, top, x[1, top])
    y[1] = torch.full((V,), NEG_INF).index_copy(0, keep_y, y[1, keep_y])
    return x, y


def softmax_of_kept(row, T):
    """float64 softmax of the finite entries only (0 elsewhere): the masked distribution."""
    keep = torch.isfinite(row)
    p = torch.zeros(row.shape, dtype=torch.float64)
    p[keep] = torch.softmax(row[keep].double() / T, -1)
    return p


@pytest.mark.parametrize("backend", ["torch", "eager", TRITON])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_masked_vocab(backend, T):
    x, y = masked_inputs()
    t = torch.tensor([50, int(x[1].argmax()), 11])
    g = torch.tensor([0.5, -1.0, 2.0])
    P = torch.stack([softmax_of_kept(r, T) for r in x])
    Q = torch.stack([softmax_of_kept(r, T) for r in y])
    plogp = torch.where(P > 0, P * P.clamp_min(1e-300).log(), 0.0)
    H = -plogp.sum(-1)
    KL = torch.where(P > 0, P * (P.clamp_min(1e-300).log() - Q.clamp_min(1e-300).log()), 0.0).sum(-1)
    assert abs(H[0] - math.log(4)) < 1e-12 and abs(KL[0] - math.log(2)) < 1e-12

    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    lp = K.logprobs(xg, t, temperature=T, backend=backend)
    ent = K.entropy(xg, temperature=T, backend=backend)
    kl = K.vocab_kl(xg, yg, temperature=T, backend=backend)
    torch.testing.assert_close(lp.double(), P[torch.arange(3), t].log(), atol=2e-6, rtol=1e-6)
    assert abs(lp[0].item() + math.log(4)) < 1e-6
    torch.testing.assert_close(ent.double(), H, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(kl.double(), KL, atol=2e-6, rtol=1e-6)

    # gradients, by hand: dlp = g (onehot - p) / T; dH = -g p (log p + H) / T;
    # dKL/dx = g p (log p - log q - KL) / T; dKL/dy = g (q - p) / T; all 0 where p (q) = 0
    onehot = torch.nn.functional.one_hot(t, x.shape[1]).double()
    gc = g.double().unsqueeze(1) / T
    want_lp = gc * (onehot - P)
    want_h = -gc * (plogp + P * H.unsqueeze(1))
    logratio = torch.where(P > 0, P.clamp_min(1e-300).log() - Q.clamp_min(1e-300).log(), 0.0)
    want_kx = gc * P * (logratio - KL.unsqueeze(1))
    want_ky = gc * (Q - P)
    (d_lp,) = torch.autograd.grad(lp, xg, g)
    (d_h,) = torch.autograd.grad(ent, xg, g)
    d_kx, d_ky = torch.autograd.grad(kl, [xg, yg], g)
    for got, want in ((d_lp, want_lp), (d_h, want_h), (d_kx, want_kx), (d_ky, want_ky)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    masked = ~torch.isfinite(x)
    assert (d_h[masked] == 0).all() and (d_kx[masked] == 0).all()
    assert (d_lp[masked] == 0).all()  # no target is masked here


@pytest.mark.parametrize("backend", ["torch", "eager", TRITON])
def test_masked_target_and_infinite_kl(backend):
    """A masked target has log-prob -inf (finite gradient, as eager); a policy giving mass to a
    token the reference masks has KL +inf, whose logits gradient is NaN (0 where its upstream
    gradient is 0) while the reference-logits gradient stays (q - p) g / T."""
    x, y = masked_inputs()
    y[1, int(x[1].argmax())] = NEG_INF  # q = 0 where p > 0
    t = torch.tensor([7, 0, 11])  # row 0: target 7 is masked in x
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    lp = K.logprobs(xg, t, backend=backend)
    assert lp[0] == NEG_INF and torch.isfinite(lp[2])
    (d_lp,) = torch.autograd.grad(lp[0], xg)
    P0 = softmax_of_kept(x[0], 1.0)
    torch.testing.assert_close(d_lp[0].double(), torch.nn.functional.one_hot(torch.tensor(7), x.shape[1]).double() - P0,
                               atol=1e-6, rtol=1e-5)

    kl = K.vocab_kl(xg, yg, backend=backend)
    assert kl[1] == float("inf") and torch.isfinite(kl[[0, 2]]).all()
    g = torch.tensor([0.0, 2.0, 0.0])
    d_kx, d_ky = torch.autograd.grad(kl, [xg, yg], g, retain_graph=True)
    assert not torch.isfinite(d_kx[1]).any()  # eager: NaN and -inf; the fused backends: NaN
    P1, Q1 = softmax_of_kept(x[1], 1.0), softmax_of_kept(y[1], 1.0)
    torch.testing.assert_close(d_ky[1].double(), 2.0 * (Q1 - P1), atol=1e-6, rtol=1e-5)
    if backend != "eager":  # the fused backends: a masked-out infinite row does not poison the batch
        d_kx, d_ky = torch.autograd.grad(torch.where(torch.tensor([True, False, True]), kl, 0.0).sum(), [xg, yg])
        assert (d_kx[1] == 0).all() and (d_ky[1] == 0).all() and torch.isfinite(d_kx).all()


@pytest.mark.parametrize("backend", ["torch", "eager", TRITON])
def test_row_of_only_minus_inf(backend):
    """No distribution: log-prob (unless ignored), entropy and KL are NaN, as torch.log_softmax
    gives; the fused backends give that row a 0 gradient where its upstream gradient is 0
    (e.g. masked with torch.where) and leave the other rows exact."""
    x, y = masked_inputs()
    x[1] = NEG_INF
    y[0] = x[0]  # so that KL(y || x) is finite on row 0
    t = torch.tensor([50, 3, 11])
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    lp = K.logprobs(xg, t, backend=backend)
    ent = K.entropy(xg, backend=backend)
    kl = K.vocab_kl(xg, yg, backend=backend)
    kl_ref_side = K.vocab_kl(yg, xg, backend=backend)  # the reference row is the empty one
    for out in (lp, ent, kl, kl_ref_side):
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    assert K.logprobs(x, torch.tensor([50, -100, 11]), backend=backend)[1] == 0  # ignored target
    if backend == "eager":
        return
    keep = torch.tensor([True, False, True])
    for out, wrt in ((lp, [xg]), (ent, [xg]), (kl, [xg, yg]), (kl_ref_side, [xg, yg])):
        for d in torch.autograd.grad(torch.where(keep, out, 0.0).sum(), wrt, retain_graph=True):
            assert (d[1] == 0).all() and torch.isfinite(d).all()
        for d in torch.autograd.grad(torch.where(keep, 0.0, out).sum(), wrt):
            assert torch.isnan(d[1]).all() and (d[[0, 2]] == 0).all()
    # an ignored target's row: 0 gradient, without torch.where
    xi = x.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(K.logprobs(xi, torch.tensor([50, -100, 11]), backend=backend).sum(), xi)
    assert (d[1] == 0).all() and torch.isfinite(d).all()
