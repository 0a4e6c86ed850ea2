"""SimPO: the loss against hand-computed values, its asymptotes and gradients, the config, and the
objective on a tiny scratch policy (one forward pass over both sides, length-normalised
log-probs, identical pairs masked). No training here: the learning test is in
test_reference_free_learning.py."""

import math
import random

import pytest
import torch

from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import PreferencePair
from rlhfzoo.plugins.sentiment import SentimentTask, continue_review, gold_scores, make_prompts
from rlhfzoo.plugins.simpo import SimPO, simpo_loss
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY

pytestmark = pytest.mark.usefixtures("one_thread")

LOG2 = math.log(2.0)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x):  # -log sigma(-x) = log(1 + e^x), by hand
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------ the loss itself


def test_hand_computed_values():
    # beta 2, gamma 1: chosen -1.0, rejected -2.0 per token -> logit 2 * 1 - 1 = 1 -> log(1 + e^-1)
    assert simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=1.0).item() == pytest.approx(softplus(-1.0), rel=1e-12)
    # the same pair the other way round: logit 2 * (-1) - 1 = -3 -> log(1 + e^3)
    assert simpo_loss(t(-2.0), t(-1.0), beta=2.0, gamma=1.0).item() == pytest.approx(softplus(3.0), rel=1e-12)
    # beta 2.5, gamma 0.5: gap 0.3 -> logit 0.75 - 0.5 = 0.25
    assert simpo_loss(t(-0.4), t(-0.7), beta=2.5, gamma=0.5).item() == pytest.approx(softplus(-0.25), rel=1e-12)
    # label smoothing eps: (1 - eps) log(1 + e^-z) + eps log(1 + e^z), z = 1
    eps = 0.1
    expected = (1 - eps) * softplus(-1.0) + eps * softplus(1.0)
    assert simpo_loss(t(-1.0), t(-2.0), 2.0, 1.0, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
def test_zero_gap_costs_the_margin(gamma):
    # Equal per-token log-probs: logit -gamma, loss log(1 + e^gamma) (log 2 without a margin), whatever beta.
    for beta in (0.5, 2.0, 10.0):
        loss = simpo_loss(t(-0.3, -2.0), t(-0.3, -2.0), beta, gamma)
        assert loss.tolist() == pytest.approx([softplus(gamma)] * 2, rel=1e-12)
    if gamma == 0.0:
        assert simpo_loss(t(-1.0), t(-1.0), 2.0, 0.0).item() == pytest.approx(LOG2, rel=1e-12)


def test_margin_shifts_the_logit_not_the_gap():
    # gamma is in the logit: simpo(beta, gamma) at gap h equals gamma 0 at gap h - gamma / beta
    # (the authors' gamma_beta_ratio = gamma / beta is the margin in average log-prob).
    h = torch.linspace(-3, 3, 13, dtype=torch.float64)
    beta, gamma = 2.5, 1.25
    assert torch.allclose(simpo_loss(h, torch.zeros_like(h), beta, gamma), simpo_loss(h - gamma / beta, torch.zeros_like(h), beta, 0.0))
    # only the gap matters, not the level
    assert torch.allclose(simpo_loss(h - 5.0, torch.full_like(h, -5.0), beta, gamma), simpo_loss(h, torch.zeros_like(h), beta, gamma))


def test_large_gaps_are_finite_with_the_right_asymptotes():
    h = t(1e5, -1e5, 1e30, -1e30)
    loss = simpo_loss(h, torch.zeros_like(h), beta=2.0, gamma=1.0)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-12) and loss[2].item() == 0.0  # -> 0 as the gap -> +inf
    assert loss[1].item() == pytest.approx(2e5 + 1.0, rel=1e-12)  # ~ -(beta h - gamma) as the gap -> -inf
    h.requires_grad_(True)
    r = torch.zeros_like(h, requires_grad=True)
    gc, gr = torch.autograd.grad(simpo_loss(h, r, beta=2.0, gamma=1.0).sum(), (h, r))
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()
    assert gc.tolist() == pytest.approx([0.0, -2.0, 0.0, -2.0], abs=1e-12)  # saturates at 0 and -beta
    assert torch.equal(gr, -gc)


def test_gradient_by_hand():
    # d/d chosen of -log sigma(z), z = beta (c - r) - gamma: -beta sigma(-z)
    c, r = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    (gc,) = torch.autograd.grad(simpo_loss(c, r, 2.0, 1.0).sum(), c)
    assert gc.item() == pytest.approx(-2.0 / (1.0 + math.exp(1.0)), rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradcheck(eps):
    g = torch.Generator().manual_seed(0)
    c = (-3 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    r = (-3 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, 2.0, 1.0, eps), (c, r))


def test_config_validates_and_is_described():
    for bad in ({"beta": 0.0}, {"gamma": -0.1}, {"label_smoothing": 0.7}, {"gamma_beta_ratio": 0.5}):
        with pytest.raises(Exception):
            SimPO.Config(**bad)
    assert all(f.description for f in SimPO.Config.model_fields.values())
    assert SimPO.Config().beta == 2.0 and SimPO.Config().gamma == 1.0


def test_registered_reference_free_pairs_objective():
    entry = registry.get("objective", "simpo")
    assert entry.cls is SimPO
    assert SimPO.data_kind == "pairs" and SimPO.needs_reference is False and not SimPO.online
    assert SimPO.bench.kl_knob == "beta" and set(SimPO.bench.options) <= set(SimPO.Config.model_fields)


# ------------------------------------------------------------------------------ the objective


def toy_pairs(n, seed=0, identical=0):
    """Pairs of random sentiment-language reviews, chosen = higher gold (no SFT policy needed)."""
    rng = random.Random(seed)
    out = []
    for p in make_prompts(n, seed):
        a, b = continue_review(rng, p), continue_review(rng, p)
        ga, gb = gold_scores([p, p], [a, b])
        out.append(PreferencePair(p, a, b) if ga >= gb else PreferencePair(p, b, a))
    for i in range(identical):
        out[i] = PreferencePair(out[i].prompt, out[i].chosen, out[i].chosen)
    return out


@pytest.fixture(scope="module")
def tiny():
    task = SentimentTask()
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**cfg), task=task)
    return policy, Collator(policy.tokenizer, max_length=64)


def average_logprobs(policy, seq):
    """Per-token mean of the response log-probs, by hand from `logprobs` (one side at a time)."""
    lp = policy.logprobs(seq.input_ids, seq.attention_mask).double()
    mask = seq.response_mask[:, 1:].double()
    return (lp * mask).sum(-1) / mask.sum(-1)


def test_loss_is_simpo_of_the_length_normalised_logprobs(tiny):
    policy, collate = tiny
    data = toy_pairs(9)
    batch = collate(list(enumerate(data)))
    assert (batch.sequences.response_mask.sum(-1) != batch.rejected.response_mask.sum(-1)).any()  # lengths differ
    obj = SimPO(SimPO.Config(beta=2.5, gamma=0.7))
    obj.prepare(data, collate, None)
    out = obj.loss(batch, policy, None)
    with torch.no_grad():
        c, r = average_logprobs(policy, batch.sequences), average_logprobs(policy, batch.rejected)
    expected = simpo_loss(c, r, 2.5, 0.7).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    m = out.metrics
    assert all(isinstance(v, float) for v in m.values()) and "loss" not in m
    assert m["reward_chosen"] == pytest.approx(2.5 * c.mean().item(), abs=1e-5)
    assert m["reward_rejected"] == pytest.approx(2.5 * r.mean().item(), abs=1e-5)
    assert m["reward_margin"] == pytest.approx(m["reward_chosen"] - m["reward_rejected"], abs=1e-5)
    assert m["accuracy"] == pytest.approx((c > r).double().mean().item())
    assert m["skipped_pairs"] == 0.0
    out.loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)
    policy.module.zero_grad(set_to_none=True)


def test_identical_pairs_are_counted_and_masked(tiny, caplog):
    policy, collate = tiny
    data = toy_pairs(10, identical=3)
    obj = SimPO()
    with caplog.at_level("WARNING", logger="rlhfzoo.plugins._preference"):
        obj.prepare(data, collate, None)
    assert "3 of 10 preference pairs have identical" in caplog.text
    with torch.no_grad():
        full = obj.loss(collate(list(enumerate(data))), policy, None)
        kept = obj.loss(collate([(i, data[i]) for i in range(3, 10)]), policy, None)
    assert full.metrics["skipped_pairs"] == 3.0 and kept.metrics["skipped_pairs"] == 0.0
    assert full.loss.item() == pytest.approx(kept.loss.item(), abs=1e-6)  # the mean is over real pairs only
    assert full.metrics["accuracy"] == pytest.approx(kept.metrics["accuracy"])
    only_identical = obj.loss(collate([(i, data[i]) for i in range(3)]), policy, None)
    assert only_identical.loss.item() == 0.0 and only_identical.loss.requires_grad
