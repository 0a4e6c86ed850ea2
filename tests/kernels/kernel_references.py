"""Shared by the kernel tests: the backends to run on, and float64 PyTorch references independent
of the library's own `rlhfzoo.kernels._reference` module, plus input makers and tolerances."""
from __future__ import annotations

import pytest
import torch

from rlhfzoo.kernels import _dispatch

HAS_TRITON = _dispatch.triton_available()
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
V = 300  # not a multiple of any block size used


# ----------------------------------------------------------------------------
# float64 references (independent of the library's own _reference module)

def ref_logprobs(x, t, T=1.0, ignore_index=-100):
    lp = torch.log_softmax(x.double() / T, dim=-1)
    ign = t == ignore_index
    out = lp.gather(-1, t.masked_fill(ign, 0).unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(ign, 0.0)


def ref_entropy(x, T=1.0):
    lp = torch.log_softmax(x.double() / T, dim=-1)
    return -(lp.exp() * lp).sum(-1)


def ref_kl(x, y, T=1.0):
    lp = torch.log_softmax(x.double() / T, dim=-1)
    lq = torch.log_softmax(y.double() / T, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def make_logits(shape, dtype, scale=3.0, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # a [B, T+1, V] buffer sliced like logits[:, :-1]
        full = torch.randn(shape[0], shape[1] + 1, *shape[2:], generator=g, dtype=torch.float64) * scale
        x = full.to(dtype)[:, :-1]
        assert not x.is_contiguous()
        return x
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_targets(shape, vocab, seed=1, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, shape, generator=g)
    drop = torch.rand(shape, generator=g) < ignore_frac
    return t.masked_fill(drop, -100)


def tol(dtype):
    # forward: fp32 accumulation in both cases; backward: one rounding to the
    # logits' dtype (the Triton interpreter truncates to bf16 -> up to 1 ulp)
    if dtype == torch.bfloat16:
        return dict(atol=1e-5, rtol=1e-5), dict(atol=1e-6, rtol=2e-2)
    return dict(atol=2e-5, rtol=1e-5), dict(atol=2e-5, rtol=1e-4)


def randn(*shape, seed=2):
    """Seeded float64 normal tensor (upstream gradients etc.), independent of test order."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_grad_close(got, want, dtype):
    """Gradient check: one rounding to ``dtype`` plus fp32 cancellation error.

    Terms like ``p (log p - log q - KL)`` cancel in fp32, so the absolute
    error scales with the largest gradient entry (1e-5 of it).
    """
    _, bwd_tol = tol(dtype)
    atol = max(bwd_tol["atol"], 1e-5 * want.abs().max().item())
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=bwd_tol["rtol"])


def grad_of(out, x, g):
    (gx,) = torch.autograd.grad(out, x, g.to(out.dtype))
    return gx
