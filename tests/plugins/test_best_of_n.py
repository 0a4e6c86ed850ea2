"""Best-of-N as a policy: it returns each prompt's best candidate under its reward source, merges
chunks into one well-formed rollout, satisfies what evaluation needs, and (learning) its held-out
gold reward grows with N."""

import math

import pytest
import torch
from pydantic import ValidationError

from rlhfzoo import hookimpl, stages
from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.evaluation import evaluate
from rlhfzoo.interfaces import RewardSource
from rlhfzoo.plugins.best_of_n import BestOfN, concat_rollouts, evaluate_config
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY

TINY = {**TINY_POLICY, "max_new_tokens": 6}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class CountLetters(RewardSource):
    """A deterministic test reward: the number of letters 'e' in the response."""

    name = "tests-count-e"

    def score(self, prompts, responses):
        return torch.tensor([float(r.count("e")) for r in responses])


class TestPlugin:
    @hookimpl
    def register_reward_sources(self, register):
        register(CountLetters)


@pytest.fixture(scope="module")
def task():
    registry.register_plugin(TestPlugin(), name="tests_best_of_n_rewards", package="tests")
    return SentimentTask()


def make(task, n, reward="tests-count-e", **kw):
    return registry.create("policy", "best-of-n", {"n": n, "base": TINY, "reward": {"name": reward}, **kw}, task=task)


def test_returns_the_best_candidate_of_each_prompt(task):
    bon = make(task, 5)
    prompts = task.examples("prompts")[:4]
    torch.manual_seed(0)
    candidates = bon.base.generate([p for p in prompts for _ in range(5)])
    torch.manual_seed(0)
    ro = bon.generate(prompts)
    counts = torch.tensor([float(r.count("e")) for r in candidates.responses]).view(4, 5)
    best = counts.argmax(-1)
    assert ro.prompts == list(prompts)
    assert ro.responses == [candidates.responses[i * 5 + int(b)] for i, b in enumerate(best)]
    assert bon.last_scores.tolist() == counts.max(-1).values.tolist()
    assert bon.counters["reward_calls"] == 20.0
    assert bon.analytic_kl() == pytest.approx(math.log(5) - 4 / 5)


def test_chunks_merge_into_one_rollout(task):
    bon = make(task, 3, chunk_size=6)  # 2 prompts per base call
    prompts = task.examples("prompts")[:7]
    torch.manual_seed(1)
    ro = bon.generate(prompts)
    assert ro.sequences.shape[0] == 7 and len(ro.responses) == 7 and ro.finished.shape == (7,)
    # Left-padded prompts, right-padded responses, log-probs aligned with the sequences.
    first_resp = [int(r.nonzero()[0]) for r in ro.response_mask]
    assert len(set(first_resp)) == 1
    lp = bon.logprobs(ro.sequences, ro.attention_mask) * ro.response_mask[:, 1:]
    assert torch.allclose(lp, ro.logprobs, atol=1e-5)
    for i in range(7):
        cols = ro.attention_mask[i].nonzero().squeeze(-1)
        assert (cols == torch.arange(cols[0], cols[-1] + 1)).all()


def test_concat_rollouts_is_identity_on_one(task):
    bon = make(task, 1)
    ro = bon.base.generate(task.examples("prompts")[:2])
    assert concat_rollouts([ro], 0) is ro


def test_a_policy_for_evaluation_and_the_registry(task):
    bon = make(task, 2, reward="gold")
    out = evaluate(bon, task, reference=bon.base.frozen_copy(), n_prompts=6, seed=0)
    assert out["n"] == 6.0 and math.isfinite(out["gold"])
    # Its samples carry the base's log-probs, so a sampled estimate would read 0: the closed form stands.
    assert out["kl"] == pytest.approx(math.log(2) - 1 / 2) and out["kl_se"] == 0.0
    copy = bon.frozen_copy()
    assert isinstance(copy, BestOfN) and copy.reward is bon.reward
    assert not any(p.requires_grad for p in copy.parameters())
    assert BestOfN.bench is not None and all(f.description for f in BestOfN.Config.model_fields.values())


def test_bad_sub_configs_are_reported_when_the_config_is_read():
    with pytest.raises(ValidationError) as e:
        BestOfN.Config(base={"init": "sft"})
    assert [(err["loc"], err["msg"]) for err in e.value.errors()] == [(("base", "name"), "required: the registered name of the policy to use")]
    with pytest.raises(ConfigError, match=r"policy.base.temprature: unknown key 'temprature'. Did you mean 'temperature'\?"):
        load_config(data={"task": "sentiment", "policy": {"name": "best-of-n", "base": {**TINY, "temprature": 1.0}}}, require=("task",))
    with pytest.raises(ConfigError, match=r"policy.reward.name: Reward source 'no-such-reward' is not registered"):
        load_config(data={"task": "sentiment", "policy": {"name": "best-of-n", "reward": "no-such-reward"}}, require=("task",))


def test_sub_configs_dump_as_written():
    """config.yaml and cache keys hold the sections as given: no defaults filled in, aliases kept."""
    options = {"n": 4, "base": {"name": "transformers", "init": "sft", "top_k": 3}, "reward": {"name": "gold"}}
    config = BestOfN.Config(**options)
    assert config.model_dump(mode="json") == {**options, "chunk_size": 1024}
    assert BestOfN.Config(reward="gold").model_dump(mode="json")["reward"] == {"name": "gold"}  # a name alone
    assert config.base.config.top_k == 3 and config.base.entry.name == "hf"
    assert BestOfN.required_stages(config) == ["sft"]


def test_evaluate_config_builds_the_stages_it_reads_first(task, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path))  # empty: only the recorded builds happen
    built = []
    monkeypatch.setattr(stages, "build", lambda name, task, *args, **kwargs: built.append(name))
    config = {"task": {"name": "sentiment"}, "reward": {"name": "reward-model"},
              "policy": {"name": "best-of-n", "n": 2, "base": {"name": "hf", "init": "sft"}, "reward": {"name": "gold"}}}
    with pytest.raises(stages.StageNotBuilt, match="'sft' stage"):  # nothing was really built, so reading fails
        evaluate_config(config, n_prompts=2)
    assert built == ["sft", "reward-model"]


@pytest.mark.learning
def test_gold_grows_with_n(task):
    """SFT base, the task's reward model choosing: gold(N=1) < gold(N=4) < gold(N=16) on held-out prompts."""
    figures = {}
    config = {"base": {"name": "hf", "init": "sft"}, "reward": {"name": "reward-model", "path": "auto"}}
    for name in BestOfN.required_stages(BestOfN.Config(**config)):  # ["sft", "reward-model"]: built first
        stages.build(name, task)
    for n in (1, 4, 16):
        bon = registry.create("policy", "best-of-n", {"n": n, **config}, task=task)
        figures[n] = evaluate(bon, task, n_prompts=100, seed=0)
    print("\nbest-of-n gold: " + ", ".join(f"N={n}: {f['gold']:.3f} ± {f['gold_se']:.3f}" for n, f in figures.items()))
    assert figures[1]["gold"] < figures[4]["gold"] < figures[16]["gold"]
    se = math.sqrt(figures[1]["gold_se"] ** 2 + figures[16]["gold_se"] ** 2)
    assert figures[16]["gold"] - figures[1]["gold"] > 3 * se
