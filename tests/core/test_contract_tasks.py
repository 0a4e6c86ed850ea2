"""The task contract (`rlhfzoo.testing.check_task`) over every registered task, built-in or installed.

Each task is checked with the options of its case in CASES; a task without a case (a third
party's) is checked with its defaults, and every kind it provides must then be checkable: a kind
whose stage is not built fails the test rather than being skipped. Nothing trains: a stage a case
needs is built from a tiny untrained model."""

import json
from pathlib import Path

import pytest

from rlhfzoo import hookimpl, stages
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY, check_task

REPO = Path(__file__).resolve().parents[2]
TASKS = [e.name for e in registry.entries("task") if e.package != "tests"]

pytestmark = pytest.mark.usefixtures("one_thread")

# Splits small enough to derive every labelled kind in well under a second.
SMALL_SENTIMENT = {
    "n_demonstrations": 64, "n_test_demonstrations": 16, "n_prompts": 4, "n_test_prompts": 3, "samples_per_prompt": 2,
}


def sentiment(tmp_path, monkeypatch):
    """Small splits, and the SFT samples its labelled kinds read built in a fresh cache, with a tiny
    untrained policy put in place of the SFT stage (so every kind is checked and nothing trains)."""
    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "cache"))
    tiny = {k: v for k, v in TINY_POLICY.items() if k != "name"}

    def untrained_sft(self, directory, task, log, progress=False):
        registry.create("policy", TINY_POLICY["name"], tiny, task=task).save(str(directory / self.output))

    monkeypatch.setattr(registry.get("stage", "sft").cls, "build", untrained_sft)
    task = registry.create("task", "sentiment", SMALL_SENTIMENT)
    for kind in ("pairs", "unpaired", "rewarded"):
        for stage in task.stages_for(kind):
            stages.build(stage, task, log=None)
    return SMALL_SENTIMENT


def hh_rlhf(tmp_path, monkeypatch):
    """The small data file of the tests (the shared sample may be absent)."""
    return {"path": str(REPO / "tests" / "data" / "hh_small.jsonl")}


def dataset(tmp_path, monkeypatch):
    """A small prompt/chosen/rejected file (the format that gives the most kinds)."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": f" No {i}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(path), "test_fraction": 0.25, "vocab_size": 300}


SMALL_ARITHMETIC = {
    "n_demonstrations": 64, "n_test_demonstrations": 16, "n_prompts": 4, "n_test_prompts": 3, "samples_per_prompt": 2,
}


def arithmetic(tmp_path, monkeypatch):
    """Small splits, and SFT samples made by hand (per prompt: the answer and the answer plus one),
    so that every labelled kind has examples without training or sampling anything."""
    from rlhfzoo.plugins.arithmetic_problems import answer

    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "cache"))

    def hand_made_samples(self, directory, task, log, progress=False):
        rows = [[answer(p), str(int(answer(p)) + 1)] for p in task.examples("prompts", self.split)]
        (directory / self.output).write_text(json.dumps(rows))

    monkeypatch.setattr(registry.get("stage", "sft").cls, "build", lambda self, directory, task, log, progress=False: None)
    monkeypatch.setattr(registry.get("stage", "sft-samples").cls, "build", hand_made_samples)
    task = registry.create("task", "arithmetic", SMALL_ARITHMETIC)
    for stage in task.stages_for("pairs"):
        stages.build(stage, task, log=None)
    assert len(task.examples("unpaired", "test")) == 2 * SMALL_ARITHMETIC["n_test_prompts"]  # both samples of each
    return SMALL_ARITHMETIC


# Task name -> the function (tmp_path, monkeypatch) -> options it is checked with.
CASES = {"sentiment": sentiment, "hh-rlhf": hh_rlhf, "dataset": dataset, "arithmetic": arithmetic}


def test_every_builtin_task_has_a_case():
    builtin = {e.name for e in registry.entries("task") if e.package == "rlhfzoo"}
    assert builtin <= set(CASES), f"add a case to CASES for {sorted(builtin - set(CASES))}"


def test_task_contract_on_conversational_rows(tmp_path):
    """The `dataset` task's conversational variant: prompts and responses are `Chat`s."""
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": f"Answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"No {i}."}]} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_task("dataset", path=str(path), test_fraction=0.25, vocab_size=300)
    assert report["checked"] and not report["skipped"], report


@pytest.mark.parametrize("name", TASKS)
def test_task_contract(name, tmp_path, monkeypatch):
    options = CASES[name](tmp_path, monkeypatch) if name in CASES else {}
    report = check_task(name, **options)
    assert report["checked"] and not report["skipped"], f"{name}: kinds not checked: {report['skipped']}"


def test_kinds_read_from_unbuilt_stages_are_skipped_and_said_so(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHFZOO_CACHE", str(cache))
    report = check_task("sentiment", **SMALL_SENTIMENT)
    assert set(report["checked"]) == {"demonstrations", "prompts"} and report["absent"] == []
    assert report["checked"]["prompts"] == {"train": 4, "test": 3}
    assert set(report["skipped"]) == {"pairs", "unpaired", "rewarded"}
    assert all("sft-samples" in why for why in report["skipped"].values())
    assert not cache.exists() or not any(cache.iterdir())  # nothing built, nothing trained


# ---------------------------------------------------------------------------- breaches are caught


class GoldInFloat64(SentimentTask):
    name = "tests-gold-in-float64"

    def gold_reward(self, prompts, responses):
        return super().gold_reward(prompts, responses).double()


class UnknownStage(SentimentTask):
    name = "tests-unknown-stage"

    def stages_for(self, kind):
        return ["no-such-stage"] if kind == "pairs" else []


class EmptyTestSplit(SentimentTask):
    name = "tests-empty-test-split"

    def examples(self, kind, split="train"):
        return [] if split == "test" and kind == "demonstrations" else super().examples(kind, split)


class BrokenTasks:
    @hookimpl
    def register_tasks(self, register):
        register(GoldInFloat64)
        register(UnknownStage)
        register(EmptyTestSplit)


registry.register_plugin(BrokenTasks(), name="tests_contract_tasks", package="tests")


BREACHES = {
    "tests-gold-in-float64": "gold_reward: torch.float64, expected torch.float32",
    "tests-unknown-stage": "names unregistered stages",
    "tests-empty-test-split": r"examples\('demonstrations', 'test'\) must be a non-empty list",
}


@pytest.mark.parametrize("name", BREACHES)
def test_a_breach_fails_the_check(name, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssertionError, match=BREACHES[name]):
        check_task(name, **SMALL_SENTIMENT)
