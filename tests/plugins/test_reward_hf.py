"""Reward models in the Hugging Face format: a transformers `*ForSequenceClassification` with one
label, made as TRL would leave it, scores through `reward: {name: reward-model, path: ...}` exactly
as transformers scores it (its own tokenizer and chat template) and drives PPO; a reward model
trained here is written in that format, loads in transformers with no missing weights and scores
as in training; plain causal LMs and classifiers are refused with the fix."""

import json

import pytest
import torch
from pydantic import ValidationError

from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.data.tokenizer import train_bpe_tokenizer
from rlhfzoo.interfaces import Chat
from rlhfzoo.plugins.reward_heads import RewardModel, RewardModelError, last_token_index, sequence_rewards, setup_reward_head
from rlhfzoo.plugins.reward_model import RewardModelSource
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.trainer import Trainer

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is red?", "Name a fruit.", "Say hello.", "Count to two."]
GOOD = ["A colour.", "An apple.", "Hello!", "One, two."]
BAD = ["Fish.", "Chairs.", "Go away.", "Seven."]
TEXTS = QUESTIONS + GOOD + BAD + ["system user assistant Be brief."]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def tokenizer(vocab_size=300, pad_is_eos=False):
    """A ChatML BPE tokenizer (bos, eos and pad tokens; pad distinct unless `pad_is_eos`)."""
    tok = train_bpe_tokenizer(TEXTS, vocab_size=vocab_size, chat=True)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(arch, tok, **extra):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128, **ids, **extra)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=128, **ids, **extra)


def causal_lm_dir(path, arch, tok, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(arch, tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf_reward_model_dir(path, tok, seed=0):
    """What TRL's RewardTrainer leaves: LlamaForSequenceClassification (num_labels=1, `score`
    head, config.pad_token_id set) and its tokenizer, saved with save_pretrained."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_config("llama", tok, num_labels=1))
    with torch.no_grad():
        model.score.weight.normal_()  # a visible spread of rewards
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def transformers_rewards(path, ids_rows):
    """`model(**tokenizer.pad(...)).logits[:, 0]` of token-id rows, in transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = tok.pad({"input_ids": ids_rows}, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0]


def chat_ids(tok, question, answer):
    """The conversation as a TRL reward model reads it: the whole chat rendered with the template."""
    return tok(tok.apply_chat_template([user(question), bot(answer)], tokenize=False), add_special_tokens=False)["input_ids"]


def text_ids(tok, prompt, response):
    """A plain-text example: `[bos] prompt response [eos]`."""
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [tok.bos_token_id, *ids(prompt), *ids(response), tok.eos_token_id]


# ---------------------------------------------------------------------------- a model made in transformers


def test_a_transformers_reward_model_scores_as_transformers_does(tmp_path):
    tok = tokenizer(vocab_size=280)  # the reward model's own tokenizer
    path = hf_reward_model_dir(tmp_path / "rm", tok)
    source = RewardModelSource(RewardModelSource.Config(path=str(path), batch_size=3))  # two batches, sorted by length
    prompts = [Chat.of([user(q)]) for q in QUESTIONS] + QUESTIONS[:2]
    responses = GOOD + BAD[:2]
    expected = transformers_rewards(path, [chat_ids(tok, q, a) for q, a in zip(QUESTIONS, GOOD)]
                                    + [text_ids(tok, q, a) for q, a in zip(QUESTIONS[:2], BAD[:2])])
    got = source.score(prompts, responses)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)
    assert expected.std() > 0.1  # distinct inputs, distinct rewards: the test can tell them apart


def test_ppo_trains_against_a_transformers_reward_model(tmp_path):
    policy_tok = tokenizer(vocab_size=320)  # the policy's and the reward model's vocabularies differ
    rm = hf_reward_model_dir(tmp_path / "rm", tokenizer(vocab_size=280))
    policy_dir = causal_lm_dir(tmp_path / "llama", "llama", policy_tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [user(q)]}) + "\n" for q in QUESTIONS * 2))
    cfg = load_config(data={
        "task": {"name": "dataset", "path": str(prompts), "test_fraction": 0.0},
        "policy": {"name": "hf", "init": str(policy_dir), "max_new_tokens": 6},
        "algorithm": {"name": "ppo-clip"},
        "reward": {"name": "reward-model", "path": str(rm)},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path / "run"),
    })
    summary = Trainer(cfg, log=lambda *_: None).fit()
    assert summary["finished"] and (tmp_path / "run" / "policy" / "config.json").is_file()
    assert summary["reward_source"]["rm_calls"] == 8.0  # 2 iterations of 4 rollouts, each scored by the model
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in metrics if "reward" in m]
    assert len(rewards) == 2 and all(r == r and r != 0.0 for r in rewards), rewards  # finite, from the model's head


# ---------------------------------------------------------------------------- a model trained here


@pytest.mark.parametrize("arch,lora", [("llama", None), ("qwen2", None), ("llama", {"r": 4})])
def test_a_reward_model_trained_here_loads_in_transformers_and_scores_the_same(arch, lora, tmp_path):
    """LoRA too: the adapter is merged into the saved classifier."""
    from transformers import AutoModelForSequenceClassification

    if lora:
        pytest.importorskip("peft")

    tok = tokenizer()
    init = causal_lm_dir(tmp_path / arch, arch, tok)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": [user(q)], "chosen": [bot(g)], "rejected": [bot(b)]} for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    cfg = load_config(data={
        "task": {"name": "dataset", "path": str(pairs), "test_fraction": 0.0},
        "policy": {"name": "hf", "init": str(init), **({"lora": lora} if lora else {})},
        "algorithm": {"name": "bradley-terry"},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path / "run"),
    })
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.fit()
    out = tmp_path / "run" / "policy"
    model, info = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1, output_loading_info=True)
    assert {k: list(v) for k, v in info.items()} == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert type(model).__name__ == f"{'Llama' if arch == 'llama' else 'Qwen2'}ForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id
    assert not (out / "value_head.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert trainer.policy.module.value_head.bias.item() == 0.0  # trained without a bias, as `score` has none

    prompts = [Chat.of([user(q)]) for q in QUESTIONS] + ["Say hello."]
    responses = GOOD[:2] + BAD[2:] + ["Hello!"]
    in_training = RewardModel.from_policy(trainer.policy).score(prompts, responses)
    source = RewardModelSource(RewardModelSource.Config(path=str(out))).score(prompts, responses)
    direct = transformers_rewards(out, [chat_ids(tok, q, a) for q, a in zip(QUESTIONS, responses)] + [text_ids(tok, "Say hello.", "Hello!")])
    assert torch.allclose(source, direct, atol=1e-5, rtol=0) and torch.allclose(in_training, direct, atol=1e-5, rtol=0)
    assert direct.std() > 1e-3, direct  # trained: the head is no longer zero


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_with_eos_reads_the_token_before_it_in_training_and_in_transformers(arch, tmp_path):
    """With pad == eos, transformers reads the last token that is not the pad id: the one before the
    final EOS. Training reads the same one, so the saved model scores as the policy did."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer(pad_is_eos=True)
    torch.manual_seed(0)
    policy = HFPolicy(HFPolicyConfig(value_head=True), model=AutoModelForCausalLM.from_config(tiny_config(arch, tok)), tokenizer=tok)
    policy.module.eval()
    setup_reward_head(policy)
    with torch.no_grad():
        policy.module.value_head.weight.normal_()
    rows = [text_ids(tok, q, a) for q, a in zip(QUESTIONS, GOOD)]
    ids = tok.pad({"input_ids": rows}, return_tensors="pt")
    last = torch.tensor([len(r) - 2 for r in rows])  # hand-picked: the token before each row's EOS
    assert last_token_index(ids["attention_mask"], ids["input_ids"], tok.pad_token_id).tolist() == last.tolist()
    with torch.no_grad():
        hidden = policy.hidden_states(ids["input_ids"], ids["attention_mask"])
        expected = policy.module.value_head(hidden[torch.arange(len(rows)), last]).squeeze(-1)
        assert torch.allclose(sequence_rewards(policy, ids["input_ids"], ids["attention_mask"]), expected, atol=1e-6)
    policy.save(str(tmp_path / "rm"))
    assert torch.allclose(transformers_rewards(tmp_path / "rm", rows), expected, atol=1e-5, rtol=0)
    loaded = RewardModel.load(tmp_path / "rm").score(QUESTIONS, GOOD)
    assert torch.allclose(loaded, expected, atol=1e-5, rtol=0)


def test_a_head_with_a_bias_loses_it_and_the_earlier_layout_scores_as_trained(tmp_path):
    """A directory of earlier versions (causal LM + value_head.safetensors, bias and all) still
    loads and reads the last attention-mask token; reward-model training holds the bias at zero."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer(pad_is_eos=True)
    torch.manual_seed(0)
    policy = HFPolicy(HFPolicyConfig(value_head=True), model=AutoModelForCausalLM.from_config(tiny_config("llama", tok)), tokenizer=tok)
    with torch.no_grad():
        policy.module.value_head.weight.normal_()
        policy.module.value_head.bias.fill_(0.5)
    policy.save(str(tmp_path / "old"))
    rows = [text_ids(tok, q, a) for q, a in zip(QUESTIONS, GOOD)]
    ids = tok.pad({"input_ids": rows}, return_tensors="pt")
    with torch.no_grad():
        hidden = policy.hidden_states(ids["input_ids"], ids["attention_mask"])
        eos = torch.tensor([len(r) - 1 for r in rows])
        expected = (policy.module.value_head(hidden[torch.arange(len(rows)), eos]).squeeze(-1))
    assert torch.allclose(RewardModel.load(tmp_path / "old").score(QUESTIONS, GOOD), expected, atol=1e-5, rtol=0)
    setup_reward_head(policy)
    assert policy.module.value_head.bias.item() == 0.0 and not policy.module.value_head.bias.requires_grad


# ---------------------------------------------------------------------------- what is refused


def test_a_plain_causal_lm_or_a_classifier_is_not_a_reward_model(tmp_path):
    from transformers import LlamaForSequenceClassification

    tok = tokenizer()
    plain = causal_lm_dir(tmp_path / "plain", "llama", tok)
    with pytest.raises(ValidationError, match="holds LlamaForCausalLM without a reward head: it is a plain policy, not a reward model"):
        RewardModelSource.Config(path=str(plain))
    with pytest.raises(ConfigError, match="reward.path"):
        load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "ppo-clip"},
                          "reward": {"name": "reward-model", "path": str(plain)}})
    with pytest.raises(RewardModelError, match="not a reward model.*bradley-terry"):
        RewardModel.load(plain)
    LlamaForSequenceClassification(tiny_config("llama", tok, num_labels=2)).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValidationError, match="with 2 labels, a classifier: a reward model gives one score"):
        RewardModelSource.Config(path=str(tmp_path / "classifier"))
    # a causal LM whose config names a sequence classifier: transformers would draw the head at random
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "LABEL_0"}}))
    with pytest.raises(RewardModelError, match=r"lacks the weights \['score.weight'\]"):
        RewardModel.load(plain)
