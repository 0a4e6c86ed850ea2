"""Precision of rlhfzoo.kernels' gradients at any logit magnitude.
  The fused backward recomputes ``p = softmax(logits / T)`` row by row.  Recomputing it
as ``exp(z - lse)`` from an fp32 ``lse`` turns the rounding of ``lse`` (``|lse| * 6e-8``) into a
relative error of every ``p``: at logits ~1e4 that puts the fp32 gradient off by 1e-3 of its
largest entry (2e-4 at T = 1, 3e-6 at logits ~30), where eager fp32 ``log_softmax(logits / T)`` is
off by ~1e-7.  So each fp32 gradient is measured against a float64 reference, as the largest error over
the rows relative to the largest gradient entry, and must stay within 4x eager fp32's error
+ 2e-7, for logits of magnitude 1, 30 (about the largest whose unshifted ``sum exp(z)`` fits fp32),
1e2 and 1e4, both peaked (``mag * randn``) and flat but far from 0 (``mag + 3 randn``).
(Masked vocabularies: test_masked_vocab.py.)
"""
from __future__ import annotations

import pytest
import torch

import rlhfzoo.kernels as K

from kernel_references import HAS_TRITON

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))
KINDS_MAGS = [(kind, mag) for kind in ("scale", "offset") for mag in (1.0, 30.0, 1e2, 1e4)]
pytestmark = pytest.mark.usefixtures("one_thread")


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
