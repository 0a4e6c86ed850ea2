"""PPO-clip and PPO-penalty: the losses against hand-computed values and gradients (zero outside
the trust region), early stopping on approximate KL, and the adaptive coefficients."""

import math

import pytest
import torch

from rlhfzoo.plugins.ppo import PPOClip, ppo_clip_loss
from rlhfzoo.plugins.ppo_penalty import PPOPenalty, adapt_penalty
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------ the clipped loss


def test_clipped_surrogate_hand_computed():
    ratio = t(1.5, 0.5, 0.5, 1.5, 1.1)
    adv = t(1.0, 1.0, -1.0, -1.0, 2.0)
    old = torch.zeros(5, dtype=torch.float64)
    # -min(r A, clip(r, 0.8, 1.2) A): 1.5,+ -> -1.2; 0.5,+ -> -0.5; 0.5,- -> 0.8; 1.5,- -> 1.5; 1.1,+2 -> -2.2
    per_token = [-1.2, -0.5, 0.8, 1.5, -2.2]
    for i in range(5):
        loss = ppo_clip_loss(ratio.log()[i : i + 1], old[:1], adv[i : i + 1], torch.ones(1), 0.2)
        assert loss.item() == pytest.approx(per_token[i], abs=1e-12)
    full = ppo_clip_loss(ratio.log().view(1, 5), old.view(1, 5), adv.view(1, 5), torch.ones(1, 5), 0.2)
    assert full.item() == pytest.approx(sum(per_token) / 5, abs=1e-12)
    masked = ppo_clip_loss(ratio.log().view(1, 5), old.view(1, 5), adv.view(1, 5), t(1, 1, 0, 0, 0).view(1, 5), 0.2)
    assert masked.item() == pytest.approx((-1.2 - 0.5) / 2, abs=1e-12)


def test_gradient_vanishes_outside_the_trust_region():
    eps = 0.2
    # (ratio, advantage, gradient expected to vanish?)
    cases = [(1.3, 1.0, True), (0.7, -1.0, True), (1.3, -1.0, False), (0.7, 1.0, False), (1.1, 1.0, False), (0.9, -1.0, False)]
    for r, a, vanishes in cases:
        lp = torch.tensor([math.log(r)], dtype=torch.float64, requires_grad=True)
        loss = ppo_clip_loss(lp, torch.zeros(1, dtype=torch.float64), t(a), torch.ones(1), eps)
        (grad,) = torch.autograd.grad(loss, lp)
        if vanishes:
            assert grad.item() == 0.0, (r, a)
        else:
            assert grad.item() == pytest.approx(-a * r, rel=1e-12), (r, a)  # d/dlogp of -r A = -r A


def test_at_ratio_one_the_loss_is_the_policy_gradient():
    torch.manual_seed(0)
    lp = torch.randn(3, 7, dtype=torch.float64)
    adv = torch.randn(3, 7, dtype=torch.float64)
    mask = (torch.rand(3, 7) > 0.3).double()
    x = lp.clone().requires_grad_(True)
    loss = ppo_clip_loss(x, lp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.allclose(grad, -adv * mask / mask.sum())  # masked tokens get no gradient


def test_configs_describe_every_field():
    for cls in (PPOClip, PPOPenalty):
        assert all(f.description for f in cls.Config.model_fields.values()), cls.name
    assert PPOClip.aliases == ("ppo",) and PPOClip.needs_value_head and PPOClip.online


# ------------------------------------------------------------------------------ the objectives


@pytest.fixture(scope="module")
def experience_parts():
    task = SentimentTask()
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**{**cfg, "max_new_tokens": 6, "value_head": True}), task=task)
    torch.manual_seed(0)
    rollout = policy.generate(task.examples("prompts")[:8])
    return policy, policy.frozen_copy(), rollout


def test_early_stop_on_approximate_kl(experience_parts):
    policy, reference, rollout = experience_parts
    scores = torch.linspace(-1, 1, 8)
    full = PPOClip(PPOClip.Config(epochs=3, minibatch_size=4))
    assert len(list(full.minibatches(full.make_experience(rollout, scores, policy, reference), policy))) == 6
    obj = PPOClip(PPOClip.Config(epochs=3, minibatch_size=4, target_kl=0.01))
    groups = obj.minibatches(obj.make_experience(rollout, scores, policy, reference), policy)
    first = next(groups)
    out = obj.loss(first[0], policy, reference)  # before any update: approx KL ~ 0, no stop
    assert out.metrics["approx_kl"] < 1e-8
    assert obj.after_step(out.metrics) == {} and not obj.kl_exceeded
    second = next(groups)
    obj.after_step({**out.metrics, "approx_kl": 0.012})  # above target_kl, not above 1.5 x: go on
    third = next(groups)
    obj.after_step({**out.metrics, "approx_kl": 0.02})  # the update after it moved the policy: 0.02 > 1.5 x 0.01
    with pytest.raises(StopIteration):
        next(groups)
    extra = obj.after_iteration({})
    assert extra["early_stopped"] == 1.0 and extra["ppo_epochs"] == 1.0  # stopped in the second epoch
    assert len(second) == len(third) == 1


def test_adaptive_kl_coefficient_direction(experience_parts):
    policy, reference, rollout = experience_parts
    obj = PPOClip(PPOClip.Config(kl_coef=0.2, kl_target=1.0, kl_horizon=100))
    obj.make_experience(rollout, torch.zeros(8), policy, reference)
    obj.last_metrics.update(kl=5.0, samples=8.0)  # KL above target: beta grows
    assert obj.after_iteration({})["kl_coef"] == 0.2  # logged: the coefficient this iteration used
    assert obj.kl_ctl.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 100))
    obj.last_metrics.update(kl=0.0)  # below target: beta shrinks
    before = obj.kl_ctl.value
    obj.after_iteration({})
    assert obj.kl_ctl.value == pytest.approx(before * (1 - 0.2 * 8 / 100))
    fixed = PPOClip(PPOClip.Config(kl_coef=0.2, adaptive_kl=False))
    fixed.last_metrics = {"kl": 50.0, "samples": 8.0, "truncated": 0.0}
    fixed.after_iteration({})
    assert fixed.kl_ctl.value == 0.2
    restored = PPOClip(obj.config)
    restored.load_state_dict(obj.state_dict())
    assert restored.kl_ctl.value == obj.kl_ctl.value and restored.iteration == obj.iteration


# ------------------------------------------------------------------------------ PPO-penalty


def test_penalty_rule_of_the_paper():
    assert adapt_penalty(1.0, 0.001, 0.01) == 0.5  # d < d_targ / 1.5: halve
    assert adapt_penalty(1.0, 0.02, 0.01) == 2.0  # d > 1.5 d_targ: double
    assert adapt_penalty(1.0, 0.01, 0.01) == 1.0
    assert adapt_penalty(1.0, 0.0067, 0.01) == 1.0 and adapt_penalty(1.0, 0.0149, 0.01) == 1.0


def test_penalty_loss_and_beta_adaptation(experience_parts):
    policy, reference, rollout = experience_parts
    obj = PPOPenalty(PPOPenalty.Config(penalty_init=4.0, penalty_target=0.01, epochs=1, minibatch_size=8, vf_coef=0.0))
    exp = obj.make_experience(rollout, torch.linspace(-1, 1, 8), policy, reference)
    groups = list(obj.minibatches(exp, policy))  # no update in between: the measured KL is 0
    batch = groups[0][0]
    out = obj.loss(batch, policy, reference)
    # At pi == pi_old: ratio 1 and penalty 0, so L = -mean(A) and the penalty adds no gradient.
    mask = batch.extra["mask"]
    assert out.loss.item() == pytest.approx(-(batch.extra["advantages"] * mask).sum().item() / mask.sum().item(), abs=1e-5)
    assert out.metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7) and out.metrics["penalty_beta"] == 4.0
    assert obj.measured_kl == pytest.approx(0.0, abs=1e-7)
    extra = obj.after_iteration({})
    assert extra["penalty_beta"] == 4.0 and obj.beta == 2.0  # KL below target: halved for the next iteration
    obj.measured_kl = 1.0
    obj.after_iteration({})
    assert obj.beta == 4.0  # above: doubled
    restored = PPOPenalty(obj.config)
    restored.load_state_dict(obj.state_dict())
    assert restored.beta == 4.0


def test_penalty_gradient_pulls_back_towards_the_old_policy(experience_parts):
    policy, reference, rollout = experience_parts
    obj = PPOPenalty(PPOPenalty.Config(penalty_init=1.0, vf_coef=0.0))
    exp = obj.make_experience(rollout, torch.zeros(8), policy, reference)
    batch = obj.groups(exp, torch.arange(8))[0]
    batch.extra["advantages"] = torch.zeros_like(batch.extra["advantages"])  # only the penalty acts
    batch.extra["old_logprobs"] = batch.extra["old_logprobs"] - 0.3 * batch.extra["mask"]  # pi moved up from pi_old
    out = obj.loss(batch, policy, reference)
    assert out.metrics["approx_kl"] > 0
    out.loss.backward()
    lp_grad_dir = [p.grad.clone() for p in policy.parameters()]
    policy.module.zero_grad(set_to_none=True)
    lp = policy.logprobs(batch.sequences.input_ids, batch.sequences.attention_mask)
    (lp * batch.extra["mask"]).sum().backward()
    # Descending the penalty lowers the sampled tokens' log-probs (back towards pi_old).
    dot = sum((a * p.grad).sum() for a, p in zip(lp_grad_dir, policy.parameters()) if p.grad is not None)
    assert dot > 0
    policy.module.zero_grad(set_to_none=True)
