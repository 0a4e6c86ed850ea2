"""rlhfzoo.policy: the value head on the policy's own transformer (`critic: shared`) or on a
separate critic model (`critic: separate`): whose weights each loss reaches, saving and
loading, the reference copy, and PPO training with a separate critic through the trainer.
The `Policy` interface's optional members on the `hf` policy (attached modules, values,
hidden states) and its defaults on a third-party policy that implements only what is abstract."""

import copy
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from rlhfzoo import kernels
from rlhfzoo.config import load_config
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import EmptyConfig, Policy
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


# ------------------------------------------------------------------------------ attached modules


def save_extra(module: torch.nn.Module, path: str) -> None:
    save_file(module.state_dict(), os.path.join(path, "extra.safetensors"))


def with_extra(task, seed: int) -> tuple[HFPolicy, torch.nn.Module]:
    policy = HFPolicy(HFPolicyConfig(**TINY), task=task)
    torch.manual_seed(seed)
    return policy, policy.attach("extra", torch.nn.Linear(4, 3), save=save_extra)


def test_an_attached_module_is_trained_checkpointed_and_saved(task, tmp_path):
    policy, extra = with_extra(task, seed=0)
    assert policy.attached("extra") is extra and policy.attached("other") is None
    assert any(p is q for p in extra.parameters() for q in policy.parameters())  # the optimizer sees it

    policy.save_weights(str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {"extra.weight", "extra.bias"} <= set(f.keys())
    restored, other = with_extra(task, seed=1)
    assert not torch.equal(other.weight, extra.weight)
    restored.load_weights(str(tmp_path / "model.safetensors"))
    assert restored.attached("extra") is other and torch.equal(other.weight, extra.weight)

    policy.save(str(tmp_path / "policy"))
    written = load_file(str(tmp_path / "policy" / "extra.safetensors"))
    assert torch.equal(written["weight"], extra.weight) and torch.equal(written["bias"], extra.bias)
    assert (tmp_path / "policy" / "config.json").exists()  # the LM is saved as before


def test_a_module_attached_without_a_save_function_is_only_in_the_weights(task, tmp_path):
    policy = HFPolicy(HFPolicyConfig(**TINY), task=task)
    policy.attach("extra", torch.nn.Linear(4, 3))
    policy.save(str(tmp_path / "policy"))
    assert not (tmp_path / "policy" / "extra.safetensors").exists()
    policy.save_weights(str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "extra.weight" in f.keys()


def test_attached_names_must_be_new(task):
    policy, _ = with_extra(task, seed=0)
    with pytest.raises(ValueError, match="'extra': already attached"):
        policy.attach("extra", torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="'lm': a name of the policy's own module"):
        policy.attach("lm", torch.nn.Linear(4, 3))


def test_the_frozen_copy_carries_attached_modules(task, tmp_path):
    policy, extra = with_extra(task, seed=0)
    reference = policy.frozen_copy()
    copied = reference.attached("extra")
    assert copied is not None and copied is not extra
    assert torch.equal(copied.weight, extra.weight) and not copied.weight.requires_grad
    reference.save(str(tmp_path / "reference"))  # the save function travels with the module
    assert torch.equal(load_file(str(tmp_path / "reference" / "extra.safetensors"))["weight"], extra.weight)


# ------------------------------------------------------------------------------ values, hidden states


class Wrapper(torch.nn.Module):
    """Stands in for a DDP wrapper: `module` is the wrapped model, and forwards are counted."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_values_are_the_value_path_of_forward_without_the_logprobs(task, critic, monkeypatch):
    policy = HFPolicy(HFPolicyConfig(**TINY, value_head=True, critic=critic), task=task)
    with torch.no_grad():
        policy.module.value_head.weight.normal_()
    ids, attn = batch(policy)
    expected = policy.forward(ids, attn, return_values=True)["values"]
    policy.model = Wrapper(policy.module)

    def no_logprobs(*args, **kwargs):
        raise AssertionError("values() computed log-probs")

    monkeypatch.setattr(kernels, "linear_logprobs", no_logprobs)
    lm_runs = []
    policy.module.lm.base_model.register_forward_hook(lambda *_: lm_runs.append(1))
    values = policy.values(ids, attn)
    assert policy.model.calls == 1  # through the (wrapped) model, so DDP would synchronise its gradients
    assert len(lm_runs) == (1 if critic == "shared" else 0)  # a separate critic alone gives the values
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert torch.equal(values, expected)


def test_values_need_a_value_head(task):
    policy = HFPolicy(HFPolicyConfig(**TINY), task=task)
    ids, attn = batch(policy)
    with pytest.raises(NotImplementedError, match="policy 'hf' has no value head"):
        policy.values(ids, attn)


def test_with_value_head_adds_the_head_and_keeps_the_rest(task):
    config = HFPolicyConfig(**TINY, critic="separate")
    with_head = HFPolicy.with_value_head(config)
    assert with_head.value_head and not config.value_head
    assert with_head.model_dump(exclude={"value_head"}) == config.model_dump(exclude={"value_head"})
    assert HFPolicy(with_head, task=task).module.value_head is not None


def test_hidden_states_and_output_layer_give_the_logprobs(task):
    """The LM head on the hidden states of the transformer, at left-padded positions, is the policy."""
    policy = HFPolicy(HFPolicyConfig(**TINY), task=task)
    ids, attn = batch(policy)
    assert (attn == 0).any()  # a left-padded row
    with torch.no_grad():
        hidden = policy.hidden_states(ids, attn)
        head = policy.output_layer()
        assert hidden.shape == (*ids.shape, head.weight.shape[1])
        logp = torch.log_softmax(head(hidden[:, :-1]).float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        expected = policy.logprobs(ids, attn)
    real = attn[:, 1:].bool()
    assert torch.allclose(logp[real], expected[real], atol=1e-5)
    assert policy.transformer() is policy.module.lm.base_model  # the module ILQL copies as its value trunk


# ------------------------------------------------------------------------------ a third-party policy


class BigramPolicy(Policy):
    """A policy implementing only the abstract methods: a bigram table over a small vocabulary."""

    name = "bigram"

    def __init__(self, vocab: int = 8):
        self.model = torch.nn.Embedding(vocab, vocab)
        self.tokenizer = None

    def generate(self, prompts, **sampling):
        raise NotImplementedError("not needed by these tests")

    def logprobs(self, input_ids, attention_mask):
        logp = torch.log_softmax(self.model(input_ids[:, :-1]), -1)
        return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    def frozen_copy(self):
        copied = copy.deepcopy(self)
        copied.model.requires_grad_(False)
        return copied

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        save_model(self.model, os.path.join(path, "model.safetensors"))

    def save_weights(self, file):
        save_model(self.model, file)

    def load_weights(self, path):
        load_model(self.model, path)


def test_a_third_party_policy_gets_counters_and_clear_errors():
    policy, other = BigramPolicy(), BigramPolicy()
    assert policy.counters == {} and policy.counters is policy.counters
    policy.counters["train_tokens"] = 3
    assert other.counters == {}  # each policy its own dict
    policy.counters = {"generated_tokens": 1}
    assert policy.counters == {"generated_tokens": 1}
    ids = torch.tensor([[1, 2, 3]])
    for call in (
        lambda: policy.values(ids, torch.ones_like(ids)),
        lambda: policy.hidden_states(ids, torch.ones_like(ids)),
        policy.output_layer,
        policy.transformer,
        lambda: policy.attach("extra", torch.nn.Linear(2, 2)),
    ):
        with pytest.raises(NotImplementedError, match="policy 'bigram'"):
            call()
    assert policy.attached("extra") is None
    with pytest.raises(UserError, match="policy 'bigram' has no value head, which this objective needs"):
        BigramPolicy.with_value_head(EmptyConfig())


def test_the_trainer_checkpoints_a_third_party_policy(tmp_path):
    """The trainer's checkpoint code needs nothing beyond the abstract methods and `counters`."""
    trainer = Trainer(load_config(data=contract_config("sft", tmp_path / "run", reward=None)), log=lambda *_: None)
    policy = BigramPolicy()
    trainer.policy = policy
    trainer.optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    trainer.prepare_output(resume=False, overwrite=False)
    policy.counters["train_tokens"] = 5
    trainer.step = 1
    ckpt = trainer.save_checkpoint()
    saved = policy.model.weight.detach().clone()
    with torch.no_grad():
        policy.model.weight.add_(1.0)
    policy.counters["train_tokens"] = 99
    trainer.load_checkpoint(ckpt)
    assert torch.equal(policy.model.weight, saved)
    assert policy.counters == {"train_tokens": 5}


# ------------------------------------------------------------------------------ dropout and model options

PAIRS = [{"prompt": f"The {a} is", "chosen": f" kind to the {b}.", "rejected": f" rude to the {b}!"} for a in ("cat", "dog", "owl", "fox") for b in ("ant", "bat")]


@pytest.fixture(scope="module")
def bpe():
    from rlhfzoo.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([t for r in PAIRS for t in r.values()], vocab_size=300)


def gpt2_with_dropout(tok):
    """GPT-2 as on the hub: dropout 0.1 on embeddings, attention and residuals (GPT2Config's defaults)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, **ids))


@pytest.fixture(scope="module")
def llama_dir(bpe, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, attention_dropout=0.1, bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id,
        pad_token_id=bpe.pad_token_id,
    )
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    bpe.save_pretrained(path)
    return str(path)


def test_dropout_is_off_by_default_so_dpo_starts_at_h_zero(bpe, tmp_path):
    import json
    import math

    import rlhfzoo

    first_loss = {}
    for dropout in (False, True):
        model = gpt2_with_dropout(bpe)
        assert model.config.resid_pdrop == 0.1
        rlhfzoo.train(
            {"algorithm": {"name": "dpo"}, "policy": {"dropout": dropout, "max_new_tokens": 4},
             "train": {"steps": 1, "batch_size": 4, "lr": 1e-2, "eval_prompts": 0, "progress": False}},
            model=model, tokenizer=bpe, train_dataset=PAIRS, output_dir=tmp_path / str(dropout),
        )
        first_loss[dropout] = json.loads((tmp_path / str(dropout) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        probabilities = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert probabilities == ({0.1} if dropout else {0.0})
        assert json.loads((tmp_path / str(dropout) / "policy" / "config.json").read_text())["resid_pdrop"] == 0.1  # saved as loaded
    assert first_loss[False] == pytest.approx(math.log(2), abs=1e-6)  # policy (train mode) == reference (eval mode)
    assert abs(first_loss[True] - math.log(2)) > 1e-3  # dropout in the policy's forward only: h != 0


def test_dropout_off_reaches_attention_that_reads_a_float(llama_dir):
    """Llama's attention keeps `attention_dropout` as a float, not a Dropout module."""
    policy = HFPolicy(HFPolicyConfig(init=llama_dir, max_new_tokens=4))
    attention = [m for m in policy.module.lm.modules() if hasattr(m, "attention_dropout")]
    assert len(attention) == 2 and all(m.attention_dropout == 0.0 for m in attention)
    assert policy.module.lm.config.attention_dropout == 0.0
    kept = HFPolicy(HFPolicyConfig(init=llama_dir, max_new_tokens=4, dropout=True))
    assert {m.attention_dropout for m in kept.module.lm.modules() if hasattr(m, "attention_dropout")} == {0.1}


def test_model_options_reach_the_transformers_model(llama_dir, task):
    policy = HFPolicy(HFPolicyConfig(init=llama_dir, max_new_tokens=4, gradient_checkpointing=True, dtype="bfloat16", attn_implementation="eager"))
    lm = policy.module.lm
    assert lm.model.gradient_checkpointing and lm.config._attn_implementation == "eager"
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    rollout = policy.generate(["The cat is"])  # generation runs with a cache, in eval mode
    assert rollout.response_mask.sum() > 0 and torch.isfinite(rollout.logprobs).all()
    default = HFPolicy(HFPolicyConfig(init=llama_dir, max_new_tokens=4))
    assert not default.module.lm.model.gradient_checkpointing and default.module.lm.config._attn_implementation == "sdpa"
    assert {p.dtype for p in default.module.lm.parameters()} == {torch.float32}  # auto: the checkpoint's own
    scratch = HFPolicy(HFPolicyConfig(**TINY, arch="llama", dtype="bfloat16", attn_implementation="eager"), task=task)
    assert {p.dtype for p in scratch.module.lm.parameters()} == {torch.bfloat16}
    assert scratch.module.lm.config._attn_implementation == "eager"
    assert "unknown attention 'sdp'; did you mean 'sdpa'?" in config_error(attn_implementation="sdp")


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    def gradients(checkpointing: bool):
        policy = HFPolicy(HFPolicyConfig(init=llama_dir, max_new_tokens=4, gradient_checkpointing=checkpointing))
        policy.module.train()
        ids, attn = batch(policy)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = (policy.logprobs(ids, attn) * attn[:, 1:]).sum()
        loss.backward()
        return {n: p.grad for n, p in policy.module.named_parameters()}, len(saved)

    plain, saved_plain = gradients(False)
    checkpointed, saved_checkpointed = gradients(True)
    assert saved_checkpointed < saved_plain / 2  # the layers' activations are recomputed, not kept
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-5, rtol=0), name
