"""The `combined` reward: a weighted sum of registered sources with Llama 2's safety gate, built
by name through the registry, with every sub-source's options validated up front."""

import pytest
import torch

from rlhfzoo import hookimpl
from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.interfaces import PluginConfig, RewardSource
from rlhfzoo.plugins.combined import CombinedReward
from rlhfzoo.registry import registry


class LengthReward(RewardSource):
    """Test source: `scale` * number of words of the response."""

    name = "test-length"

    class Config(PluginConfig):
        scale: float = 1.0

    def score(self, prompts, responses):
        return torch.tensor([self.config.scale * len(r.split()) for r in responses], dtype=torch.float32)

    def metrics(self):
        return {"length_calls": 1.0}


class SafetyReward(RewardSource):
    """Test source: 0.0 for responses containing "unsafe", else 1.0."""

    name = "test-safety"

    def score(self, prompts, responses):
        return torch.tensor([0.0 if "unsafe" in r else 1.0 for r in responses], dtype=torch.float32)


class TestSources:
    @hookimpl
    def register_reward_sources(self, register):
        register(LengthReward)
        register(SafetyReward)


registry.register_plugin(TestSources(), name="tests_combined_sources", package="tests")


def build(reward, task=None):
    cfg = load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "reward": reward})
    return cfg.reward.create(task=task)


def test_weighted_sum_by_name():
    src = build({"name": "combined", "sources": [{"name": "test-length", "weight": 2.0, "scale": 0.5},
                                                 {"name": "test-safety", "weight": -1.0}]})
    assert isinstance(src, CombinedReward)
    r = src.score(["p"] * 3, ["one two three four", "unsafe two", ""])
    # 2 * 0.5 * words - 1 * safety
    assert r.dtype == torch.float32 and r.tolist() == pytest.approx([4 - 1, 2 - 0, 0 - 1])
    m = src.metrics()
    assert m["combined_calls"] == 3 and m["source0_test-length/length_calls"] == 1.0
    assert m["source1_test-safety_mean"] == pytest.approx(2 / 3)


def test_llama2_gate_uses_the_safety_score_alone_below_the_threshold():
    src = build({"name": "combined", "sources": [{"name": "test-length"}, {"name": "test-safety", "weight": 0.5}],
                 "gate": {"source_index": 1, "threshold": 0.15}})
    r = src.score(["p"] * 3, ["a b c", "unsafe b c d", "x"])
    # safe: 3 + 0.5 * 1; unsafe: safety score 0.0 alone (not 4 + 0); safe: 1 + 0.5
    assert r.tolist() == pytest.approx([3.5, 0.0, 1.5])
    assert src.metrics()["combined_gated_rate"] == pytest.approx(1 / 3)


def test_gold_and_weights_on_a_real_task():
    from rlhfzoo.plugins.sentiment import SentimentTask

    task = SentimentTask()
    src = build({"name": "combined", "sources": [{"name": "gold", "weight": 1.0}, {"name": "gold", "weight": 0.5}],
                 "gate": {"source_index": 1, "threshold": 0.0}}, task=task)
    prompts, responses = ["drama review : the plot was"] * 2, ["truly wonderful .", "awful ."]
    gold = task.gold_reward(prompts, responses)
    expected = torch.where(gold < 0, gold, 1.5 * gold)
    assert torch.allclose(src.score(prompts, responses), expected)


@pytest.mark.parametrize(
    "reward, message",
    [
        ({"name": "combined", "sources": [{"name": "test-lenght"}]}, "reward.sources.0.name: .*Did you mean 'test-length'"),
        ({"name": "combined", "sources": [{"name": "test-length", "scael": 2}]}, "reward.sources.0.scael: unknown key 'scael'. Did you mean 'scale'"),
        ({"name": "combined", "sources": [{"name": "test-length", "scale": "big"}]}, "reward.sources.0.scale: Input should be a valid number"),
        ({"name": "combined", "sources": [{"weight": 1.0}]}, "reward.sources.0.name: required: the registered name of the reward source"),
        ({"name": "combined", "sources": [{"name": "test-length", "weight": "heavy"}]}, "reward.sources.0.weight: Input should be a valid number"),
        ({"name": "combined", "sources": [{"name": "test-length", "weight": True}]}, "reward.sources.0.weight: Input should be a valid number"),
        ({"name": "combined", "sources": [{"name": "test-length"}], "gate": {"source_index": 3}}, "gate.source_index: 3"),
        ({"name": "combined", "sources": []}, "at least 1"),
        ({"name": "combined", "sources": [{"name": "gold"}, {"name": "reward-model", "normalize": "sometimes"}]}, "reward.sources.1.normalize"),
    ],
)
def test_bad_sub_source_configs_are_reported_when_the_config_is_read(reward, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "reward": reward})


def test_sources_dump_as_written():
    """config.yaml and cache keys hold each source as given: weight only where given, no defaults filled in."""
    sources = [{"name": "test-length", "scale": 2.0}, {"weight": 2, "name": "test-safety"}, "test-length"]
    cfg = load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "reward": {"name": "combined", "sources": sources}})
    assert cfg.to_dict()["reward"] == {"name": "combined", "sources": [sources[0], sources[1], {"name": "test-length"}], "gate": None}
    src = cfg.reward.create()
    assert src.weights == [1.0, 2.0, 1.0] and src.names == ["test-length", "test-safety", "test-length"]
    assert src.sources[0].config.scale == 2.0
