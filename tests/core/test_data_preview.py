"""`rlhfzoo data` (a run's examples as the model sees them, with counts) and `rlhfzoo show train`.

The `dataset` task with `vocab_size: 258` trains a byte-level BPE with no merges: every byte is
one token, so the token counts below are counted by hand (bos + prompt bytes + response bytes + eos).
"""

import json

import pytest

from rlhfzoo import cli
from rlhfzoo.config import load_config
from rlhfzoo.data_preview import PreviewError, preview
from rlhfzoo.stages import StageNotBuilt

pytest.importorskip("datasets")

KENOBI = {"prompt": "Hello there", "completion": " general Kenobi"}  # 1 + 11 + 15 + 1 = 28 tokens
HI = {"prompt": "Hi", "completion": " yo"}  # 1 + 2 + 3 + 1 = 7 tokens
HELLO = {"prompt": "Say hello.", "completion": " Hello!"}  # 1 + 10 + 7 + 1 = 19 tokens


def config(tmp_path, rows, algorithm="sft", **task):
    """A run config over `rows` (written as .jsonl) with a byte-level tokenizer and a model from scratch."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"path": str(data), "vocab_size": 258, "test_fraction": 0.0, **task}
    path = tmp_path / "run.yaml"
    path.write_text(
        f"task: {json.dumps({'name': 'dataset', **options})}\n"
        "policy: {name: hf, init: scratch, max_new_tokens: 4}\n"
        f"algorithm: {{name: {algorithm}}}\n"
    )
    return path


def show(path, *overrides, n=3, split="train"):
    return preview(load_config(path, list(overrides)), n=n, split=split)


def test_demonstrations_mark_the_response_and_count_tokens(tmp_path):
    out = show(config(tmp_path, [KENOBI, HI, HELLO]))
    assert out.startswith("demonstrations of the train split of task 'dataset', as algorithm 'sft' trains on them\n")
    assert "tokenizer: task 'dataset' (vocabulary 258), policy.max_length=128\n" in out
    assert "sequence (28 tokens):\n    <|endoftext|>Hello there[[ general Kenobi<|endoftext|>]]\n" in out
    assert "sequence (7 tokens):\n    <|endoftext|>Hi[[ yo<|endoftext|>]]\n" in out
    assert "sequence (19 tokens):\n    <|endoftext|>Say hello.[[ Hello!<|endoftext|>]]\n" in out
    assert "demonstrations in the train split: 3 (3 shown)\n" in out
    assert "rows read: " in out and "(prompt-completion): 3 rows -> 3 kept, 0 skipped" in out
    assert "(truncated): 0 of the 3 sequences shown, 0 of the 3 sequences of the split (longest: 28 tokens)" in out


def test_truncation_as_the_collator_cuts(tmp_path):
    # max_length 8: the prompt shrinks to the bos, the response keeps its first 7 tokens (no eos).
    out = show(config(tmp_path, [KENOBI, HI, HELLO]), "policy.max_length=8")
    assert "sequence (8 tokens, truncated from 28):\n    <|endoftext|>[[ genera]]\n" in out
    assert "sequence (8 tokens, truncated from 19):\n    <|endoftext|>[[ Hello!]]\n" in out
    assert "sequence (7 tokens):\n    <|endoftext|>Hi[[ yo<|endoftext|>]]\n" in out
    assert "longer than policy.max_length=8 (truncated): 2 of the 3 sequences shown, 2 of the 3 sequences of the split" in out
    # None shown: the whole split is still counted.
    out = show(config(tmp_path, [KENOBI, HI, HELLO]), "policy.max_length=8", n=0)
    assert "--- example" not in out and "(3 shown)" not in out and "(0 shown)" in out
    assert "(truncated): 2 of the 3 sequences of the split (longest: 28 tokens)" in out


def test_pairs_show_chosen_rejected_and_margin(tmp_path):
    rows = [{"prompt": "Q", "chosen": " yes", "rejected": " no", "margin": 2.0}]
    out = show(config(tmp_path, rows, algorithm="dpo"))
    assert "pairs of the train split" in out
    assert (
        "--- example 1: margin 2\n"
        "chosen (7 tokens):\n    <|endoftext|>Q[[ yes<|endoftext|>]]\n"
        "rejected (6 tokens):\n    <|endoftext|>Q[[ no<|endoftext|>]]\n"
    ) in out
    assert "0 of the 2 sequences shown, 0 of the 2 sequences of the split (longest: 7 tokens)" in out
    out = show(config(tmp_path, rows, algorithm="kto"))  # each pair as a desirable and an undesirable example
    assert "--- example 1: desirable\nsequence (7 tokens):\n    <|endoftext|>Q[[ yes<|endoftext|>]]\n" in out
    assert "--- example 2: undesirable\nsequence (6 tokens):\n    <|endoftext|>Q[[ no<|endoftext|>]]\n" in out


def test_rewarded_shows_the_reward(tmp_path):
    out = show(config(tmp_path, [{"prompt": "Q", "completion": " a", "reward": 0.25}], algorithm="reward-regression"))
    assert "--- example 1: reward 0.25\nsequence (5 tokens):\n    <|endoftext|>Q[[ a<|endoftext|>]]\n" in out


def test_prompts_of_an_online_algorithm_as_generation_sees_them(tmp_path):
    path = config(tmp_path, [KENOBI, HI], algorithm="ppo-clip")
    out = show(path, "reward.name=gold", "policy.max_length=8")  # room for 8 - 4 = 4 prompt tokens
    assert out.startswith("prompts of the train split of task 'dataset', as algorithm 'ppo-clip' trains on them (online")
    assert "max_length - max_new_tokens = 4 tokens" in out
    assert "prompt (4 tokens, cut from 12):\n    here\n" in out  # the last 4 bytes; the bos is cut with the rest
    assert "prompt (3 tokens):\n    <|endoftext|>Hi\n" in out
    assert "[[" not in out
    assert "longer than 4 tokens (cut): 1 of the 2 prompts shown, 1 of the 2 prompts of the split (longest: 12 tokens)" in out


def test_test_split_holds_the_other_rows(tmp_path):
    path = config(tmp_path, [KENOBI, HI], test_fraction=0.5)
    train, test = show(path), show(path, split="test")
    kenobi, hi = "Hello there[[ general Kenobi", "Hi[[ yo"
    assert "in the train split: 1 (1 shown)" in train and "in the test split: 1 (1 shown)" in test
    assert (kenobi in train) != (hi in train)
    assert (kenobi in test) == (hi in train) and (hi in test) == (kenobi in train)


def test_policy_directory_tokenizer_and_context(tmp_path):
    from transformers import GPT2Config

    from rlhfzoo.data.tokenizer import train_bpe_tokenizer

    model = tmp_path / "model"
    train_bpe_tokenizer(["Hello there"], vocab_size=258).save_pretrained(model)
    GPT2Config(n_positions=16, n_embd=8, n_layer=1, n_head=1).save_pretrained(model)  # a config, no weights
    out = show(config(tmp_path, [KENOBI]), f"policy.init={model}")
    assert f"tokenizer: {model} (vocabulary 258), policy.max_length=16\n" in out  # lowered to the model's context
    assert "sequence (16 tokens, truncated from 28):\n    <|endoftext|>[[ general Kenobi]]\n" in out


def test_user_errors(tmp_path, monkeypatch):
    path = config(tmp_path, [KENOBI])
    with pytest.raises(PreviewError, match="has no rewarded examples, which algorithm 'ilql' trains on .it has demonstrations, prompts."):
        show(path, "algorithm.name=ilql")
    with pytest.raises(PreviewError, match="no demonstrations examples in the test split"):
        show(path, split="test")
    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(StageNotBuilt, match="'sft' stage of task 'dataset' is not built yet.*rlhfzoo stage sft"):
        show(path, "policy.init=sft")


def cli_error(capsys, *argv):
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_cli(capsys, tmp_path):
    path = config(tmp_path, [KENOBI, HI])
    assert cli.main(["data", str(path), "--n", "1", "policy.max_length=8"]) == 0
    out = capsys.readouterr().out
    assert "policy.max_length=8" in out and out.count("--- example") == 1
    err = cli_error(capsys, "data", str(path), "--split", "dev")
    assert err == "error: --split 'dev': a task's splits are train and test; give --split train or --split test\n"
    err = cli_error(capsys, "data", str(path), f"task.path={tmp_path / 'absent.jsonl'}")
    assert err.startswith("error: 1 problem with the config in ") and "task.path: data path not found" in err
    assert "absent.jsonl" in err


def test_show_train_lists_the_train_options(capsys):
    assert cli.main(["show", "train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train  (the `train:` section of a run config, rlhfzoo.config.TrainConfig)\n")
    assert "    steps = 100  (int)\n        Optimizer steps (offline) or iterations (online) in total.\n" in out
    assert "    batch_size = 16  (int)\n        Examples per optimizer step across all processes (online: prompts per iteration).\n" in out
    assert "    grad_accum = 1  (int)\n        Micro-batches accumulated per optimizer step on each process.\n" in out
    assert "    lr_schedule = 'constant'  ('constant' | 'cosine')\n" in out
    assert "    max_grad_norm = 1.0  (float | None)\n" in out
