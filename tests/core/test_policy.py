"""rlhfzoo.policy: the value head on the policy's own transformer (`critic: shared`) or on a
separate critic model (`critic: separate`): whose weights each loss reaches, saving and
loading, the reference copy, and PPO training with a separate critic through the trainer."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from rlhfzoo.config import load_config
from rlhfzoo.errors import UserError
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.pretrained import LoadError
from rlhfzoo.testing import TINY_POLICY, contract_config
from rlhfzoo.trainer import Trainer

TINY = {k: v for k, v in TINY_POLICY.items() if k != "name"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task():
    return SentimentTask()


def batch(policy):
    enc = [policy.tokenizer(t)["input_ids"] for t in ("the plot was good .", "i found the film dull .")]
    n = max(map(len, enc))
    ids = torch.tensor([[policy.tokenizer.pad_token_id] * (n - len(e)) + e for e in enc])
    attn = torch.tensor([[0] * (n - len(e)) + [1] * len(e) for e in enc])
    return ids, attn


def grads(module):
    return [p.grad for p in module.parameters()]


def touched(module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(module))


def test_separate_critic_starts_as_a_copy_with_its_own_weights(task):
    policy = HFPolicy(HFPolicyConfig(**TINY, value_head=True, critic="separate"), task=task)
    lm, critic = policy.module.lm, policy.module.critic
    assert critic is not None and critic is not lm
    for (name, a), (_, b) in zip(lm.named_parameters(), critic.named_parameters()):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr(), f"{name} is shared between the policy and the critic"


def test_separate_critic_value_loss_reaches_only_the_critic(task):
    policy = HFPolicy(HFPolicyConfig(**TINY, value_head=True, critic="separate"), task=task)
    with torch.no_grad():
        policy.module.value_head.weight.normal_()  # a zero head passes no gradient into the trunk
    ids, attn = batch(policy)
    out = policy.forward(ids, attn, return_values=True)
    out["values"].pow(2).sum().backward()
    assert touched(policy.module.critic) and touched(policy.module.value_head)
    assert not touched(policy.module.lm)

    policy.module.zero_grad(set_to_none=True)
    policy.forward(ids, attn, return_values=True)["logprobs"].sum().backward()
    assert touched(policy.module.lm) and not touched(policy.module.critic)


def test_shared_critic_value_loss_reaches_the_policy_trunk(task):
    policy = HFPolicy(HFPolicyConfig(**TINY, value_head=True), task=task)
    assert policy.module.critic is None
    with torch.no_grad():
        policy.module.value_head.weight.normal_()
    ids, attn = batch(policy)
    policy.forward(ids, attn, return_values=True)["values"].pow(2).sum().backward()
    assert touched(policy.module.lm.base_model)


def test_separate_critic_is_saved_and_loaded_and_left_out_of_the_reference(task, tmp_path):
    policy = HFPolicy(HFPolicyConfig(**TINY, value_head=True, critic="separate"), task=task)
    with torch.no_grad():
        for p in policy.module.critic.parameters():
            p.add_(0.1)  # differs from the policy's trunk now
        policy.module.value_head.weight.normal_()
    ids, attn = batch(policy)
    expected = policy.forward(ids, attn, return_values=True)["values"]
    policy.save(str(tmp_path / "p"))
    assert (tmp_path / "p" / "critic" / "config.json").exists()

    loaded = HFPolicy(HFPolicyConfig(init=str(tmp_path / "p"), critic="separate"), task=task)
    assert loaded.module.critic is not None
    assert torch.allclose(loaded.forward(ids, attn, return_values=True)["values"], expected, atol=1e-6)

    reference = policy.frozen_copy()
    assert reference.module.critic is None and policy.module.critic is not None
    assert torch.allclose(reference.logprobs(ids, attn), policy.logprobs(ids, attn))


def test_ppo_trains_a_separate_critic(tmp_path):
    data = contract_config("ppo-clip", tmp_path / "run", minibatch_size=4, epochs=1)
    data["policy"]["critic"] = "separate"
    trainer = Trainer(load_config(data=data), log=lambda *_: None)
    module = trainer.policy.module
    assert module.critic is not None and trainer.reference.module.critic is None
    lm0 = {k: v.clone() for k, v in module.lm.state_dict().items()}
    critic0 = {k: v.clone() for k, v in module.critic.state_dict().items()}
    trainer.fit()
    assert any(not torch.equal(lm0[k], v) for k, v in module.lm.state_dict().items())
    assert any(not torch.equal(critic0[k], v) for k, v in module.critic.state_dict().items())
    assert (tmp_path / "run" / "policy" / "critic" / "model.safetensors").exists()


# ------------------------------------------------------------------------------ config checks


def config_error(**options) -> str:
    with pytest.raises(ValidationError) as e:
        HFPolicyConfig(**options)
    return str(e.value)


def test_max_length_must_fit_the_context_of_a_model_from_scratch():
    msg = config_error(init="scratch", n_positions=16, max_length=64)
    assert "max_length=64 is longer than n_positions=16" in msg
    # Left at its default, max_length follows a smaller context (configs/sft.yaml: n_positions 96).
    assert HFPolicyConfig(init="scratch", n_positions=96).max_length == 96
    assert HFPolicyConfig(init="scratch", n_positions=256).max_length == 128
    assert load_config(REPO / "configs" / "sft.yaml").policy.config.max_length == 96
    # n_positions only sizes a model from scratch; a loaded model keeps its own context.
    assert HFPolicyConfig(init="sft", n_positions=16).max_length == 128


def test_generation_needs_room_for_a_prompt():
    msg = config_error(init="scratch", n_positions=16, max_new_tokens=32)
    assert "max_new_tokens=32 leaves no room for a prompt within max_length=16 (lowered to n_positions=16)" in msg
    assert "max_new_tokens=8 leaves no room" in config_error(max_length=8, max_new_tokens=8)


def test_a_model_from_scratch_with_a_small_context_trains(tmp_path):
    """The IndexError the unchecked config gave: sequences longer than the position embeddings."""
    data = contract_config("sft", tmp_path / "run", reward=None)
    data["policy"].update(n_positions=16, max_new_tokens=4)
    trainer = Trainer(load_config(data=data), log=lambda *_: None)
    assert trainer.collator.max_length == 16
    assert trainer.fit()["step"] == 2


def test_init_names_existing_weights(tmp_path):
    for value in ("sft", "scratch", "org/some-model", "gpt2"):  # keywords and hub ids
        assert HFPolicyConfig(init=value).init == value
    assert "'/nope' does not exist" in config_error(init="/nope")
    assert "'runs/a/b' does not exist" in config_error(init="runs/a/b")
    assert "Did you mean 'scratch'?" in config_error(init="scrach")
    (tmp_path / "file.txt").write_text("x")
    assert "is a file, not a model directory" in config_error(init=str(tmp_path / "file.txt"))
    assert "holds no config.json: it is not a model directory" in config_error(init=str(tmp_path))
    assert "'/nope/tok' does not exist" in config_error(tokenizer="/nope/tok")
    assert "it is not a tokenizer directory" in config_error(tokenizer=str(tmp_path))


def test_weights_or_tokenizer_that_do_not_load_are_one_user_error(tmp_path, task):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(LoadError, match=r"policy\.init: could not load a causal LM from the directory .*broken"):
        HFPolicy(HFPolicyConfig(init=str(broken)), task=task)
    (broken / "tokenizer.json").write_text("not json")
    with pytest.raises(LoadError, match=r"policy\.tokenizer: could not load a tokenizer from the directory .*broken"):
        HFPolicy(HFPolicyConfig(**TINY, tokenizer=str(broken)), task=task)
    assert issubclass(LoadError, UserError)
