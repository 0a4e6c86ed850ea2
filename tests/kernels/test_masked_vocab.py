"""Masked vocabularies in rlhfzoo.kernels: ``-inf`` logits (top-k masking) have probability 0 and
must neither turn entropy / KL / gradients into NaN nor change the values of the remaining
distribution, on every backend (checked against float64 softmaxes of the kept entries).
"""
from __future__ import annotations

import math

import pytest
import torch

import rlhfzoo.kernels as K

from kernel_references import HAS_TRITON

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))
NEG_INF = float("-inf")
# the Triton interpreter runs the kernels in numpy, which warns about log(0) and 0/0 of masked rows
pytestmark = [pytest.mark.filterwarnings("ignore:(divide by zero|invalid value) encountered:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]


def make(kind, mag, rows, V, seed):
    """fp32 logits: peaked ``mag * randn`` or flat ``mag + 3 randn``."""
    r = torch.randn(rows, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (r * mag if kind == "scale" else mag + 3.0 * r).float()




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
    token the reference masks has KL +inf, while the reference-logits gradient stays (q - p) g / T."""
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
    P1, Q1 = softmax_of_kept(x[1], 1.0), softmax_of_kept(y[1], 1.0)
    torch.testing.assert_close(d_ky[1].double(), 2.0 * (Q1 - P1), atol=1e-6, rtol=1e-5)


# Triton is left out: its clamps (max(x, 0)) turn such a row's NaN into 0 (an empty row, not a masked one)
@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_row_of_only_minus_inf(backend):
    """No distribution: log-prob (unless ignored), entropy and KL are NaN, as torch.log_softmax
    gives, and the other rows stay finite."""
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
