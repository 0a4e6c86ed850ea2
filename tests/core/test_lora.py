"""`policy.lora`: LoRA adapters (peft) on a tiny Llama-architecture model saved to a temporary
directory. DPO and PPO train only the adapter (and the value head) with the base bit-identical;
the reference is the same module with the adapter off and gives exactly a frozen base copy's
log-probs; `policy/` reloads with `AutoPeftModelForCausalLM` (or, merged, `AutoModelForCausalLM`)
with the trained log-probs; `init` from an adapter directory continues it; checkpoints hold
only the trainable weights and round-trip them exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import rlhfzoo
from rlhfzoo.config import load_config
from rlhfzoo.lora import AdapterReference, LoraError, LoraOptions
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.trainer import Trainer

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

ANIMALS = ["cat", "dog", "owl", "fox", "eel", "bee", "yak", "emu"]
PAIRS = [
    {"prompt": f"The {a} is", "chosen": f" kind to the {b}.", "rejected": f" rude to the {b}!"}
    for a in ANIMALS
    for b in ("ant", "bat")
]
QUICK = {"eval_prompts": 0, "progress": False, "lr": 1e-2}
# all-linear on 2 layers of hidden 32, MLP 64, r=4: q/k/v/o 4*(32+32) each, gate/up/down 4*(32+64) each.
ADAPTER_PARAMS = 2 * (4 * 4 * (32 + 32) + 3 * 4 * (32 + 64))  # = 4352


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama with its tokenizer, saved as a pretrained model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfzoo.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([t for r in PAIRS for t in r.values()], vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def lora_policy(base, **lora):
    return HFPolicy(HFPolicyConfig(init=base, max_new_tokens=4, lora={"r": 4, **lora}))


def batch(policy):
    enc = [policy.tokenizer(r["prompt"] + r["chosen"])["input_ids"] for r in PAIRS[:3]] + [policy.tokenizer("The owl")["input_ids"]]
    n = max(map(len, enc))
    ids = torch.tensor([[policy.tokenizer.pad_token_id] * (n - len(e)) + e for e in enc])
    attn = torch.tensor([[0] * (n - len(e)) + [1] * len(e) for e in enc])
    return ids, attn


def logprobs(policy, ids, attn):
    with torch.no_grad():
        return policy.logprobs(ids, attn) * attn[:, 1:]


def transformers_logprobs(model, ids, attn):
    """log-probs from a transformers model's own logits (not the policy's kernel)."""
    with torch.no_grad():
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits.float()
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * attn[:, 1:]


def perturb_adapter(policy, seed=1):
    """Nonzero B matrices (peft starts them at 0, where the adapter changes nothing)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.module.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def assert_base_unchanged(policy, base):
    """Every weight of the base under the adapters is bit-identical to the base directory's."""
    from transformers import AutoModelForCausalLM

    original = dict(AutoModelForCausalLM.from_pretrained(base).named_parameters())
    inner = {n.replace(".base_layer", ""): p for n, p in policy.module.lm.get_base_model().named_parameters() if "lora_" not in n}
    assert inner.keys() == original.keys()
    for name, p in inner.items():
        assert torch.equal(p, original[name]) and not p.requires_grad, name


def trainable(policy):
    return {n: p for n, p in policy.module.named_parameters() if p.requires_grad}


def adapter_moved(policy):
    return any("lora_B" in n and p.abs().sum() > 0 for n, p in trainable(policy).items())


# ------------------------------------------------------------------------------ the reference


def test_the_reference_is_the_base_with_the_adapter_off_and_no_copy(base):
    policy = lora_policy(base)
    assert sum(p.numel() for p in trainable(policy).values()) == ADAPTER_PARAMS
    perturb_adapter(policy)
    reference = policy.frozen_copy()
    assert isinstance(reference, AdapterReference) and reference.module is policy.module  # the same weights
    assert not any(p.requires_grad for p in reference.parameters())
    plain = HFPolicy(HFPolicyConfig(init=base, max_new_tokens=4)).frozen_copy()  # a frozen copy of the base
    ids, attn = batch(policy)
    ref = logprobs(reference, ids, attn)
    assert torch.equal(ref, logprobs(plain, ids, attn))
    assert (logprobs(policy, ids, attn) - ref).abs().max() > 1e-2  # the adapter is on again, and moves the policy
    assert sum(p.numel() for p in trainable(policy).values()) == ADAPTER_PARAMS  # still trainable after the reference ran

    rollout = reference.generate(["The cat is", "The dog is"])
    lp = logprobs(plain, rollout.sequences, rollout.attention_mask) * rollout.response_mask[:, 1:]
    assert torch.allclose(rollout.logprobs, lp, atol=1e-6)  # sampled from and scored as the base
    assert reference.counters["generated_tokens"] > 0 and policy.counters["generated_tokens"] == 0


def test_the_reference_runs_in_eval_mode_and_leaves_the_policy_training(base):
    policy = HFPolicy(HFPolicyConfig(init=base, max_new_tokens=4, dropout=True, lora={"r": 4, "lora_dropout": 0.5}))
    perturb_adapter(policy)
    reference = policy.frozen_copy()
    policy.module.train()
    ids, attn = batch(policy)
    assert torch.equal(logprobs(reference, ids, attn), logprobs(reference, ids, attn))  # no dropout in the reference
    assert policy.module.training and all(m.training for m in policy.module.modules())
    assert not torch.equal(logprobs(policy, ids, attn), logprobs(policy, ids, attn))  # the policy's lora dropout is on


# ------------------------------------------------------------------------------ training


def test_lora_dpo_trains_the_adapter_only_and_saves_a_peft_adapter(base, tmp_path):
    result = rlhfzoo.train(
        {"algorithm": {"name": "dpo"}, "policy": {"init": base, "lora": {"r": 4}, "max_new_tokens": 4},
         "train": {"steps": 3, "batch_size": 4, **QUICK}},
        train_dataset=PAIRS, output_dir=tmp_path / "run",
    )
    policy = result.policy
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # adapter B = 0: policy == reference, h = 0
    assert losses[-1] < losses[0]
    assert sum(p.numel() for p in trainable(policy).values()) == ADAPTER_PARAMS
    assert adapter_moved(policy)
    assert_base_unchanged(policy, base)

    saved = tmp_path / "run" / "policy"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in saved.iterdir()}
    assert not (saved / "model.safetensors").exists()  # no copy of the base
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(saved))
    ids, attn = batch(policy)
    mine = logprobs(policy, ids, attn)
    assert torch.allclose(transformers_logprobs(model, ids, attn), mine, atol=1e-5)
    again = HFPolicy(HFPolicyConfig(init=str(saved), max_new_tokens=4))  # the adapter directory as init
    assert again.is_lora() and torch.equal(logprobs(again, ids, attn), mine)


def test_lora_ppo_trains_the_adapter_and_the_value_head(base, tmp_path):
    result = rlhfzoo.train(
        {"algorithm": {"name": "ppo-clip", "minibatch_size": 4, "epochs": 1},
         "policy": {"init": base, "lora": {"r": 4}, "max_new_tokens": 6}, "train": {"steps": 2, "batch_size": 4, **QUICK}},
        train_dataset=PAIRS, reward=lambda prompts, responses: [float(len(r)) for r in responses], output_dir=tmp_path / "run",
    )
    policy = result.policy
    heads = {n for n in trainable(policy) if "lora_" not in n}
    assert heads == {"value_head.weight", "value_head.bias"}
    assert sum(p.numel() for p in trainable(policy).values()) == ADAPTER_PARAMS + 33
    assert policy.module.value_head.weight.abs().sum() > 0 and adapter_moved(policy)  # both start at 0
    assert_base_unchanged(policy, base)
    saved = tmp_path / "run" / "policy"
    assert (saved / "adapter_config.json").exists() and (saved / "value_head.safetensors").exists()
    again = HFPolicy(HFPolicyConfig(init=str(saved), max_new_tokens=4))
    assert torch.equal(again.module.value_head.weight, policy.module.value_head.weight)


def test_init_from_an_adapter_continues_it_against_itself_as_the_reference(base, tmp_path):
    first = lora_policy(base)
    perturb_adapter(first)
    first.save(str(tmp_path / "start"))
    result = rlhfzoo.train(
        {"algorithm": {"name": "dpo"}, "policy": {"init": str(tmp_path / "start"), "max_new_tokens": 4},
         "train": {"steps": 2, "batch_size": 4, **QUICK}},
        train_dataset=PAIRS, output_dir=tmp_path / "run",
    )
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the start adapter, not the base
    policy = result.policy
    assert sum(p.numel() for p in trainable(policy).values()) == ADAPTER_PARAMS  # the start copy is frozen
    started = {n.replace(".start.", ".default."): p for n, p in policy.module.lm.named_parameters() if ".start." in n}
    for name, p in first.module.lm.named_parameters():
        if "lora_" in name:
            assert torch.equal(started[name], p), name  # the frozen start adapter is the saved one
    assert any(not torch.equal(p, started[n]) for n, p in policy.module.lm.named_parameters() if ".default." in n)
    assert_base_unchanged(policy, base)
    config = json.loads((tmp_path / "run" / "policy" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(Path(base).resolve())
    assert not (tmp_path / "run" / "policy" / "start").exists()  # only the trained adapter is saved


def test_merged_save_loads_in_transformers_with_the_same_logprobs(base, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = lora_policy(base, merge_on_save=True)
    perturb_adapter(policy)
    policy.save(str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids, attn = batch(policy)
    assert torch.allclose(transformers_logprobs(model, ids, attn), logprobs(policy, ids, attn), atol=1e-5)
    assert policy.is_lora() and any(".lora_B." in n for n, _ in policy.module.lm.named_parameters())  # the live one kept its adapter


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoints_hold_the_trainable_weights_and_restore_them_exactly(base, tmp_path):
    policy = HFPolicy(HFPolicyConfig(init=base, max_new_tokens=4, value_head=True, lora={"r": 4}))
    perturb_adapter(policy)
    file = tmp_path / "model.safetensors"
    policy.save_weights(str(file))
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert keys == set(trainable(policy))  # the adapter and the value head, not the frozen base
    saved = {k: v.clone() for k, v in policy.module.state_dict().items()}
    with torch.no_grad():
        for p in trainable(policy).values():
            p.add_(1.0)
    policy.load_weights(str(file))
    for k, v in policy.module.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_a_lora_run_resumes_from_its_checkpoint(base, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    config = {
        "task": {"name": "dataset", "path": str(data)}, "policy": {"name": "hf", "init": base, "lora": {"r": 4}, "max_new_tokens": 4},
        "algorithm": {"name": "dpo"}, "train": {"steps": 2, "batch_size": 4, **QUICK}, "output_dir": str(tmp_path / "run"),
    }
    trainer = Trainer(load_config(data=config), log=lambda *_: None)
    trainer.prepare_output(resume=False, overwrite=True)
    trainer.train_step(0)
    trainer.step = 1
    ckpt = trainer.save_checkpoint()
    state = {k: v.clone() for k, v in trainer.policy.module.state_dict().items()}
    trainer.train_step(1)
    assert any(not torch.equal(v, state[k]) for k, v in trainer.policy.module.state_dict().items())
    trainer.load_checkpoint(ckpt)
    for k, v in trainer.policy.module.state_dict().items():
        assert torch.equal(v, state[k]), k


# ------------------------------------------------------------------------------ errors


def test_lora_options_that_cannot_work_are_one_clear_error(base, tmp_path):
    with pytest.raises(LoraError, match="output layer"):
        lora_policy(base, target_modules=["q_proj", "lm_head"])
    with pytest.raises(LoraError, match=r"target_modules=\['nope'\]"):
        lora_policy(base, target_modules=["nope"])
    with pytest.raises(ValueError, match="merge_on_save"):
        HFPolicyConfig(init="scratch", lora={"r": 4})
    with pytest.raises(ValueError, match="extra"):
        LoraOptions(rank=4)
    lora_policy(base).save(str(tmp_path / "adapter"))
    with pytest.raises(LoraError, match=r"policy.lora.r=8, but the adapter .* has r=4"):
        HFPolicy(HFPolicyConfig(init=str(tmp_path / "adapter"), max_new_tokens=4, lora={"r": 8}))
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match="base model of the adapter"):
        HFPolicyConfig(init=str(tmp_path / "orphan"))


def test_gradient_checkpointing_under_lora_gives_the_same_adapter_gradients(base):
    def gradients(checkpointing: bool):
        torch.manual_seed(0)  # the same A matrices
        policy = HFPolicy(HFPolicyConfig(init=base, max_new_tokens=4, gradient_checkpointing=checkpointing, lora={"r": 4}))
        assert policy.module.lm.get_base_model().model.gradient_checkpointing == checkpointing
        perturb_adapter(policy)
        policy.module.train()
        ids, attn = batch(policy)
        (policy.logprobs(ids, attn) * attn[:, 1:]).sum().backward()
        return {n: p.grad for n, p in trainable(policy).items()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-5, rtol=0), name


def test_a_separate_critic_gets_its_own_adapter_saved_and_loaded(base, tmp_path):
    policy = HFPolicy(HFPolicyConfig(init=base, max_new_tokens=4, value_head=True, critic="separate", lora={"r": 4}))
    perturb_adapter(policy)
    torch.manual_seed(2)
    with torch.no_grad():
        policy.module.value_head.weight.normal_()
        for name, p in policy.module.critic.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert sum(p.numel() for p in trainable(policy).values()) == 2 * ADAPTER_PARAMS + 33
    policy.save(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "critic" / "adapter_config.json").exists()
    again = HFPolicy(HFPolicyConfig(init=str(tmp_path / "saved"), max_new_tokens=4))
    ids, attn = batch(policy)
    with torch.no_grad():
        assert torch.equal(again.values(ids, attn), policy.values(ids, attn))
    assert torch.equal(logprobs(again, ids, attn), logprobs(policy, ids, attn))


def test_the_adapter_off_reference_is_kept_for_evaluation_not_rebuilt(base, tmp_path):
    """DPO caches the reference's log-probs and frees a frozen copy; the adapter-off reference has
    no weights of its own to free, and evaluation must not load a second copy of the base."""
    from rlhfzoo.api import rows_task
    from rlhfzoo.config import resolve
    from rlhfzoo.trainer import Trainer

    data = {"algorithm": {"name": "dpo"}, "policy": {"init": base, "lora": {"r": 4}, "max_new_tokens": 4},
            "train": {"steps": 1, "batch_size": 4, **QUICK}, "output_dir": str(tmp_path / "run")}
    task = rows_task(data, PAIRS, None)
    trainer = Trainer(resolve(data), log=lambda *_: None, task=task)
    assert not trainer.objective.reference_needed_in_training()  # cached log-probs
    assert trainer.reference is not None and trainer.reference_for_eval().module is trainer.policy.module


def test_init_from_an_adapter_on_the_hub_loads_its_snapshot(base, tmp_path, monkeypatch):
    import huggingface_hub

    first = lora_policy(base)
    perturb_adapter(first)
    first.save(str(tmp_path / "snapshot"))  # what the hub repository holds
    asked = []

    def download(repo, filename, **kwargs):  # the hub, offline: one repository holding the adapter
        asked.append((repo, filename))
        if repo != "someone/tiny-adapter":
            raise OSError(f"{repo} not found")
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns=None, **kw: str(tmp_path / "snapshot"))
    policy = HFPolicy(HFPolicyConfig(init="someone/tiny-adapter", max_new_tokens=4))
    assert policy.is_lora() and asked[0] == ("someone/tiny-adapter", "adapter_config.json")
    ids, attn = batch(first)
    assert torch.allclose(logprobs(policy, ids, attn), logprobs(first, ids, attn), atol=1e-6)  # the hub's adapter, on its base
    assert sum(p.numel() for p in trainable(policy).values()) == ADAPTER_PARAMS
