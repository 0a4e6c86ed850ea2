"""One contract test over every registered objective (built-in or installed)."""

import pytest

from rlhfzoo.registry import registry
from rlhfzoo.testing import check_objective

OBJECTIVES = [e.name for e in registry.entries("objective") if e.package != "tests"]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_contract(name, tmp_path):
    check_objective(name, tmp_path / name)


ARITHMETIC = {"name": "arithmetic", "n_demonstrations": 64, "n_test_demonstrations": 8, "n_prompts": 8, "n_test_prompts": 4}


def test_contract_rewards_differ_between_samples_of_a_scratch_policy(tmp_path):
    """On `arithmetic` a scratch policy's samples all have gold 0; with that reward alone PPO's
    whitened advantages are all zero and "two optimizer steps changed no parameter" failed. The
    contract's reward (`DistinctScores`) separates different responses, so the check passes."""
    metrics = check_objective("ppo-clip", tmp_path / "ppo", task=ARITHMETIC)
    assert metrics["score"] > 0.0  # gold 0 plus the contract's term in [0, 0.1)


def test_distinct_scores_separate_responses_and_keep_the_source_scores():
    from rlhfzoo.testing import DistinctScores

    source = registry.create("reward_source", "gold", task=registry.create("task", "arithmetic", {"n_prompts": 2}))
    wrapped = DistinctScores(source)
    prompts, responses = ["12+34="] * 3, ["46", "47", "46"]
    scores = wrapped.score(prompts, responses)
    gold = source.score(prompts, responses)
    assert ((scores - gold) >= 0).all() and ((scores - gold) < 0.1).all()
    assert scores[0] == scores[2] and scores[0] != scores[1]
    assert wrapped.compare(prompts[:2], responses[:2], responses[1:]).tolist() == [1.0, -1.0]
