"""The README's "Your own model and data" section works as written: every YAML config validates
against files of the format its comment names, and the Python example trains."""

import json
import re
from pathlib import Path

import pytest
import yaml

from rlhfzoo.config import load_config

REPO = Path(__file__).resolve().parents[1]
datasets = pytest.importorskip("datasets")


def section() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Your own model and data")
    return readme[start : readme.index("\n## ", start + 1)]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), flags=re.S)


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A working directory holding what the examples name: a tiny Llama with a chat template and
    a data file of each format."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhfzoo.data.tokenizer import train_bpe_tokenizer

    monkeypatch.chdir(tmp_path)
    tok = train_bpe_tokenizer([f"{i}+2? {i + 2} {i + 3}" for i in range(40)], vocab_size=300, chat=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for directory in ("models/my-llama", "runs/my-sft/policy"):
        LlamaForCausalLM(config).save_pretrained(directory)
        tok.save_pretrained(directory)
    reward_model = LlamaForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 1}))
    reward_model.save_pretrained("runs/my-rm/policy")  # what bradley-terry (and TRL's RewardTrainer) write
    tok.save_pretrained("runs/my-rm/policy")
    Path("data").mkdir()
    user, bot = ({"role": r, "content": "hi"} for r in ("user", "assistant"))
    datasets.Dataset.from_list([{"messages": [user, bot]}]).to_json("data/chat.jsonl")
    datasets.Dataset.from_list([{"prompt": "p", "chosen": " a", "rejected": " b"}]).to_parquet("data/pairs.parquet")
    datasets.Dataset.from_list([{"prompt": "p", "completion": " a", "label": True}]).to_csv("data/feedback.csv", index=False)
    Path("data/prompts.jsonl").write_text(json.dumps({"prompt": [user]}) + "\n")
    return tmp_path


def test_every_yaml_example_validates(user_files):
    examples = blocks("yaml")
    assert len(examples) == 5
    for text in examples:
        raw = yaml.safe_load(text)
        cfg = load_config(data=raw)
        assert cfg.task.entry.name == "dataset" and Path(cfg.task.config.path).exists()
        kinds = cfg.task.create().kinds()
        assert cfg.algorithm.create().example_kind() in kinds, (text, kinds)


@pytest.mark.slow
def test_python_example_trains(user_files):
    (code,) = blocks("python")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    result = scope["result"]
    assert result.summary["finished"] and (user_files / "runs/my-dpo-py/policy/config.json").exists()
