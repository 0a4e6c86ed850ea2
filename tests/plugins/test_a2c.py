"""A2C: one step per batch, the policy-gradient loss and its gradient, the value loss, the KL
penalty in the loss by default."""

import pytest
import torch

from rlhfzoo.ops import masked_mean
from rlhfzoo.plugins.a2c import A2C
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def parts():
    task = SentimentTask()
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**{**cfg, "max_new_tokens": 6, "value_head": True}), task=task)
    torch.manual_seed(0)
    rollout = policy.generate(task.examples("prompts")[:8])
    return policy, policy.frozen_copy(), rollout


def test_defaults_follow_gophercite():
    c = A2C.Config()
    assert c.kl_penalty == "loss" and c.kl_estimator == "k2" and c.value_clip is None
    assert all(f.description for f in A2C.Config.model_fields.values())
    assert A2C.online and A2C.needs_value_head and A2C.needs_reference


def test_one_optimizer_step_per_batch(parts):
    policy, reference, rollout = parts
    obj = A2C(A2C.Config(micro_batch_size=3))
    groups = list(obj.minibatches(obj.make_experience(rollout, torch.zeros(8), policy, reference), policy))
    assert len(groups) == 1 and [len(b) for b in groups[0]] == [3, 3, 2]


def test_loss_is_the_policy_gradient_plus_value_loss(parts):
    policy, reference, rollout = parts
    obj = A2C(A2C.Config(kl_coef=0.0, vf_coef=0.0, ent_coef=0.0))
    exp = obj.make_experience(rollout, torch.linspace(-1, 1, 8), policy, reference)
    batch = obj.groups(exp, torch.arange(8))[0]
    out = obj.loss(batch, policy, reference)
    out.loss.backward()
    grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    policy.module.zero_grad(set_to_none=True)
    mask, adv = batch.extra["mask"], batch.extra["advantages"]
    lp = policy.logprobs(batch.sequences.input_ids, batch.sequences.attention_mask)
    manual = -(adv * lp * mask).sum() / mask.sum()
    assert out.loss.item() == pytest.approx(manual.item(), abs=1e-6)
    manual.backward()
    for g, p in zip(grads, [p for p in policy.parameters() if p.grad is not None]):
        assert torch.allclose(g, p.grad, atol=1e-6)
    policy.module.zero_grad(set_to_none=True)
    assert out.metrics["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # on-policy

    with_value = A2C(A2C.Config(kl_coef=0.0, vf_coef=1.0, ent_coef=0.0)).loss(batch, policy, reference)
    values = policy.forward(batch.sequences.input_ids, batch.sequences.attention_mask, return_values=True)["values"][:, :-1]
    vf = 0.5 * masked_mean((values - batch.extra["returns"]) ** 2, mask)
    assert with_value.metrics["value_loss"] == pytest.approx(vf.item(), abs=1e-6)
    assert with_value.loss.item() == pytest.approx(out.loss.item() + vf.item(), abs=1e-5)


def test_entropy_bonus_lowers_the_loss(parts):
    policy, reference, rollout = parts
    exp = A2C().make_experience(rollout, torch.zeros(8), policy, reference)
    plain = A2C(A2C.Config(ent_coef=0.0))
    bonus = A2C(A2C.Config(ent_coef=0.1))
    batch = plain.groups(exp, torch.arange(8))[0]
    a, b = plain.loss(batch, policy, reference), bonus.loss(batch, policy, reference)
    assert a.metrics["policy_entropy"] > 0
    assert b.loss.item() == pytest.approx(a.loss.item() - 0.1 * a.metrics["policy_entropy"], abs=1e-5)
