"""ORPO: log(1 - exp(x)) and the odds-ratio loss against hand-computed values, their asymptotes
and gradients, the config, and the objective on a tiny scratch policy (SFT term + lam * odds-ratio
term from one forward pass, the SFT term's step-wide token mean, identical pairs masked out of the
odds-ratio term only). No training here: the learning test is in test_reference_free_learning.py."""

import math
import random

import pytest
import torch

from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import PreferencePair
from rlhfzoo.ops import set_step_tokens
from rlhfzoo.plugins.orpo import ORPO, log1mexp, log_odds, orpo_loss
from rlhfzoo.plugins.sentiment import SentimentTask, continue_review, gold_scores, make_prompts
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY

pytestmark = pytest.mark.usefixtures("one_thread")

LOG2 = math.log(2.0)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------ log(1 - e^x)


def test_log1mexp_hand_computed():
    xs = [-LOG2, -1.0, -0.1, -3.0, -1e-10, -50.0]
    expected = [
        -LOG2,  # 1 - 1/2
        math.log(1 - math.exp(-1.0)),
        math.log(-math.expm1(-0.1)),
        math.log(1 - math.exp(-3.0)),
        math.log(1e-10) + math.log1p(-0.5e-10),  # 1 - e^-d = d (1 - d/2 + ...), d = 1e-10
        -math.exp(-50.0),  # log(1 - e) ~ -e for tiny e
    ]
    got = log1mexp(t(*xs)).tolist()
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-12)


def test_log1mexp_is_accurate_where_the_naive_formula_is_not():
    x = t(-1e-12, -1e-20)
    assert torch.isinf(torch.log1p(-torch.exp(x[1:]))).all()  # the naive form: log(0)
    assert log1mexp(x).tolist() == pytest.approx([math.log(1e-12), math.log(1e-20)], rel=1e-9)
    x32 = torch.tensor([-1e-6, -1e-30], dtype=torch.float32)
    assert log1mexp(x32).tolist() == pytest.approx([math.log(1e-6), math.log(1e-30)], rel=1e-5)


def test_log1mexp_limits_are_finite_with_finite_gradients():
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor([0.0, -1e-300 if dtype == torch.float64 else -1e-40, -LOG2, -1e5, -1e30], dtype=dtype, requires_grad=True)
        y = log1mexp(x)
        assert torch.isfinite(y).all(), (dtype, y)
        assert y[3].item() == 0.0 and y[4].item() == 0.0  # log(1 - 0)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(g).all(), (dtype, g)
        assert g[2].item() == pytest.approx(-1.0, rel=1e-6)  # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 at x = -ln 2


def test_log1mexp_gradcheck_on_both_branches():
    x = t(-2.0, -0.8, -0.7, -0.6, -0.05, -1e-3).requires_grad_()
    assert torch.autograd.gradcheck(log1mexp, (x,))


# ------------------------------------------------------------------------------ the loss itself


def test_hand_computed_values():
    # P_w = 1/2 -> odds 1, log odds 0; P_l = 1/5 -> odds 1/4. -log sigma(log 4) = -log(4/5) = log(5/4).
    assert orpo_loss(t(math.log(0.5)), t(math.log(0.2))).item() == pytest.approx(math.log(1.25), rel=1e-12)
    # P_w = 0.8 (odds 4), P_l = 0.5 (odds 1): the same log 4, the same loss.
    assert orpo_loss(t(math.log(0.8)), t(math.log(0.5))).item() == pytest.approx(math.log(1.25), rel=1e-12)
    # P_w = 0.1 (odds 1/9), P_l = 0.25 (odds 1/3): odds ratio 1/3 -> -log sigma(-log 3) = log(1 + 3) = log 4.
    assert orpo_loss(t(math.log(0.1)), t(math.log(0.25))).item() == pytest.approx(math.log(4.0), rel=1e-12)
    # log odds by hand
    assert log_odds(t(math.log(0.75))).item() == pytest.approx(math.log(3.0), rel=1e-12)


def test_equal_likelihoods_cost_log_2_and_swapping_sides_changes_the_loss_by_the_log_odds_ratio():
    x = t(-0.01, -0.5, -3.0, -20.0)
    assert orpo_loss(x, x).tolist() == pytest.approx([LOG2] * 4, rel=1e-12)
    c, r = t(-0.3, -1.2, -4.0), t(-0.9, -0.2, -4.5)
    # -log sigma(z) - (-log sigma(-z)) = -z
    assert torch.allclose(orpo_loss(c, r) - orpo_loss(r, c), -(log_odds(c) - log_odds(r)))


def test_large_inputs_are_finite_with_the_right_asymptotes():
    # Chosen with probability ~0 per token, rejected ~1 (and the reverse), float64 and float32.
    for dtype in (torch.float64, torch.float32):
        c = torch.tensor([-1e5, 0.0, -1e-30, -1e5], dtype=dtype, requires_grad=True)
        r = torch.tensor([0.0, -1e5, -1e5, -1e5], dtype=dtype, requires_grad=True)
        loss = orpo_loss(c, r)
        assert torch.isfinite(loss).all(), (dtype, loss)
        assert loss[0].item() > 1e5 - 1  # ~ -(log odds_w - log odds_l), log odds_w ~ -1e5
        assert loss[1].item() == 0.0 and loss[2].item() == 0.0  # the chosen is certain: nothing left to gain
        assert loss[3].item() == pytest.approx(LOG2, rel=1e-6)
        gc, gr = torch.autograd.grad(loss.sum(), (c, r))
        assert torch.isfinite(gc).all() and torch.isfinite(gr).all(), (dtype, gc, gr)
        assert gc[0].item() == pytest.approx(-1.0, rel=1e-6)  # d log odds / dx -> 1 as P -> 0, sigma -> 1


@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_gradcheck(spread):
    g = torch.Generator().manual_seed(0)
    c = (-spread * torch.rand(6, generator=g, dtype=torch.float64) - 1e-3).requires_grad_()
    r = (-spread * torch.rand(6, generator=g, dtype=torch.float64) - 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(orpo_loss, (c, r))


def test_config_validates_and_is_described():
    for bad in ({"lam": -0.1}, {"beta": 0.1}):
        with pytest.raises(Exception):
            ORPO.Config(**bad)
    assert all(f.description for f in ORPO.Config.model_fields.values())
    assert ORPO.Config().lam == 0.1  # the paper's lambda


def test_registered_reference_free_pairs_objective():
    assert registry.get("objective", "orpo").cls is ORPO
    assert ORPO.data_kind == "pairs" and ORPO.needs_reference is False and not ORPO.online
    assert ORPO.bench.kl_knob == "lam" and set(ORPO.bench.options) <= set(ORPO.Config.model_fields)


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


def side(policy, seq):
    """(sum of the response log-probs, number of response tokens) per example, by hand, one side at a time."""
    lp = policy.logprobs(seq.input_ids, seq.attention_mask).double()
    mask = seq.response_mask[:, 1:].double()
    return (lp * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("lam", [0.0, 0.1, 2.0])
def test_loss_is_token_mean_nll_plus_lam_times_the_odds_ratio_term(tiny, lam):
    policy, collate = tiny
    data = toy_pairs(9)
    batch = collate(list(enumerate(data)))
    obj = ORPO(ORPO.Config(lam=lam))
    obj.prepare(data, collate, None)
    out = obj.loss(batch, policy, None)
    with torch.no_grad():
        (sc, nc), (sr, nr) = side(policy, batch.sequences), side(policy, batch.rejected)
    nll = -sc.sum() / nc.sum()  # token mean over the chosen responses of the batch
    odds_term = orpo_loss(sc / nc, sr / nr).mean()
    assert out.loss.item() == pytest.approx((nll + lam * odds_term).item(), abs=1e-5)
    m = out.metrics
    assert all(isinstance(v, float) for v in m.values()) and "loss" not in m
    assert m["nll"] == pytest.approx(nll.item(), abs=1e-5) and m["or_loss"] == pytest.approx(odds_term.item(), abs=1e-5)
    assert m["log_odds_ratio"] == pytest.approx((log_odds(sc / nc) - log_odds(sr / nr)).mean().item(), abs=1e-4)
    assert m["accuracy"] == pytest.approx((sc / nc > sr / nr).double().mean().item())
    assert m["logp_chosen"] == pytest.approx((sc / nc).mean().item(), abs=1e-5) and m["skipped_pairs"] == 0.0
    out.loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)
    policy.module.zero_grad(set_to_none=True)


def test_sft_term_is_the_token_mean_of_the_whole_step(tiny):
    # Two micro-batches of different token counts: with the step's totals set (as the trainer does),
    # the mean of their NLL terms is the token mean over the step, as if it were one batch.
    policy, collate = tiny
    data = toy_pairs(8)
    obj = ORPO(ORPO.Config(lam=0.0))
    whole = collate(list(enumerate(data)))
    a, b = collate([(i, data[i]) for i in range(3)]), collate([(i, data[i]) for i in range(3, 8)])
    set_step_tokens([a, b])
    with torch.no_grad():
        la, lb, lw = obj.loss(a, policy, None), obj.loss(b, policy, None), obj.loss(whole, policy, None)
    assert (a.sequences.response_mask[:, 1:].sum() / 3) != (b.sequences.response_mask[:, 1:].sum() / 5)
    assert ((la.loss + lb.loss) / 2).item() == pytest.approx(lw.loss.item(), abs=1e-6)


def test_identical_pairs_leave_the_odds_term_but_keep_the_sft_term(tiny, caplog):
    policy, collate = tiny
    data = toy_pairs(10, identical=3)
    obj = ORPO(ORPO.Config(lam=1.0))
    with caplog.at_level("WARNING", logger="rlhfzoo.plugins._preference"):
        obj.prepare(data, collate, None)
    assert "orpo: 3 of 10 preference pairs have identical" in caplog.text
    with torch.no_grad():
        full = obj.loss(collate(list(enumerate(data))), policy, None)
        kept = obj.loss(collate([(i, data[i]) for i in range(3, 10)]), policy, None)
        (sc, nc) = side(policy, collate(list(enumerate(data))).sequences)
    assert full.metrics["skipped_pairs"] == 3.0
    assert full.metrics["or_loss"] == pytest.approx(kept.metrics["or_loss"], abs=1e-6)  # over real pairs only
    assert full.metrics["nll"] == pytest.approx((-sc.sum() / nc.sum()).item(), abs=1e-5)  # every chosen response
    assert full.loss.item() == pytest.approx(full.metrics["nll"] + full.metrics["or_loss"], abs=1e-5)
    only_identical = obj.loss(collate([(i, data[i]) for i in range(3)]), policy, None)
    assert only_identical.metrics["or_loss"] == 0.0
    assert only_identical.loss.item() == pytest.approx(only_identical.metrics["nll"], abs=1e-6) and only_identical.loss.requires_grad
