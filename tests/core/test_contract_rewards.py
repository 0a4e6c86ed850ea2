"""The reward-source contract (`rlhfzoo.testing.check_reward_source`) over every registered reward
source, built-in or installed, on a small `sentiment` task.

Each source is checked with the options of its case in CASES; a source without a case (a third
party's) is checked with its defaults, so one that reads an unbuilt stage fails the test. What a
case needs is cheap: a tiny untrained judge, a saved tiny model with a random scalar head."""

import pytest
import torch

from rlhfzoo import hookimpl, stages
from rlhfzoo.interfaces import RewardSource, Stage
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY, check_reward_source

SOURCES = [e.name for e in registry.entries("reward_source") if e.package != "tests"]
TINY = {k: v for k, v in TINY_POLICY.items() if k != "name"}
# A context as long as the policy's default `max_length`: see test_inputs_longer_than_the_models_context.
TINY_CONTEXT = {**TINY, "n_positions": 128}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(small_sentiment):
    return small_sentiment


def tiny_reward_model(directory, task, **sizes):
    """A reward-model directory: a tiny policy with a scalar head, every weight random, saved."""
    policy = registry.create("policy", TINY_POLICY["name"], {**sizes, "value_head": True}, task=task)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.module.parameters():
            p.normal_(0, 0.2)  # the head starts at zero: every reward would be 0
    policy.save(str(directory))
    return str(directory)


# Source name -> the function (tmp_path, task) -> options it is checked with.
CASES = {
    "gold": lambda tmp_path, task: {},
    "combined": lambda tmp_path, task: {
        "sources": [{"name": "gold"}, {"name": "gold", "weight": 0.5}], "gate": {"source_index": 0, "threshold": -0.5},
    },
    # An untrained judge rates nothing: every reward falls back, which max_failure_rate 1 allows.
    "critique": lambda tmp_path, task: {
        "judge": {"name": TINY_POLICY["name"], **TINY_CONTEXT, "top_k": 1, "max_new_tokens": 4}, "max_failure_rate": 1.0,
    },
    "reward-model": lambda tmp_path, task: {"path": tiny_reward_model(tmp_path / "rm", task, **TINY_CONTEXT)},
}


def test_every_builtin_reward_source_has_a_case():
    builtin = {e.name for e in registry.entries("reward_source") if e.package == "rlhfzoo"}
    assert builtin <= set(CASES), f"add a case to CASES for {sorted(builtin - set(CASES))}"


@pytest.mark.parametrize("name", SOURCES)
def test_reward_source_contract(name, tmp_path, task):
    options = CASES[name](tmp_path, task) if name in CASES else {}
    check_reward_source(name, task=task, **options)


def test_inputs_longer_than_the_models_context(tmp_path, task):
    """Regression: a reward model saved with `max_length` 128 on a 96-position model truncated long
    inputs to 128 tokens and indexed the position embeddings past their end (IndexError)."""
    check_reward_source("reward-model", task=task, path=tiny_reward_model(tmp_path / "rm", task, **TINY))


# ---------------------------------------------------------------------------- breaches are caught


class Scores(RewardSource):
    """A source that scores by response length; the subclasses below each break one clause."""

    name = "tests-lengths"

    def score(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


class InFloat64(Scores):
    name = "tests-lengths-float64"

    def score(self, prompts, responses):
        return super().score(prompts, responses).double()


class Noisy(Scores):
    name = "tests-lengths-noisy"

    def score(self, prompts, responses):
        return super().score(prompts, responses) + torch.rand(len(responses))


class PrefersTheFirst(Scores):
    name = "tests-prefers-the-first"

    def compare(self, prompts, responses_a, responses_b):
        return torch.ones(len(prompts))


class CountsInIntegers(Scores):
    name = "tests-int-metrics"

    def metrics(self):
        return {"calls": 3}


class Offset(Stage):
    """A cheap stage: a number written to a file."""

    name = "tests-offset"
    output = "offset.txt"

    def key(self, task):
        return {"task": task.name}

    def build(self, directory, task, log, progress=False):
        (directory / self.output).write_text("0.5")


class ScoresPlusOffset(Scores):
    """A source that reads a stage when it is built, as `reward-model` reads its model."""

    name = "tests-lengths-plus-offset"

    @classmethod
    def required_stages(cls, config):
        return ["tests-offset"]

    def __init__(self, config=None, task=None):
        super().__init__(config, task)
        self.offset = float(stages.path("tests-offset", task).read_text())

    def score(self, prompts, responses):
        return super().score(prompts, responses) + self.offset


class BrokenSources:
    @hookimpl
    def register_reward_sources(self, register):
        for cls in (Scores, InFloat64, Noisy, PrefersTheFirst, CountsInIntegers, ScoresPlusOffset):
            register(cls)

    @hookimpl
    def register_stages(self, register):
        register(Offset)


registry.register_plugin(BrokenSources(), name="tests_contract_rewards", package="tests")


def test_a_source_that_keeps_the_contract_passes(task):
    assert check_reward_source("tests-lengths", task=task) == {}


def test_the_stages_a_source_reads_are_built_only_when_asked(task, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(stages.StageNotBuilt, match="tests-offset"):
        check_reward_source("tests-lengths-plus-offset", task=task)
    check_reward_source("tests-lengths-plus-offset", task=task, build_stages=True)
    assert stages.path("tests-offset", task).read_text() == "0.5"


BREACHES = {
    "tests-lengths-float64": "torch.float64, expected torch.float32",
    "tests-lengths-noisy": "differs between two calls",
    "tests-prefers-the-first": r"compare\(a, b\)",
    "tests-int-metrics": "must map names to floats",
}


@pytest.mark.parametrize("name", BREACHES)
def test_a_breach_fails_the_check(name, task):
    with pytest.raises(AssertionError, match=BREACHES[name]):
        check_reward_source(name, task=task)
