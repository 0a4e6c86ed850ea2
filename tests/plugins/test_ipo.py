"""IPO: the loss against hand-computed values, gradients, and the summed/averaged option."""

import random

import pytest
import torch

import rlhfzoo.plugins.ipo as ipo_module
from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import PreferencePair
from rlhfzoo.plugins.ipo import IPO, ipo_loss
from rlhfzoo.plugins.sentiment import SentimentTask, continue_review, make_prompts
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0])
def test_zero_at_the_target_gap(tau):
    target = 1 / (2 * tau)
    assert ipo_loss(t(target + 0.7), t(0.7), tau).item() == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_values():
    # tau = 0.25: target gap 2. h = 0 -> 4; h = 5 -> 9; h = -1 -> 9.
    assert ipo_loss(t(0.0, 5.0, -1.0), t(0.0, 0.0, 0.0), 0.25).tolist() == pytest.approx([4.0, 9.0, 9.0])
    # Unlike DPO, over-shooting the target is penalised: the loss is a parabola in h.
    h = torch.linspace(-10, 14, 25, dtype=torch.float64)
    assert torch.allclose(ipo_loss(h, torch.zeros_like(h), 0.25), (h - 2) ** 2)


def test_large_gaps_are_finite():
    loss = ipo_loss(t(1e6, -1e6), t(0.0, 0.0), 0.1)
    assert torch.isfinite(loss).all() and loss[1] > loss[0] > 0


def test_gradcheck():
    c = (torch.randn(6, dtype=torch.float64) * 3).requires_grad_()
    r = (torch.randn(6, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ipo_loss(a, b, 0.2), (c, r))


def test_defaults_document_the_length_averaged_choice():
    cfg = IPO.Config()
    assert cfg.average_logprobs is True and cfg.reference == "cached"
    assert "length-averaged" in ipo_module.__doc__ and "Eq. (17)" in ipo_module.__doc__
    assert all(f.description for f in IPO.Config.model_fields.values())


@pytest.fixture(scope="module")
def tiny():
    task = SentimentTask()
    policy = HFPolicy(HFPolicyConfig(**{k: v for k, v in TINY_POLICY.items() if k != "name"}), task=task)
    rng = random.Random(0)
    data = [PreferencePair(p, continue_review(rng, p), continue_review(rng, p)) for p in make_prompts(12, 0)]
    return policy, Collator(policy.tokenizer, max_length=64), data


def nudged(policy):
    other = HFPolicy(policy.config, task=policy.task, model=policy.frozen_copy().module, tokenizer=policy.tokenizer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    other.module.requires_grad_(True)
    return other


@pytest.mark.parametrize("average", [True, False])
def test_objective_uses_the_chosen_log_prob_form(tiny, average):
    policy, collate, data = tiny
    reference = policy.frozen_copy()
    obj = IPO(IPO.Config(tau=0.5, average_logprobs=average))
    obj.prepare(data, collate, reference)
    assert not obj.reference_needed_in_training()
    moved = nudged(policy)
    batch = collate(list(enumerate(data)))
    out = obj.loss(batch, moved, None)
    # The same thing by hand.
    lr = lambda seq: moved.sequence_logprobs(seq, average) - reference.sequence_logprobs(seq, average)  # noqa: E731
    h = lr(batch.sequences) - lr(batch.rejected)
    assert out.loss.item() == pytest.approx(((h - 1.0) ** 2).mean().item(), abs=1e-4)
    assert out.metrics["reward_margin"] == pytest.approx(0.5 * h.mean().item(), abs=1e-4)  # tau * h
    model = IPO(IPO.Config(tau=0.5, average_logprobs=average, reference="model"))
    model.prepare(data, collate, reference)
    assert model.reference_needed_in_training()
    assert model.loss(batch, moved, reference).loss.item() == pytest.approx(out.loss.item(), abs=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moved.parameters())


def test_at_the_start_every_pair_costs_the_squared_target(tiny):
    policy, collate, data = tiny
    obj = IPO(IPO.Config(tau=0.25))
    obj.prepare(data, collate, policy.frozen_copy())
    assert obj.loss(collate(list(enumerate(data))), policy, None).loss.item() == pytest.approx(4.0, abs=1e-4)
