"""Correctness of `rlhfzoo.kernels.linear_logprobs` (the fused LM head: hidden states and the
head's weight in, log-probs and entropies out, without the [N, V] logits at once) against float64
references, forward and backward, on the chunked torch path and the interpreted Triton kernels."""
from __future__ import annotations

import pytest
import torch

import rlhfzoo.kernels as K
from kernel_references import BACKENDS, V, make_targets, randn, ref_entropy, ref_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_linear_logprobs_matches_reference(backend, with_bias, return_entropy):
    g = torch.Generator().manual_seed(6)
    H = 16
    hidden = torch.randn(2, 5, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    bias = torch.randn(V, generator=g).requires_grad_(True) if with_bias else None
    t = make_targets((2, 5), V)
    T = 0.9
    out = K.linear_logprobs(hidden, weight, t, bias, temperature=T, return_entropy=return_entropy,
                            chunk_size=3, backend=backend)  # 3 does not divide 10 tokens
    params = [hidden, weight] + ([bias] if with_bias else [])
    dparams = [p.detach().double().requires_grad_(True) for p in params]
    logits = torch.nn.functional.linear(dparams[0], dparams[1], dparams[2] if with_bias else None)
    ref_lp = ref_logprobs(logits, t, T)
    gl = randn(2, 5, seed=3)
    ge = randn(2, 5, seed=4)
    if return_entropy:
        lp, ent = out
        ref_ent = ref_entropy(logits, T)
        torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=1e-5)
        loss, ref_loss = (lp * gl).sum() + (ent * ge).sum(), (ref_lp * gl).sum() + (ref_ent * ge).sum()
    else:
        lp = out
        loss, ref_loss = (lp * gl).sum(), (ref_lp * gl).sum()
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-5, rtol=1e-5)
    assert (lp <= 0).all()
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(ref_loss, dparams)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_linear_logprobs_bf16_and_frozen_weight():
    g = torch.Generator().manual_seed(7)
    H = 32
    hidden = torch.randn(3, 7, H, generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.3).bfloat16()  # frozen head
    t = make_targets((3, 7), V)
    lp = K.linear_logprobs(hidden, weight, t, chunk_size=4)
    assert lp.dtype == torch.float32
    # reference on the same bf16-rounded logits, accumulated in float64
    logits = torch.nn.functional.linear(hidden.detach(), weight)
    torch.testing.assert_close(lp.double(), ref_logprobs(logits, t), atol=1e-4, rtol=1e-4)
    lp.sum().backward()
    hr = hidden.detach().double().requires_grad_(True)
    ref_lp = ref_logprobs(torch.nn.functional.linear(hr, weight.double()), t)
    (want,) = torch.autograd.grad(ref_lp.sum(), hr)
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.double(), want, atol=2e-2, rtol=3e-2)
    # bf16 weight gradient: bf16 GEMM per chunk, fp32 accumulation across chunks
    w = weight.clone().requires_grad_(True)
    K.linear_logprobs(hidden.detach(), w, t, chunk_size=4).sum().backward()
    wr = weight.double().requires_grad_(True)
    ref_lp = ref_logprobs(torch.nn.functional.linear(hidden.detach().double(), wr), t)
    (want_w,) = torch.autograd.grad(ref_lp.sum(), wr)
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad.double(), want_w, atol=2e-2, rtol=3e-2)


def test_linear_logprobs_entropy_only_grad():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = make_targets((6,), 50)
    _, ent = K.linear_logprobs(hidden, weight, t, return_entropy=True, chunk_size=4)
    ent.sum().backward()  # only the entropy output carries a gradient
    hr = hidden.detach().requires_grad_(True)
    ref = ref_entropy(torch.nn.functional.linear(hr, weight.detach()))
    (want,) = torch.autograd.grad(ref.sum(), hr)
    torch.testing.assert_close(hidden.grad, want)


@pytest.mark.parametrize("chunk_size", [4, 64])  # 3 chunks (last one partial), one chunk
def test_linear_logprobs_kept_chunk_and_retain_graph(chunk_size):
    """The forward keeps the last chunk's logits for the backward; the backward uses them once,
    and a second backward through a retained graph recomputes them to the same gradient."""
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = make_targets((10,), 50)
    gl = torch.randn(10, generator=g, dtype=torch.float64)
    lp = K.linear_logprobs(hidden, weight, t, chunk_size=chunk_size)
    start, kept = lp.grad_fn.kept
    assert start == (8 if chunk_size == 4 else 0)
    torch.testing.assert_close(kept, torch.nn.functional.linear(hidden, weight)[start:])
    first = torch.autograd.grad(lp, (hidden, weight), gl, retain_graph=True)
    assert lp.grad_fn.kept is None and lp.grad_fn.buf is None  # released after use
    second = torch.autograd.grad(lp, (hidden, weight), gl)
    hr, wr = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    want = torch.autograd.grad(ref_logprobs(torch.nn.functional.linear(hr, wr), t), (hr, wr), gl)
    for a, b, c in zip(first, second, want):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)
    with torch.no_grad():  # no graph: nothing is kept past the call
        assert K.linear_logprobs(hidden, weight, t, chunk_size=chunk_size).grad_fn is None

