"""End-of-run evaluation of the preference objectives: the implicit reward log pi/pi_ref on the
task's held-out pairs (`implicit_reward_accuracy`, `implicit_reward_margin`), on tiny scratch
policies over a small slice of the shared HH sample."""

from pathlib import Path

import pytest
import torch

from rlhfzoo import registry
from rlhfzoo.config import load_config
from rlhfzoo.data.collate import sequence_batch
from rlhfzoo.plugins._preference import implicit_reward_figures
from rlhfzoo.plugins.hh_rlhf import DEFAULT_PATH
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
SHARED = (REPO / DEFAULT_PATH).resolve()
TASK = {"path": str(SHARED), "max_pairs": 48, "test_fraction": 0.25, "max_chars": 300, "vocab_size": 300}
IMPLICIT = {"implicit_reward_accuracy", "implicit_reward_margin", "implicit_reward_pairs"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def task():
    return registry.create("task", "hh-rlhf", TASK)


@pytest.fixture(scope="module")
def policy(task):
    return registry.create("policy", "hf", {k: v for k, v in TINY_POLICY.items() if k != "name"}, task=task)


def perturbed(policy, seed=1, scale=0.05):
    other = policy.frozen_copy()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def by_hand(policy, reference, pairs, average):
    """h of every pair, each side scored alone (no batching, no padding)."""
    tok, out = policy.tokenizer, []
    for e in pairs:
        ratios = []
        for response in (e.chosen, e.rejected):
            seq = sequence_batch(tok, [(e.prompt, response)], max_length=policy.config.max_length)
            with torch.no_grad():
                ratios.append(policy.sequence_logprobs(seq, average).item() - reference.sequence_logprobs(seq, average).item())
        out.append(ratios[0] - ratios[1])
    return torch.tensor(out, dtype=torch.float64)


def test_reference_equal_to_policy_ties_every_pair(task, policy):
    pairs = task.examples("pairs", split="test")
    figures = implicit_reward_figures(policy, policy.frozen_copy(), pairs)
    assert figures == {"implicit_reward_accuracy": 0.5, "implicit_reward_margin": 0.0, "implicit_reward_pairs": float(len(pairs))}


@pytest.mark.parametrize("average", [False, True])
def test_matches_log_probs_computed_pair_by_pair(task, policy, average):
    pairs = task.examples("pairs", split="test")
    trained = perturbed(policy)
    h = by_hand(trained, policy, pairs, average)
    assert h.abs().min() > 1e-3  # no pair near a tie: batching noise cannot flip a sign
    figures = implicit_reward_figures(trained, policy, pairs, average=average, max_length=policy.config.max_length, batch_size=5)
    assert figures["implicit_reward_accuracy"] == pytest.approx((h > 0).double().mean().item())
    assert 0.0 < figures["implicit_reward_accuracy"] < 1.0
    assert figures["implicit_reward_margin"] == pytest.approx(h.mean().item(), abs=1e-4, rel=1e-4)
    swapped = implicit_reward_figures(policy, trained, pairs, average=average)  # roles swapped: h -> -h
    assert swapped["implicit_reward_accuracy"] == pytest.approx(1 - figures["implicit_reward_accuracy"])


def test_objective_evaluate_adds_the_figures_to_the_sampling_evaluation(task, policy):
    dpo = registry.create("objective", "dpo")
    trained = perturbed(policy)
    figures = dpo.evaluate(trained, task, reward=None, reference=policy, n_prompts=4, seed=0)
    assert figures["n"] == 4 and "kl" in figures and IMPLICIT <= set(figures)
    assert figures["implicit_reward_pairs"] == len(task.examples("pairs", split="test"))
    assert not IMPLICIT & set(dpo.evaluate(trained, task, reward=None, reference=None, n_prompts=4, seed=0))


def test_skipped_on_a_task_without_pairs(task, policy):
    class NoPairs(type(task)):
        def examples(self, kind, split="train"):
            if kind == "pairs":
                raise ValueError("no pairs here")
            return super().examples(kind, split)

    figures = registry.create("objective", "ipo").evaluate(policy, NoPairs(task.config), reference=policy, n_prompts=4, seed=0)
    assert "kl" in figures and not IMPLICIT & set(figures)


def test_trainer_summary_carries_the_figures_after_the_reference_was_freed(tmp_path):
    cfg = load_config(data={
        "task": {"name": "hh-rlhf", **TASK},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": "dpo"},  # reference: cached -- the trainer frees it and rebuilds it to evaluate
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_prompts": 4, "progress": False},
        "output_dir": str(tmp_path / "run"),
    })
    summary = Trainer(cfg, log=lambda *_: None).fit()
    assert IMPLICIT <= set(summary["eval"]) and 0.0 <= summary["eval"]["implicit_reward_accuracy"] <= 1.0
