"""GRPO: group-relative advantages and the clipped loss against hand-computed values (every loss
type, asymmetric clipping on both sides, sequences of unequal lengths), gradcheck, and the
experience of `rlhfzoo.plugins.group_relative` (consecutive groups, dynamic sampling, truncated
completions, the reference freed at beta 0, exact gradient accumulation, idle iterations)."""

import dataclasses
import math

import pytest
import torch

from rlhfzoo.config import load_config
from rlhfzoo.plugins.arithmetic import ArithmeticTask
from rlhfzoo.plugins.grpo import GRPO, aggregate, group_advantages, grpo_loss
from rlhfzoo.plugins.rloo import RLOO
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = {"n_demonstrations": 16, "n_test_demonstrations": 4, "n_prompts": 16, "n_test_prompts": 4}


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------ advantages


def test_group_advantages_hand_computed():
    r = t(1, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3)
    std1 = math.sqrt(4 * 0.25 / 3)  # unbiased std of {1, 0, 0, 1}
    std3 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)  # of {0, 0, 0, 3}
    expected = [0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4), 0, 0, 0, 0]
    expected += [-0.75 / (std3 + 1e-4)] * 3 + [2.25 / (std3 + 1e-4)]
    assert group_advantages(r, 4).tolist() == pytest.approx(expected, abs=1e-12)
    assert group_advantages(r, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25])
    assert group_advantages(t(3, 1), 2).tolist() == pytest.approx([1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4)])
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(r, 5)


# ------------------------------------------------------------------------------ the loss

# Three sequences of 3, 1 and 2 response tokens (the rest masked, with values that must not count).
RATIOS = [[1.5, 0.5, 1.1], [0.7, 9.0, 9.0], [1.5, 1.2, 9.0]]
ADV = t(1.0, -1.0, -1.0)
MASK = t(1, 1, 1, 1, 0, 0, 1, 1, 0).view(3, 3)
# -min(r A, clip(r, 1 - 0.2, 1 + 0.3) A):
#   A = +1: r 1.5 -> clipped above at 1.3 -> -1.3;  r 0.5 -> -0.5 (unclipped);  r 1.1 -> -1.1
#   A = -1: r 0.7 -> clipped below at 0.8 -> 0.8;   r 1.5 -> 1.5 (unclipped);   r 1.2 -> 1.2 (inside)
TOKENS = [[-1.3, -0.5, -1.1], [0.8], [1.5, 1.2]]


def loss_of(logratio, loss_type, **kw):
    return grpo_loss(logratio, torch.zeros(3, 3, dtype=torch.float64), ADV, MASK, 0.2, 0.3, loss_type, **kw)


def test_grpo_loss_hand_computed_for_every_loss_type():
    lr = t(*[x for row in RATIOS for x in row]).log().view(3, 3)
    grpo = sum(sum(s) / len(s) for s in TOKENS) / 3  # each sequence's token mean, then over sequences
    bnpo = sum(sum(s) for s in TOKENS) / 6  # over all 6 tokens
    dr = sum(sum(s) for s in TOKENS) / (3 * 3)  # over B x T
    assert loss_of(lr, "grpo").item() == pytest.approx(grpo, abs=1e-12)
    assert loss_of(lr, "bnpo").item() == pytest.approx(bnpo, abs=1e-12)
    assert loss_of(lr, "dr-grpo").item() == pytest.approx(dr, abs=1e-12)
    assert loss_of(lr, "dr-grpo", max_len=10).item() == pytest.approx(0.6 / 30, abs=1e-12)  # L given: the budget
    with pytest.raises(ValueError, match="loss_type"):
        loss_of(lr, "sum")


def test_gradient_is_zero_where_the_asymmetric_clip_is_active():
    lr = t(*[x for row in RATIOS for x in row]).log().view(3, 3).requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(lr, "bnpo"), lr)
    # d/dlogr of -r A is -A r; clipped tokens (1.5 with A > 0, 0.7 with A < 0) and masked ones get 0.
    expected = [0.0, -0.5, -1.1, 0.0, 0.0, 0.0, 1.5, 1.2, 0.0]
    assert (g * 6).flatten().tolist() == pytest.approx(expected, abs=1e-12)


def test_kl_term_is_k3_to_the_reference():
    torch.manual_seed(0)
    lp, ref = -torch.rand(3, 3, dtype=torch.float64), -torch.rand(3, 3, dtype=torch.float64)
    plain = grpo_loss(lp, lp, ADV, MASK)
    with_kl = grpo_loss(lp, lp, ADV, MASK, ref_logprobs=ref, beta=0.5)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1  # pi_ref/pi - log(pi_ref/pi) - 1 (DeepSeekMath Eq. 4)
    per_seq = (k3 * MASK).sum(-1) / MASK.sum(-1)
    assert (with_kl - plain).item() == pytest.approx(0.5 * per_seq.mean().item(), abs=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr-grpo"])
def test_gradcheck(loss_type):
    torch.manual_seed(1)
    old = -torch.rand(3, 4, dtype=torch.float64)
    # Ratios spread over [0.6, 1.5]: some clipped on each side, none on a kink.
    lp = (old + torch.tensor([[-0.45, -0.1, 0.1, 0.4], [0.3, -0.35, 0.05, -0.05], [0.15, 0.38, -0.3, 0.02]], dtype=torch.float64))
    ref = -torch.rand(3, 4, dtype=torch.float64)
    mask = t(1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1).view(3, 4)
    adv = t(0.7, -1.3, 0.4)

    def f(x):
        return grpo_loss(x, old, adv, mask, 0.2, 0.28, loss_type, ref_logprobs=ref, beta=0.1)

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),))


def test_aggregate_with_step_counts_sums_to_the_whole():
    """Micro-batch losses with the step's counts as divisors add up to the whole batch's loss."""
    torch.manual_seed(2)
    x, mask = torch.randn(6, 5, dtype=torch.float64), (torch.rand(6, 5) > 0.3).double()
    for lt in ("grpo", "bnpo", "dr-grpo"):
        whole = aggregate(x, mask, lt)
        parts = sum(aggregate(x[r], mask[r], lt, sequences=6, tokens=mask.sum(), max_len=5) for r in (slice(0, 2), slice(2, 6)))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-12)


def test_configs_describe_every_field():
    for cls in (GRPO, RLOO):
        assert all(f.description for f in cls.Config.model_fields.values()), cls.name
        assert cls.online and not cls.needs_value_head and cls.needs_reference
    assert not GRPO().reference_needed_in_training() and GRPO(GRPO.Config(beta=0.04)).reference_needed_in_training()
    assert GRPO(GRPO.Config(group_size=6)).samples_per_prompt() == 6


# ------------------------------------------------------------------------------ experience


@pytest.fixture(scope="module")
def parts():
    task = ArithmeticTask(ArithmeticTask.Config(**SMALL))
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**cfg), task=task)
    prompts = task.examples("prompts")[:3]
    torch.manual_seed(0)
    rollout = policy.generate([p for p in prompts for _ in range(4)])  # G = 4, consecutive
    return policy, rollout


def test_rollout_must_hold_consecutive_groups(parts):
    policy, rollout = parts
    obj = GRPO(GRPO.Config(group_size=4))
    shuffled = [rollout.prompts[i] for i in (0, 4, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11)]
    bad = dataclasses.replace(rollout, prompts=shuffled)
    with pytest.raises(ValueError, match="4 consecutive samples of each prompt"):
        obj.make_experience(bad, torch.zeros(12), policy, None)
    with pytest.raises(ValueError, match="consecutive"):
        GRPO(GRPO.Config(group_size=5)).make_experience(rollout, torch.zeros(12), policy, None)


def test_dynamic_sampling_drops_groups_of_equal_rewards(parts):
    policy, rollout = parts
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0.5, 0, 0])  # the second group has no spread
    kept = GRPO(GRPO.Config(group_size=4, dynamic_sampling=True))
    exp = kept.make_experience(rollout, rewards, policy, None)
    assert len(exp) == 8 and torch.equal(exp.sequences, rollout.sequences[[0, 1, 2, 3, 8, 9, 10, 11]])
    assert exp.advantages.tolist() == pytest.approx(group_advantages(rewards, 4)[[0, 1, 2, 3, 8, 9, 10, 11]].tolist())
    out = kept.after_iteration({})
    assert out["dropped_groups"] == 1.0 and out["zero_std_fraction"] == pytest.approx(1 / 3) and out["kept_samples"] == 8.0
    steps = list(kept.minibatches(exp, policy))
    assert len(steps) == 1 and steps[0][0].extra["step_sequences"] == 8.0
    everything = GRPO(GRPO.Config(group_size=4))
    assert len(everything.make_experience(rollout, rewards, policy, None)) == 12
    assert everything.after_iteration({})["dropped_groups"] == 0.0


def test_an_iteration_whose_groups_are_all_dropped_takes_no_step(tmp_path):
    """A policy from scratch never answers right: every gold reward is 0, every group dropped."""
    data = {
        "task": {"name": "arithmetic", **SMALL},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": "grpo", "group_size": 4, "dynamic_sampling": True},
        "reward": {"name": "gold"},
        "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path),
    }
    trainer = Trainer(load_config(data=data), log=lambda *_: None)
    assert trainer.reference is None  # beta 0: freed
    before = {k: v.clone() for k, v in trainer.policy.module.state_dict().items()}
    metrics = trainer.train_step(0)
    assert metrics["skipped_update"] == 1.0 and metrics["optimizer_steps"] == 0.0 and metrics["dropped_groups"] == 4.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.module.state_dict().items())


@pytest.mark.parametrize("objective", [GRPO(GRPO.Config(group_size=4, dynamic_sampling=True, minibatch_size=4)),
                                       RLOO(RLOO.Config(group_size=4, dynamic_sampling=True, kl_coef=0.0, clip_eps=0.2, minibatch_size=4))])
def test_a_process_that_ran_out_joins_the_step_with_an_idle_batch(parts, objective, monkeypatch):
    """Another process kept 12 samples, this one 8: it takes the third step with a batch of weight 0."""
    import rlhfzoo.plugins.group_relative as group_relative

    policy, rollout = parts
    exp = objective.make_experience(rollout, torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0.5, 0, 0]), policy, None)
    assert len(exp) == 8
    monkeypatch.setattr(group_relative, "all_rows", lambda x: torch.cat([x, x.new_tensor([12])]))
    steps = list(objective.minibatches(exp, policy))
    assert len(steps) == 3 and steps[2] == [exp.idle] and not steps[1][0].extra.get("idle")
    out = objective.loss(exp.idle, policy)
    policy.model.zero_grad(set_to_none=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in policy.parameters())
    policy.model.zero_grad(set_to_none=True)


def test_truncated_completions_get_no_loss(parts):
    policy, rollout = parts
    finished = torch.ones(12, dtype=torch.bool)
    finished[[1, 5]] = False
    cut = dataclasses.replace(rollout, finished=finished)
    obj = GRPO(GRPO.Config(group_size=4, mask_truncated_completions=True))
    exp = obj.make_experience(cut, torch.arange(12.0), policy, None)
    assert exp.mask[[1, 5]].sum() == 0 and torch.equal(exp.mask[0], rollout.response_mask[0, 1:].float())
    assert obj.after_iteration({})["truncated_rate"] == pytest.approx(2 / 12)


@pytest.mark.parametrize("objective, reads", [
    (GRPO(GRPO.Config(group_size=4)), False), (GRPO(GRPO.Config(group_size=4, mu=2)), True),
    (GRPO(GRPO.Config(group_size=4, minibatch_size=4)), True), (RLOO(RLOO.Config(group_size=4, kl_coef=0.0)), False),
    (RLOO(RLOO.Config(group_size=4, kl_coef=0.0, clip_eps=0.2)), True),
])
def test_sampling_logprobs_are_computed_only_where_the_update_reads_them(parts, objective, reads):
    """With one optimizer step per iteration (and no KL in RLOO's reward) the sampling log-probs are
    the loss's own, detached: the rollout's lazy log-probs are never computed (a forward pass
    saved), and the loss and its gradient are those computed with them."""
    policy, rollout = parts
    calls = []
    lazy = dataclasses.replace(rollout, logprobs=lambda: calls.append(1) or rollout.logprobs)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0.5, 0, 0])
    exp = objective.make_experience(lazy, rewards, policy, None)
    assert bool(calls) == reads and (exp.old_logprobs is not None) == reads
    if reads:
        return
    batch = next(iter(objective.minibatches(exp, policy)))[0]
    grads = []
    for extra in ({}, {"old_logprobs": rollout.logprobs[batch.index]}):
        batch.extra.update(extra)
        policy.model.zero_grad(set_to_none=True)
        out = objective.loss(batch, policy)
        out.loss.backward()
        grads.append((out.loss.item(), [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
    policy.model.zero_grad(set_to_none=True)
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and len(grad_a) == len(grad_b) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grad_a, grad_b))


def test_steps_per_iteration(parts):
    policy, rollout = parts
    obj = GRPO(GRPO.Config(group_size=4, mu=2, minibatch_size=5, micro_batch_size=2))
    steps = list(obj.minibatches(obj.make_experience(rollout, torch.arange(12.0), policy, None), policy))
    assert len(steps) == 2 * 3  # mu passes of ceil(12 / 5) steps
    assert [len(s) for s in steps[:3]] == [3, 3, 1]  # micro-batches of 2: 5 = 2 + 2 + 1, then 2
    assert [s[0].extra["step_sequences"] for s in steps[:3]] == [5.0, 5.0, 2.0]
    assert obj.after_iteration({})["optimizer_steps"] == 6.0


# ------------------------------------------------------------------------------ exact gradient accumulation


def grad_trainer(tmp_path, name, **options) -> Trainer:
    data = {
        "task": {"name": "arithmetic", **SMALL},
        "policy": {**TINY_POLICY, "max_new_tokens": 8},
        "algorithm": {"name": name, **options},
        "reward": {"name": "gold"},
        "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path),
    }
    trainer = Trainer(load_config(data=data), log=lambda *_: None)
    trainer.policy.module.double()
    if trainer.reference is not None:
        trainer.reference.module.double()
    return trainer


def step_gradients(trainer: Trainer, splits=(None, 5, 3)) -> list[torch.Tensor]:
    """The gradient of the iteration's first optimizer step, cut into micro-batches of each size (unequal ones: 5 + 5 + 5 + 1)."""
    obj = trainer.objective
    prompts = [trainer.data[i] for i in range(4) for _ in range(obj.samples_per_prompt())]
    torch.manual_seed(0)
    rollout = trainer.policy.generate(prompts)
    rewards = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))
    exp = obj.make_experience(rollout, rewards, trainer.policy, trainer.reference)
    lengths = exp.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "responses of unequal lengths make the test mean something"
    with torch.no_grad():  # off the rollout's policy: ratios != 1, some clipped
        g = torch.Generator().manual_seed(1)
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    grads = []
    for m in splits:
        obj.config.micro_batch_size = m
        torch.manual_seed(3)  # the same shuffle
        step = next(iter(obj.minibatches(exp, trainer.policy)))
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.backward(step)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy.parameters() if p.grad is not None]))
    return grads


@pytest.mark.parametrize(
    "name,options",
    [
        ("grpo", {"loss_type": "grpo", "beta": 0.1, "mask_truncated_completions": True}),
        ("grpo", {"loss_type": "bnpo", "epsilon_high": 0.28}),
        ("grpo", {"loss_type": "dr-grpo", "scale_rewards": False, "mu": 2, "minibatch_size": 12}),
        ("rloo", {}),
        ("rloo", {"clip_eps": 0.2, "epochs": 2, "minibatch_size": 12}),
    ],
)
def test_gradient_does_not_depend_on_the_micro_batches(tmp_path, name, options):
    trainer = grad_trainer(tmp_path, name, group_size=4, **options)
    whole, *split = step_gradients(trainer)
    assert whole.norm() > 0
    for g in split:
        assert ((g - whole).norm() / whole.norm()).item() < 1e-9


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_gradcheck(scale):
    """The advantages as a function of the rewards (groups with distinct rewards: the std is smooth there)."""
    rewards = t(0.3, -1.2, 0.8, 2.0, 0.1, -0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r: group_advantages(r, 3, scale=scale), (rewards,))
