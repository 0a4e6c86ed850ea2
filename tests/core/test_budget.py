"""Training budgets (`train.budget`, rlhfzoo.budget): a run ends at the end of the first step that
spends its budget, says what it spent, and an objective that cannot spend on an axis is refused."""

import json

import pytest

from rlhfzoo.budget import check_budget, flops, held_to, matmul_params, spent
from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, algorithm, budget, steps=50, **extra):
    data = {
        "task": {"name": "sentiment"},
        "policy": {**TINY_POLICY, "max_new_tokens": 4},
        "algorithm": algorithm,
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False, "budget": budget},
        "output_dir": str(out),
        **extra,
    }
    return load_config(data=data)


def test_one_positive_axis():
    assert check_budget({"examples": 8}) == {"examples": 8.0} and check_budget(None) is None
    for bad, match in (({"seconds": 1, "examples": 2}, "exactly one axis"), ({"joules": 1}, "unknown budget axis 'joules'"), ({"seconds": 0}, "positive"), ({"seconds": float("inf")}, "finite"), ({"examples": float("nan")}, "finite")):
        with pytest.raises(ValueError, match=match):
            check_budget(bad)
    with pytest.raises(ConfigError, match="train.budget"):
        config("unused", {"name": "sft"}, {"minutes": 3})


def test_what_each_axis_counts():
    counters = {"train_tokens": 120, "generated_tokens": 30}
    assert [spent(a, 2.5, 3, 4, counters, 7) for a in ("seconds", "examples", "train_tokens", "generated_tokens", "reward_calls")] == [2.5, 12.0, 120.0, 30.0, 7.0]
    # flops: 6 N per training token + 2 N per sampled token, N = 1000: 6 * 1000 * 120 + 2 * 1000 * 30
    assert spent("flops", 2.5, 3, 4, counters, 7, params=1000) == flops(counters, 1000) == 780_000.0
    assert held_to("generated_tokens", online=False, scores_rewards=False) == "samples nothing while training"
    assert held_to("reward_calls", online=False, scores_rewards=False) == "calls no reward source while training"
    assert held_to("reward_calls", online=True, scores_rewards=True) is None and held_to("seconds", online=False, scores_rewards=False) is None


def test_an_examples_budget_ends_an_offline_run_at_the_step_that_spends_it(tmp_path):
    summary = Trainer(config(tmp_path / "run", {"name": "sft"}, {"examples": 10}), log=lambda *_: None).fit()
    # 4 examples a step: 8 after step 2 (< 10), 12 after step 3.
    assert summary["finished"] and summary["step"] == 3
    assert summary["budget"] == {"axis": "examples", "limit": 10.0, "used": 12.0, "step": 3, "reached": True, "step_cap": 50}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["budget_spent"] for r in rows] == [4.0, 8.0, 12.0]
    assert (tmp_path / "run" / "policy").is_dir() and json.loads((tmp_path / "run" / "summary.json").read_text())["budget"]["reached"]


def test_the_step_cap_ends_a_run_whose_budget_is_not_spent(tmp_path):
    summary = Trainer(config(tmp_path / "run", {"name": "sft"}, {"seconds": 1e6}, steps=2), log=lambda *_: None).fit()
    assert summary["finished"] and summary["step"] == 2 and summary["budget"]["reached"] is False


def test_a_generated_tokens_budget_ends_an_online_run(tmp_path):
    algorithm = {"name": "rejection-sampling", "n_samples": 2, "minibatch_size": 2}
    summary = Trainer(config(tmp_path / "run", algorithm, {"generated_tokens": 40}, reward={"name": "gold"}), log=lambda *_: None).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    spent_per_step = [r["budget_spent"] for r in rows]
    assert spent_per_step[-1] >= 40 > spent_per_step[-2]  # it stopped at the first iteration past the budget
    assert summary["step"] == len(rows) < 50 and summary["counters"]["generated_tokens"] == spent_per_step[-1]


def test_an_offline_objective_cannot_be_held_to_generated_tokens(tmp_path):
    with pytest.raises(TrainingError, match="'sft' samples nothing while training, so a generated_tokens budget would never end it"):
        Trainer(config(tmp_path / "run", {"name": "sft"}, {"generated_tokens": 100}), log=lambda *_: None)


def test_matmul_params_count_the_output_projection_not_the_input_lookup():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    # tied: wte (50 x 8) is the output projection too, counted once; all the rest as it is
    assert matmul_params(gpt2) == sum(p.numel() for p in gpt2.parameters())
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    # untied: the input embedding (50 x 8 = 400) is a lookup, lm_head (400) a matmul
    assert matmul_params(llama) == sum(p.numel() for p in llama.parameters()) - 400


def test_a_flops_budget_ends_a_run_and_the_summary_reports_flops(tmp_path):
    probe = Trainer(config(tmp_path / "probe", {"name": "sft"}, None, steps=1), log=lambda *_: None)
    summary = probe.fit()
    per_step = summary["counters"]["flops"]
    assert per_step == 6 * probe.params * summary["counters"]["train_tokens"] > 0
    limit = 2.5 * per_step  # about two and a half steps of this size
    run = Trainer(config(tmp_path / "run", {"name": "sft"}, {"flops": limit}), log=lambda *_: None).fit()
    assert run["budget"]["reached"] and run["budget"]["used"] >= limit and run["step"] < 50
    assert run["counters"]["flops"] == run["budget"]["used"]
