"""`rlhfzoo.train`: training from a config and from objects (a transformers model and tokenizer,
a `datasets.Dataset`, a reward function), and its errors."""

import json
import math

import pytest
import torch

import rlhfzoo
from rlhfzoo import stages
from rlhfzoo.api import RewardFunction, RewardFunctionError, TrainArgumentError
from rlhfzoo.config import ConfigError, resolve
from rlhfzoo.errors import UserError
from rlhfzoo.plugins.dataset import DatasetTask

pytestmark = pytest.mark.usefixtures("one_thread")

ANIMALS = ["cat", "dog", "owl", "fox", "eel", "bee", "yak", "emu"]
PAIRS = [
    {"prompt": f"The {a} is", "chosen": f" kind to the {b}.", "rejected": f" rude to the {b}!"}
    for a in ANIMALS
    for b in ("ant", "bat")
]  # 16 rows, 8 prompts
DEMOS = [{"prompt": f"Say {a}:", "completion": f" {a} {a}."} for a in ANIMALS]
QUICK = {"eval_prompts": 0, "progress": False, "lr": 1e-2}


@pytest.fixture(scope="module")
def tokenizer():
    from rlhfzoo.data.tokenizer import train_bpe_tokenizer

    texts = [t for r in PAIRS for t in r.values()] + [t for r in DEMOS for t in r.values()]
    return train_bpe_tokenizer(texts, vocab_size=300)


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pairs():
    from datasets import Dataset

    return Dataset.from_list(PAIRS)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ training


def test_dpo_trains_the_model_passed_in(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    before = model.model.embed_tokens.weight.detach().clone()
    result = rlhfzoo.train(
        {"algorithm": {"name": "dpo"}, "train": {"steps": 2, "batch_size": 4, **QUICK}},
        model=model, tokenizer=tokenizer, train_dataset=pairs(), output_dir=tmp_path / "run",
    )
    assert result.policy.module.lm is model  # trained in place, the object the caller holds
    assert not torch.equal(model.model.embed_tokens.weight, before)
    assert result.output_dir == tmp_path / "run" and result.summary["finished"] and result.summary["step"] == 2
    assert (tmp_path / "run" / "policy" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == result.summary
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1: -log sigmoid(0)
    assert "rows_fingerprint" in (tmp_path / "run" / "config.yaml").read_text()


def test_sft_from_a_list_of_dicts_with_held_out_rows(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    before = model.lm_head.weight.detach().clone()
    result = rlhfzoo.train(
        {"algorithm": {"name": "sft"}, "train": {"steps": 2, "batch_size": 4, **QUICK, "eval_prompts": 2},
         "policy": {"max_new_tokens": 4}},
        model=model, tokenizer=tokenizer, train_dataset=DEMOS, eval_dataset=DEMOS[:2], output_dir=tmp_path / "run",
    )
    assert not torch.equal(model.lm_head.weight, before)
    assert result.summary["eval"]["n"] == 2  # the two held-out prompts of eval_dataset, sampled once each
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "run"))


def test_online_algorithm_with_a_reward_function(tokenizer, tmp_path):
    calls = []

    def brevity(prompts, responses):
        calls.append((prompts, responses))
        return [-float(len(r)) for r in responses]

    model = tiny_llama(tokenizer)
    result = rlhfzoo.train(
        {"algorithm": {"name": "rejection-sampling", "n_samples": 2, "minibatch_size": 4},
         "policy": {"max_new_tokens": 6}, "train": {"steps": 1, "batch_size": 4, **QUICK}},
        model=model, tokenizer=tokenizer, train_dataset=pairs(), reward=brevity, output_dir=tmp_path / "run",
    )
    assert len(calls) == 1  # one iteration: 4 prompts x 2 samples, scored at once
    prompts, responses = calls[0]
    assert len(prompts) == len(responses) == 8 and all(isinstance(t, str) for t in prompts + responses)
    assert prompts[0] == prompts[1] and prompts[0] in {r["prompt"] for r in PAIRS}
    assert result.summary["reward_source"]["reward_calls"] == 8.0
    assert metrics(tmp_path / "run")[0]["reward"] == pytest.approx(-sum(map(len, responses)) / 8)
    assert "reward:" not in (tmp_path / "run" / "config.yaml").read_text()  # a function is no config section


def test_a_config_without_objects_reads_its_task_from_a_file(tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DEMOS))
    config = {
        "task": {"name": "dataset", "path": str(data), "vocab_size": 300},
        "policy": {"init": "scratch", "n_layer": 1, "n_embd": 32, "n_head": 2, "max_new_tokens": 4},
        "algorithm": {"name": "sft"},
        "train": {"steps": 2, "batch_size": 4, **QUICK},
    }
    result = rlhfzoo.train(config, output_dir=tmp_path / "run")
    assert result.summary["finished"] and (tmp_path / "run" / "policy" / "tokenizer.json").exists()
    (tmp_path / "run.yaml").write_text(json.dumps({**config, "output_dir": str(tmp_path / "run2")}))  # YAML is a superset of JSON
    assert rlhfzoo.train(tmp_path / "run.yaml").output_dir.name == "run2"


# ------------------------------------------------------------------------------------ the in-memory task


def test_rows_in_memory_are_a_dataset_task_a_stage_config_can_name(tmp_path):
    task = DatasetTask.from_rows(pairs(), test_fraction=0.25)
    assert len(task.examples("pairs")) == 12 and len(task.examples("pairs", split="test")) == 4  # 2 of 8 prompts held out
    again = DatasetTask(DatasetTask.Config(**task.sft_task_options()))  # what a cached stage's nested run builds
    assert again.examples("pairs") == task.examples("pairs")
    assert DatasetTask.from_rows(pairs()).config.rows_fingerprint == task.config.rows_fingerprint  # by content
    other = DatasetTask.from_rows(pairs().select(range(8)))
    assert other.config.rows_fingerprint != task.config.rows_fingerprint


def test_a_given_policy_needs_no_stage():
    task = DatasetTask.from_rows(pairs())
    cfg = resolve({"task": {"name": "dataset", "rows_fingerprint": task.config.rows_fingerprint}, "algorithm": "dpo"})
    assert stages.needed(cfg, task) == ["sft"]  # the default policy starts from the task's SFT stage
    assert stages.needed(cfg, task, given=("policy",)) == []


def test_a_fingerprint_this_process_does_not_hold_is_a_config_error():
    with pytest.raises(ConfigError, match="rows_fingerprint.*give `path`"):
        resolve({"task": {"name": "dataset", "rows_fingerprint": "0123abcd"}, "algorithm": "sft"})


# ------------------------------------------------------------------------------------ errors


def test_reward_function_output_is_checked_and_names_the_function():
    def shaped(prompts, responses):
        return torch.tensor([1.0, 2.0, 3.0])[: len(responses)]

    source = RewardFunction(shaped)
    assert source.score(["p", "q"], ["a", "b"]).tolist() == [1.0, 2.0]
    with pytest.raises(RewardFunctionError, match=r"'test_reward_function_output.*shaped'.*\(3,\) rewards for 4 responses"):
        source.score(["p"] * 4, ["a"] * 4)
    with pytest.raises(RewardFunctionError, match=r"non-finite rewards \(nan\) for responses \[1\]"):
        RewardFunction(lambda p, r: [0.0, float("nan")]).score(["p", "q"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="returned str"):
        RewardFunction(lambda p, r: "good").score(["p"], ["a"])
    assert issubclass(RewardFunctionError, UserError)


@pytest.mark.parametrize(
    "kwargs, config, message",
    [
        ({"model": "tiny"}, {}, r"model=\.\.\.\) needs the model's tokenizer"),
        ({"tokenizer": "tok"}, {}, r"tokenizer=\.\.\.\) is the tokenizer of model"),
        ({"model": "tiny", "tokenizer": "tok"}, {"policy": {"init": "scratch"}}, r"policy.init='scratch'.*drop one"),
        ({}, {"task": {"name": "dataset", "path": "x.jsonl"}}, r"task.path='x.jsonl'.*drop task.path or train_dataset"),
        ({}, {"task": {"name": "sentiment"}}, r"task 'sentiment'.*read by the 'dataset' task"),
        ({"reward": len}, {"reward": {"name": "gold"}}, r"reward=\.\.\. and a `reward` section"),
        ({"reward": RewardFunction}, {}, r"not the class RewardFunction"),
        ({"output_dir": None}, {}, r"needs an output directory.*pass output_dir="),
        ({"eval_dataset": PAIRS, "train_dataset": None}, {}, r"eval_dataset=\.\.\.\) holds out rows of train_dataset"),
        ({"train_dataset": {"prompt": ["a"]}}, {}, r"train_dataset=\.\.\.\) takes a datasets.Dataset or a non-empty list"),
    ],
)
def test_bad_arguments_are_user_errors_naming_them(tokenizer, tmp_path, kwargs, config, message):
    kwargs = {"train_dataset": PAIRS, "output_dir": tmp_path / "run", **kwargs}
    kwargs = {k: tiny_llama(tokenizer) if v == "tiny" else tokenizer if v == "tok" else v for k, v in kwargs.items()}
    with pytest.raises(TrainArgumentError, match=message):
        rlhfzoo.train({"algorithm": {"name": "dpo"}, **config}, **kwargs)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_held_out_rows_given_twice_is_a_config_error_at_the_task(tmp_path):
    with pytest.raises(ConfigError, match=r"task: the held-out rows are passed as eval_dataset"):
        rlhfzoo.train(
            {"algorithm": "sft", "task": {"test_fraction": 0.3}}, train_dataset=DEMOS, eval_dataset=DEMOS[:2], output_dir=tmp_path
        )


def test_an_online_algorithm_without_rewards_says_to_pass_them(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"needs a reward source"):
        rlhfzoo.train({"algorithm": "rejection-sampling"}, train_dataset=PAIRS, output_dir=tmp_path)
