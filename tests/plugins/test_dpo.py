"""DPO: the loss against hand-computed values, its gradients, the reference cache, bad input,
and a NaN stopping the trainer. Everything here runs on a tiny scratch policy (no SFT needed)."""

import json
import math
import random

import pytest
import torch

from rlhfzoo import hookimpl
from rlhfzoo.config import load_config
from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import PreferencePair, Task
from rlhfzoo.plugins.dpo import DPO, dpo_loss
from rlhfzoo.plugins.sentiment import SentimentTask, gold_scores, make_prompts, continue_review
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import NonFiniteError, Trainer

LOG2 = math.log(2.0)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------ the loss itself


def test_zero_margin_costs_log_2():
    loss = dpo_loss(t(0.3, -2.0), t(0.3, -2.0), beta=0.1)
    assert torch.allclose(loss, t(LOG2, LOG2))


def test_hand_computed_value():
    # h = (1 - (-1)) = 2, beta h = 0.2 -> -log sigma(0.2) = log(1 + e^-0.2)
    assert dpo_loss(t(1.0), t(-1.0), beta=0.1).item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-12)
    # cDPO: -(1-eps) log sigma(x) - eps log sigma(-x)
    x, eps = 0.2, 0.1
    expected = (1 - eps) * math.log1p(math.exp(-x)) + eps * math.log1p(math.exp(x))
    assert dpo_loss(t(1.0), t(-1.0), beta=0.1, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-12)


def test_large_margins_are_finite_with_the_right_asymptotes():
    h = t(1e5, -1e5, 1e30, -1e30)
    loss = dpo_loss(h, torch.zeros_like(h), beta=0.1)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-12) and loss[2].item() == 0.0  # -> 0 when beta h -> +inf
    assert loss[1].item() == pytest.approx(1e4, rel=1e-12)  # ~ -beta h when beta h -> -inf
    h.requires_grad_(True)
    (grad,) = torch.autograd.grad(dpo_loss(h, torch.zeros_like(h), beta=0.1).sum(), h)
    assert torch.isfinite(grad).all()
    assert grad.tolist() == pytest.approx([0.0, -0.1, 0.0, -0.1], abs=1e-12)  # saturates at 0 and -beta


def test_label_smoothing_one_half_is_symmetric_with_minimum_log_2_at_zero():
    # Not a constant: -(1/2)[log sigma(x) + log sigma(-x)] = (1/2) log(2 + e^x + e^-x), minimal (log 2) at x = 0.
    h = torch.linspace(-20, 20, 41, dtype=torch.float64)
    loss = dpo_loss(h, torch.zeros_like(h), beta=1.0, label_smoothing=0.5)
    assert torch.allclose(loss, loss.flip(0))
    assert loss[20].item() == pytest.approx(LOG2) and (loss >= LOG2 - 1e-12).all()
    assert torch.allclose(loss, 0.5 * torch.log(2 + h.exp() + (-h).exp()))
    h0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(dpo_loss(h0, torch.zeros(1, dtype=torch.float64), 1.0, 0.5).sum(), h0)
    assert grad.item() == 0.0  # random labels: no push either way


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_label_smoothing_minimiser_is_finite(eps):
    beta = 0.5
    h = torch.linspace(-30, 30, 60001, dtype=torch.float64)
    best = h[dpo_loss(h, torch.zeros_like(h), beta, eps).argmin()].item()
    assert beta * best == pytest.approx(math.log((1 - eps) / eps), abs=1e-2)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradcheck(eps):
    c = torch.randn(5, dtype=torch.float64, requires_grad=True) * 3
    r = torch.randn(5, dtype=torch.float64, requires_grad=True) * 3
    c, r = c.detach().requires_grad_(), r.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, 0.3, eps), (c, r))


def test_config_validates():
    with pytest.raises(Exception, match="label_smoothing"):
        DPO.Config(label_smoothing=0.7)
    with pytest.raises(Exception, match="reference"):
        DPO.Config(reference="lora")
    assert all(f.description for f in DPO.Config.model_fields.values())


# ------------------------------------------------------------------------------ the objective


def toy_pairs(n, seed=0, identical=0, empty=0):
    """Pairs of random sentiment-language reviews, chosen = higher gold (no SFT policy needed)."""
    rng = random.Random(seed)
    out = []
    for p in make_prompts(n, seed):
        a, b = continue_review(rng, p), continue_review(rng, p)
        ga, gb = gold_scores([p, p], [a, b])
        out.append(PreferencePair(p, a, b) if ga >= gb else PreferencePair(p, b, a))
    for i in range(identical):
        out[i] = PreferencePair(out[i].prompt, out[i].chosen, out[i].chosen)
    for i in range(identical, identical + empty):
        out[i] = PreferencePair(out[i].prompt, out[i].chosen, "")
    return out


@pytest.fixture(scope="module")
def tiny():
    task = SentimentTask()
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**cfg), task=task)
    return policy, Collator(policy.tokenizer, max_length=64)


def perturbed(policy):
    """The policy after a random nudge: its log-probs differ from the reference's."""
    other = HFPolicy(policy.config, task=policy.task, model=policy.frozen_copy().module, tokenizer=policy.tokenizer)
    other.module.requires_grad_(True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("average", [False, True])
def test_cached_and_model_reference_agree(tiny, average):
    policy, collate = tiny
    data = toy_pairs(20)
    reference = policy.frozen_copy()
    cached = DPO(DPO.Config(reference="cached", average_logprobs=average, reference_batch_size=7))
    model = DPO(DPO.Config(reference="model", average_logprobs=average))
    cached.prepare(data, collate, reference)
    model.prepare(data, collate, reference)
    assert not cached.reference_needed_in_training()  # the trainer may free the reference
    assert model.reference_needed_in_training()
    moved = perturbed(policy)
    rows = [3, 11, 0, 19]
    batch = collate([(i, data[i]) for i in rows])
    a, b = cached.loss(batch, moved, None), model.loss(batch, moved, reference)
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-5)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert isinstance(a.metrics[k], float) and a.metrics[k] == pytest.approx(b.metrics[k], abs=1e-5), k
    assert "loss" not in a.metrics  # the trainer adds it (it would be counted twice)
    # At the start the policy is the reference: h = 0 for every pair.
    start = cached.loss(batch, policy, None)
    assert start.loss.item() == pytest.approx(LOG2, abs=1e-5)
    assert start.metrics["kl"] == pytest.approx(0.0, abs=1e-5) and start.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_loss_gradient_reaches_the_policy_and_metrics_are_consistent(tiny):
    policy, collate = tiny
    data = toy_pairs(8)
    obj = DPO(DPO.Config(beta=0.5))
    reference = policy.frozen_copy()
    obj.prepare(data, collate, reference)
    moved = perturbed(policy)
    out = obj.loss(collate(list(enumerate(data))), moved, None)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moved.parameters())
    m = out.metrics
    assert m["reward_margin"] == pytest.approx(m["reward_chosen"] - m["reward_rejected"], abs=1e-5)
    assert 0.0 <= m["accuracy"] <= 1.0 and m["skipped_pairs"] == 0.0


def test_identical_pairs_are_counted_and_masked(tiny, caplog):
    policy, collate = tiny
    data = toy_pairs(10, identical=3)
    obj = DPO()
    with caplog.at_level("WARNING", logger="rlhfzoo.plugins._preference"):
        obj.prepare(data, collate, policy.frozen_copy())
    assert "3 of 10 preference pairs have identical" in caplog.text
    moved = perturbed(policy)
    full = obj.loss(collate(list(enumerate(data))), moved, None)
    kept = obj.loss(collate([(i, data[i]) for i in range(3, 10)]), moved, None)
    assert full.metrics["skipped_pairs"] == 3.0
    assert full.loss.item() == pytest.approx(kept.loss.item(), abs=1e-6)  # the mean is over real pairs only
    only_identical = obj.loss(collate([(i, data[i]) for i in range(3)]), moved, None)
    assert only_identical.loss.item() == 0.0 and only_identical.loss.requires_grad


def test_empty_completion_is_the_eos_only_response(tiny):
    policy, collate = tiny
    data = toy_pairs(4, empty=2)
    batch = collate(list(enumerate(data)))
    # The collator ends every response with EOS: an empty completion is one token, "stop at once".
    n_tokens = batch.rejected.response_mask[:, 1:].sum(-1)
    assert n_tokens[:2].tolist() == [1, 1] and (n_tokens[2:] > 1).all()
    for average in (False, True):
        obj = DPO(DPO.Config(average_logprobs=average))
        obj.prepare(data, collate, policy.frozen_copy())
        out = obj.loss(batch, perturbed(policy), None)
        assert math.isfinite(out.loss.item()) and out.metrics["skipped_pairs"] == 0.0


def test_cache_is_keyed_by_dataset_row(tiny):
    policy, collate = tiny
    data = toy_pairs(12)
    obj = DPO(DPO.Config(reference_batch_size=5))
    reference = policy.frozen_copy()
    obj.prepare(data, collate, reference)
    for rows in ([0], [7, 2], [11, 5, 1]):
        batch = collate([(i, data[i]) for i in rows])
        expected = reference.sequence_logprobs(batch.sequences)
        assert torch.allclose(obj.cache.lookup("chosen", batch.index), expected, atol=1e-5)
    with pytest.raises(KeyError, match="holds 12 rows"):
        obj.cache.lookup("chosen", torch.tensor([12]))


# ------------------------------------------------------------------------------ through the trainer


class ToyPairsTask(Task):
    """Sentiment-language pairs from random reviews (no SFT stage): fast trainer tests."""

    name = "toy-pairs"

    def examples(self, kind, split="train"):
        return toy_pairs(32 if split == "train" else 8, seed=0 if split == "train" else 1)

    def tokenizer(self):
        return SentimentTask().tokenizer()

    def default_model_config(self):
        return SentimentTask().default_model_config()


class ToyPlugin:
    @hookimpl
    def register_tasks(self, register):
        register(ToyPairsTask)


def toy_run(out, **algorithm):
    registry.register_plugin(ToyPlugin(), name="tests_toy_pairs_plugin", package="tests")
    return load_config(data={
        "task": {"name": "toy-pairs"},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": "dpo", **algorithm},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False, "save_every": 1},
        "output_dir": str(out),
    })


def test_trainer_frees_the_reference_after_caching(tmp_path):
    trainer = Trainer(toy_run(tmp_path / "cached"), log=lambda *_: None)
    assert trainer.reference is None
    summary = trainer.fit()
    assert summary["finished"]
    rows = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(LOG2, abs=1e-4)  # policy == reference at step 1
    assert {"kl", "accuracy", "reward_chosen", "reward_rejected", "reward_margin"} <= rows[-1].keys()
    assert Trainer(toy_run(tmp_path / "model", reference="model"), log=lambda *_: None).reference is not None


def test_nan_reference_logprob_stops_the_trainer_and_saves_nothing(tmp_path):
    out = tmp_path / "nan"
    trainer = Trainer(toy_run(out), log=lambda *_: None)
    rows = trainer._rows_of_step(1)  # poison one example of the second step
    trainer.objective.cache.values["rejected"][rows[2]] = float("nan")
    with pytest.raises(NonFiniteError, match=r"at step 2, micro-batch 0 \(dataset rows \[") as err:
        trainer.fit()
    assert str(rows[2]) in str(err.value)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000001"]  # the good step's checkpoint, nothing from the NaN step
    assert not (out / "summary.json").exists()
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / "step-000001" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
