"""The `arithmetic` task: its problems and split, the exact-answer gold reward, the character
tokenizer, the labels derived from SFT samples, and the task contract.

No model is trained: the SFT samples the labelled kinds read are written by hand (or put in place
of the `sft-samples` stages' output), and the slow test reads the cached SFT stage's report.
"""

import json

import pytest
import torch
from pydantic import ValidationError

from rlhfzoo import stages
from rlhfzoo.data.collate import encode
from rlhfzoo.interfaces import Demonstration, PreferencePair, RewardedExample, UnpairedExample
from rlhfzoo.plugins import arithmetic as A
from rlhfzoo.plugins import arithmetic_problems as P
from rlhfzoo.plugins.arithmetic import ArithmeticTask
from rlhfzoo.registry import registry
from rlhfzoo.testing import check_task

SMALL = {"n_demonstrations": 64, "n_test_demonstrations": 16, "n_prompts": 6, "n_test_prompts": 4, "samples_per_prompt": 3}


def gold(prompts, responses, **options):
    return ArithmeticTask(ArithmeticTask.Config(**options)).gold_reward(prompts, responses)


# ------------------------------------------------------------------------------ gold reward
def test_gold_reward_checks_the_exact_answer():
    responses = ["46", "47", " 46", "46 ", "046", "+46", "4 6", "46.", "46=46", "", "-46"]
    g = gold(["12+34="] * len(responses), responses)
    assert g.dtype == torch.float32 and g.shape == (len(responses),)
    assert g.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_gold_reward_of_subtraction_carries_and_zero():
    prompts = ["305-417=", "305-417=", "417-305=", "7-7=", "7-7=", "99+1=", "0-9=", "999-1000="]
    responses = ["-112", "112", "112", "0", "-0", "100", "-9", "-1"]
    assert gold(prompts, responses).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert [P.answer(p) for p in ("305-417=", "99+1=", "7-7=", "0+0=")] == ["-112", "100", "0", "0"]


def test_format_reward_for_a_wrong_but_well_formed_integer():
    responses = ["46", "47", "-3", "0", "046", "-0", "4 6", "", "x"]
    g = gold(["12+34="] * len(responses), responses, format_reward=0.25)
    assert g.tolist() == [1.0, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_a_prompt_that_is_no_problem_and_mismatched_lengths_are_errors():
    with pytest.raises(ValueError, match="not an arithmetic problem: '12\\*3='"):
        gold(["12*3="], ["36"])
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        P.answer("012+3=")  # operands are written without leading zeros
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        P.gold_scores(["1+1=", "1+2="], ["2"])


def test_response_metrics_are_accuracy_and_well_formed_rate():
    m = ArithmeticTask().response_metrics(["12+34=", "12+34=", "5-9=", "5-9="], ["46", "47", "-4", "four"])
    assert m == {"accuracy": 0.5, "well_formed_rate": 0.75}


# ------------------------------------------------------------------------------ problems
def test_prompts_are_distinct_seeded_and_the_splits_disjoint():
    task = ArithmeticTask(ArithmeticTask.Config(n_prompts=400, n_test_prompts=100))
    train, test = task.examples("prompts", "train"), task.examples("prompts", "test")
    assert len(set(train)) == 400 and len(set(test)) == 100 and not set(train) & set(test)
    assert task.eval_prompts() == test
    assert all(P.problem_split(p) == "train" for p in train) and all(P.problem_split(p) == "test" for p in test)
    again = ArithmeticTask(ArithmeticTask.Config(n_prompts=400, n_test_prompts=100))
    other = ArithmeticTask(ArithmeticTask.Config(n_prompts=400, n_test_prompts=100, seed=1))
    assert again.examples("prompts") == train and again.examples("demonstrations") == task.examples("demonstrations")
    assert other.examples("prompts") != train and not set(other.examples("prompts")) & set(test)
    assert ArithmeticTask(ArithmeticTask.Config(n_prompts=50)).examples("prompts") == train[:50]


def test_demonstrations_answer_their_problems_within_the_digit_range():
    task = ArithmeticTask(ArithmeticTask.Config(min_digits=2, max_digits=3, operations=["-"], n_demonstrations=500))
    demos = task.examples("demonstrations")
    assert len(demos) == 500 and all(isinstance(d, Demonstration) for d in demos)
    for d in demos:
        a, b = d.prompt[:-1].split("-")
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999 and d.response == str(int(a) - int(b))
        assert P.problem_split(d.prompt) == "train"
    assert any(d.response.startswith("-") for d in demos) and any(len(a) == 3 for a in (d.prompt.split("-")[0] for d in demos))
    assert all(P.problem_split(d.prompt) == "test" for d in task.examples("demonstrations", "test"))


def test_problem_counts_and_too_many_prompts():
    assert P.n_problems(1, 1, "+") == 100 and P.n_problems(1, 2, "+-") == 2 * 100**2 and P.n_problems(3, 3, "+") == 900**2
    with pytest.raises(ValueError, match="could not draw 50 distinct test problems"):
        P.make_prompts(50, 0, "test", 1, 1, "+")  # about 10 of the 100 one-digit sums are held out


def test_bad_config():
    with pytest.raises(ValidationError, match="min_digits"):
        ArithmeticTask.Config(min_digits=3, max_digits=2)
    with pytest.raises(ValidationError, match="operations must be distinct"):
        ArithmeticTask.Config(operations=["*"])
    with pytest.raises(ValidationError, match="operations must be distinct"):
        ArithmeticTask.Config(operations=["+", "+"])
    with pytest.raises(ValidationError):
        ArithmeticTask.Config(format_reward=1.0)
    with pytest.raises(ValidationError):
        ArithmeticTask.Config(typo=1)
    assert all(f.description for f in ArithmeticTask.Config.model_fields.values())
    with pytest.raises(ValueError, match="valid kinds: demonstrations, pairs, unpaired, rewarded, prompts, rankings"):
        ArithmeticTask().examples("critiques")
    with pytest.raises(ValueError, match="valid splits"):
        ArithmeticTask().examples("prompts", "validation")


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_one_token_per_character_and_round_trip():
    tok = ArithmeticTask().tokenizer()
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert len(tok) == 4 + 14 and len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    digits = [tok("0123456789"[i], add_special_tokens=False)["input_ids"] for i in range(10)]
    assert all(len(ids) == 1 for ids in digits) and len({ids[0] for ids in digits}) == 10
    for text in ("305-417=", "-112", "12+34= 46", "1000000000"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids and tok.decode(ids) == text
    assert tok("a1", add_special_tokens=False)["input_ids"] == [tok.unk_token_id, digits[1][0]]
    ids, mask = encode(tok, "12+34=", "46", max_length=32)  # [bos] prompt response [eos], the loss on "46<eos>"
    assert ids == [tok.bos_token_id, *tok("12+34=46", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert mask == [0] * 7 + [1] * 3
    assert tok.decode(ids, skip_special_tokens=True) == "12+34=46"
    assert ArithmeticTask().tokenizer(padding_side="left").padding_side == "left" and tok.padding_side == "right"


# ------------------------------------------------------------------------------ derived labels
PROMPTS = ["12+34=", "5-9=", "7+7="]
SAMPLES = [["46", "47", "46", "4x", "45"], ["-4", "-4"], ["14", "13", "", "14"]]


def test_pairs_put_a_correct_answer_over_a_wrong_one():
    pairs = A.preference_pairs(PROMPTS, SAMPLES)
    assert pairs == [PreferencePair("12+34=", "46", "45", margin=1.0), PreferencePair("7+7=", "14", "", margin=1.0)]
    with_format = A.preference_pairs(PROMPTS, SAMPLES, format_reward=0.25)
    assert with_format == [PreferencePair("12+34=", "46", "4x", margin=1.0), PreferencePair("7+7=", "14", "", margin=1.0)]
    with pytest.raises(ValueError, match="3 prompts but 2 lists"):
        A.preference_pairs(PROMPTS, SAMPLES[:2])


def test_rankings_unpaired_and_rewarded():
    rankings = A.ranking_pairs(PROMPTS, SAMPLES)
    assert [(r.prompt, r.chosen, r.rejected, r.group) for r in rankings] == [
        ("12+34=", "46", "47", 0), ("12+34=", "46", "4x", 0), ("12+34=", "46", "45", 0),
        ("7+7=", "14", "13", 1), ("7+7=", "14", "", 1),
    ]
    ranked = A.ranking_pairs(PROMPTS, SAMPLES, format_reward=0.25)
    assert ("12+34=", "47", "4x") in {(r.prompt, r.chosen, r.rejected) for r in ranked} and len(ranked) == 8
    unpaired = A.unpaired_examples(PROMPTS, SAMPLES)
    assert [(u.response, u.desirable) for u in unpaired] == [
        ("46", True), ("47", False), ("4x", False), ("45", False), ("-4", True), ("14", True), ("13", False), ("", False)
    ]
    rewarded = A.rewarded_examples(PROMPTS, SAMPLES, format_reward=0.25)
    assert [(r.response, r.reward) for r in rewarded] == [
        ("46", 1.0), ("47", 0.25), ("45", 0.25), ("4x", 0.0), ("-4", 1.0), ("14", 1.0), ("13", 0.25), ("", 0.0)
    ]


class HandSampledTask(ArithmeticTask):
    """The task with SFT samples made from each prompt's answer: right, off by one, and malformed."""

    def samples(self, split="train"):
        prompts = self.examples("prompts", split)
        return prompts, [[P.answer(p), str(int(P.answer(p)) + 1), P.answer(p) + "="] for p in prompts]


def test_derived_kinds_agree_with_the_gold_reward():
    task = HandSampledTask(HandSampledTask.Config(n_prompts=30, n_test_prompts=10))
    pairs = task.examples("pairs")
    assert len(pairs) == 30
    g = task.gold_reward([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    assert g[:30].tolist() == [1.0] * 30 and g[30:].tolist() == [0.0] * 30
    assert {p.group for p in task.examples("rankings")} == set(range(30)) and len(task.examples("rankings")) == 60
    unpaired, rewarded = task.examples("unpaired"), task.examples("rewarded")
    assert [u.desirable for u in unpaired] == [r.reward == 1.0 for r in rewarded] and sum(u.desirable for u in unpaired) == 30
    assert all(isinstance(r, RewardedExample) for r in rewarded) and all(isinstance(u, UnpairedExample) for u in unpaired)
    assert task.examples("pairs", "test") and not {p.prompt for p in task.examples("pairs", "test")} & {p.prompt for p in pairs}


def test_labelled_kinds_read_the_sft_samples_stages():
    task = ArithmeticTask()
    for kind in A.DERIVED_KINDS:
        assert task.stages_for(kind) == ["sft-samples", "sft-samples-test"] and task.provides(kind), kind
    assert task.stages_for("demonstrations") == [] and task.stages_for("prompts") == []
    assert not task.provides("critiques")
    key = stages.get("sft-samples").key(ArithmeticTask(ArithmeticTask.Config(**SMALL)))
    assert key["n"] == 3 and key["seed"] == 0 and key["prompts"] == ArithmeticTask(ArithmeticTask.Config(**SMALL)).examples("prompts")
    # Label options (format_reward) change neither the samples nor the SFT policy; the problems do.
    assert stages.get("sft-samples").key(ArithmeticTask(ArithmeticTask.Config(**SMALL, format_reward=0.5))) == key
    assert stages.get("sft").key(ArithmeticTask(ArithmeticTask.Config(n_prompts=7))) == stages.get("sft").key(task)
    assert stages.get("sft").key(ArithmeticTask(ArithmeticTask.Config(max_digits=3))) != stages.get("sft").key(task)


# ------------------------------------------------------------------------------ the task contract
# With hand-made SFT samples every kind is checked by tests/core/test_contract_tasks.py (its case).
def test_task_contract_without_the_samples_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "empty"))
    report = check_task("arithmetic", **SMALL)
    assert set(report["checked"]) == {"demonstrations", "prompts"} and report["absent"] == []
    assert report["checked"]["prompts"] == {"train": 6, "test": 4}
    assert set(report["skipped"]) == {"pairs", "unpaired", "rewarded"}


def test_registered_with_its_gold_reward_as_the_default():
    from rlhfzoo.registry import Registry

    reg = Registry(builtins=("rlhfzoo.plugins.arithmetic",), entry_points=False)
    entry = reg.get("task", "arithmetic")
    assert entry.cls is ArithmeticTask and "2402.03300" in entry.paper
    task = registry.create("task", "arithmetic", {})
    assert task.has_gold_reward and task.default_reward() == {"name": "gold"}
    reward = registry.create("reward_source", "gold", {}, task=task)
    assert reward.score(["2+2=", "2+2="], ["4", "5"]).tolist() == [1.0, 0.0]
    assert set(task.default_model_config()) <= set(registry.get("policy", "hf").cls.Config.model_fields)


@pytest.mark.slow
def test_cached_sft_policy_is_above_chance_and_leaves_room_to_improve():
    """The SFT stage RL starts from (trained once per cache, ~2 minutes on 2 CPU cores): its report
    on the held-out problems. Measured with the constant-lr recipe: accuracy 0.55 on 500 (0.44 with
    another initialisation; the learning curve is steep here), so the band is wide."""
    path = stages.build("sft", ArithmeticTask(), log=None)
    report = json.loads((path / "sft_report.json").read_text())
    assert 0.1 <= report["accuracy"] <= 0.85, report
    assert report["well_formed_rate"] >= 0.95 and report["finished_rate"] >= 0.95, report
    assert report["gold"] == report["accuracy"]  # format_reward 0: the gold figure is the accuracy
