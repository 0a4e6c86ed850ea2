"""RLOO: leave-one-out advantages against hand-computed values, the KL to the reference inside the
reward, the REINFORCE and clipped losses and their gradients, and the on-policy check of the config.
(Exact gradient accumulation is tested with GRPO's in test_grpo.py.)"""

import pytest
import torch

from rlhfzoo.plugins.arithmetic import ArithmeticTask
from rlhfzoo.plugins.rloo import RLOO, rloo_advantages, rloo_loss
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_leave_one_out_hand_computed():
    r = t(1, 2, 3, 6, 5, 5, 5, 5)
    # 1 - (2 + 3 + 6)/3, 2 - (1 + 3 + 6)/3, ...; a group of equal rewards: 0
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0, 0, 0, 0]
    assert rloo_advantages(r, 4).tolist() == pytest.approx(expected, abs=1e-12)
    # = k/(k-1) (r_i - mean)
    assert rloo_advantages(r, 4)[:4].tolist() == pytest.approx([4 / 3 * (x - 3) for x in (1, 2, 3, 6)], abs=1e-12)
    assert rloo_advantages(t(3, 1), 2).tolist() == [2.0, -2.0]
    with pytest.raises(ValueError):
        rloo_advantages(r, 3)
    with pytest.raises(ValueError):
        rloo_advantages(r, 1)


def test_reinforce_loss_and_gradient():
    seq_lp = t(-2.0, -1.0, -3.0).requires_grad_(True)
    adv = t(1.0, -0.5, 2.0)
    loss = rloo_loss(seq_lp, seq_lp.detach(), adv)
    assert loss.item() == pytest.approx(-(1 * -2 + -0.5 * -1 + 2 * -3) / 3)
    (g,) = torch.autograd.grad(loss, seq_lp)
    assert g.tolist() == pytest.approx([-1 / 3, 0.5 / 3, -2 / 3])  # -A / B
    assert rloo_loss(seq_lp, seq_lp.detach(), adv, sequences=6).item() == pytest.approx(loss.item() / 2)


def test_clipped_sequence_ratio():
    old = t(0.0, 0.0, 0.0, 0.0)
    lp = t(1.5, 0.5, 0.7, 1.1).log().requires_grad_(True)
    adv = t(1.0, 1.0, -1.0, -1.0)
    # -min(r A, clip(r, 0.8, 1.2) A): 1.5,+ -> -1.2 (clipped); 0.5,+ -> -0.5; 0.7,- -> 0.8 (clipped); 1.1,- -> 1.1
    loss = rloo_loss(lp, old, adv, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.1) / 4, abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.tolist() == pytest.approx([0.0, -0.5 / 4, 0.0, 1.1 / 4], abs=1e-12)


def test_plain_reinforce_is_one_on_policy_step():
    with pytest.raises(ValueError, match="clip_eps"):
        RLOO.Config(epochs=2)
    with pytest.raises(ValueError, match="clip_eps"):
        RLOO.Config(minibatch_size=8)
    assert RLOO.Config(clip_eps=0.2, epochs=2, minibatch_size=8).epochs == 2
    assert RLOO().reference_needed_in_training() and not RLOO(RLOO.Config(kl_coef=0.0)).reference_needed_in_training()
    assert RLOO().samples_per_prompt() == 4


def test_kl_to_the_reference_is_in_the_reward():
    task = ArithmeticTask(ArithmeticTask.Config(n_prompts=4, n_test_prompts=2, n_demonstrations=4, n_test_demonstrations=2))
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**cfg), task=task)
    reference = HFPolicy(HFPolicyConfig(**{**cfg, "seed": 1}), task=task)  # another model: KL != 0
    torch.manual_seed(0)
    rollout = policy.generate([p for p in task.examples("prompts")[:2] for _ in range(3)])
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.9])
    obj = RLOO(RLOO.Config(group_size=3, kl_coef=0.3))
    exp = obj.make_experience(rollout, scores, policy, reference)
    mask = rollout.response_mask[:, 1:].float()
    seq_kl = ((rollout.logprobs - reference.logprobs(rollout.sequences, rollout.attention_mask)) * mask).sum(-1)
    assert seq_kl.abs().min() > 1e-3
    expected = rloo_advantages(scores - 0.3 * seq_kl, 3)
    assert exp.advantages.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    out = obj.after_iteration({})
    assert out["kl"] == pytest.approx(seq_kl.mean().item(), abs=1e-5)
    assert out["non_score_reward"] == pytest.approx(-0.3 * seq_kl.mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="reference"):
        obj.make_experience(rollout, scores, policy, None)


def test_rloo_advantages_gradcheck_and_jacobian():
    """Linear in the rewards: d A_i / d r_i = 1, d A_i / d r_j = -1/(k-1) within a group, 0 across groups."""
    rewards = t(0.3, -1.2, 0.8, 2.0, 0.1, -0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r: rloo_advantages(r, 3), (rewards,))
    jac = torch.autograd.functional.jacobian(lambda r: rloo_advantages(r, 3), rewards.detach())
    block = torch.full((3, 3), -0.5, dtype=torch.float64).fill_diagonal_(1.0)
    assert torch.equal(jac, torch.block_diag(block, block))
