"""The default policy: a Hugging Face `transformers` causal LM (registered as `hf`).

Weights come from the task's SFT stage (`init: sft`, read with `rlhfzoo.stages`; whoever
constructs the policy builds it first), a new model trained from scratch
(`init: scratch`, GPT-2 or Llama style, sized by the task), or a local path / hub id.

The module is `rlhfzoo.hf_model.LMWithHeads`: the causal LM, an optional value head (on it or on
a separate critic) and modules objectives attach; its forward gives per-token log-probs.

Dropout is off by default (`dropout: false`): rollouts run in eval mode and losses in train mode,
so with dropout on, PPO's ratio would not start at 1 nor DPO's margin at 0. `lora` trains peft
adapters instead of the weights (`rlhfzoo.lora`); `dtype`, `attn_implementation` and
`gradient_checkpointing` are passed on to transformers.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_model, save_model

from rlhfzoo import hookimpl, lora, stages
from rlhfzoo.data.collate import pad, prompt_ids
from rlhfzoo.errors import UserError
from rlhfzoo.hf_model import LMWithHeads, build_scratch_model, config_values, disable_dropout, last_hidden_states, model_kwargs
from rlhfzoo.interfaces import Policy, PluginConfig, Rollout
from rlhfzoo.lora import LoraOptions
from rlhfzoo.pretrained import MODEL_FILES, TOKENIZER_FILES, check_source, load_error

INIT_KEYWORDS = ("sft", "scratch")
INIT_FIX = "Give `sft`, `scratch`, a directory written by `save_pretrained` (e.g. runs/sft/policy) or a hub id."
TOKENIZER_FIX = "Give a directory written by a tokenizer's `save_pretrained`, a hub id, or leave it unset (the model's own)."


class HFPolicyConfig(PluginConfig):
    init: str = Field(
        "sft",
        description="Where the weights come from: `sft` (the task's SFT stage: `rlhfzoo stage sft` builds it, and so do "
        "`rlhfzoo train` and `rlhfzoo bench` before they start), "
        "`scratch` (a new model of `arch`), or a local path / hub id of a pretrained causal LM.",
    )
    arch: Literal["gpt2", "llama"] = Field("gpt2", description="Architecture of a model trained from scratch.")
    n_layer: int | None = Field(None, ge=1, description="Layers of a model from scratch (null: the task's default).")
    n_embd: int | None = Field(None, ge=8, description="Hidden size of a model from scratch (null: the task's default).")
    n_head: int | None = Field(None, ge=1, description="Attention heads of a model from scratch (null: the task's default).")
    n_positions: int | None = Field(None, ge=8, description="Context length of a model from scratch (null: the task's default).")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id (null: the model's own, or the task's).")
    value_head: bool = Field(False, description="Add a scalar value head on the last hidden state (actor-critic).")
    critic: Literal["shared", "separate"] = Field(
        "shared",
        description="Where the value head reads its hidden states: `shared` (the policy's own transformer, one model) or "
        "`separate` (its own copy of the initial transformer, a separate critic model as in InstructGPT: twice the "
        "weights, no interference between the value and policy gradients). Saved under `critic/` in the policy directory.",
    )
    max_length: int = Field(
        128, ge=4,
        description="Longest prompt + response in tokens; longer ones are truncated and counted. At most `n_positions` "
        "(a model from scratch cannot read further): left unset, it is lowered to `n_positions` when that is smaller.",
    )
    max_new_tokens: int = Field(32, ge=1, description="Most tokens generated per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0: all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    seed: int = Field(0, description="Seed for the initialisation of a model from scratch.")
    lora: LoraOptions | None = Field(
        None,
        description="Train LoRA adapters (peft) instead of the weights, e.g. {r: 8, lora_alpha: 16}: the reference is the "
        "same model with the adapter off, and `policy/` a peft adapter directory. null: full fine-tuning (unless `init` is "
        "an adapter directory, whose adapter then trains on).",
    )
    dropout: bool = Field(
        False,
        description="Keep the model's dropout in training. false: every dropout probability is set to 0 (as TRL does), so "
        "sampling (eval mode) and the losses (train mode) see one distribution; the saved config keeps its values.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (transformers' gradient_checkpointing_enable): less memory, more compute."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype the weights are loaded in (transformers' `dtype`): `auto` is the checkpoint's own (float32 for a model from scratch).",
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel (transformers' attn_implementation): eager, sdpa, flash_attention_2, ... null: transformers' choice."
    )

    @field_validator("init")
    @classmethod
    def _init_names_weights(cls, value: str) -> str:
        if value in INIT_KEYWORDS:
            return value
        if lora.is_adapter_dir(value):  # a LoRA adapter: its base must be there
            fix = "Set `base_model_name_or_path` in its adapter_config.json to the base model's directory or hub id."
            check_source(lora.adapter_base(value), "model", MODEL_FILES, f"(the base model of the adapter {value!r}) {fix}")
            return value
        close = difflib.get_close_matches(value, INIT_KEYWORDS, n=1, cutoff=0.6)
        if close and "/" not in value and not Path(value).exists():
            raise ValueError(f"{value!r} is neither a directory nor one of {', '.join(INIT_KEYWORDS)}. Did you mean {close[0]!r}?")
        return check_source(value, "model", MODEL_FILES, INIT_FIX)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value, "tokenizer", TOKENIZER_FILES, TOKENIZER_FIX)

    @field_validator("attn_implementation")
    @classmethod
    def _attention_exists(cls, value: str | None) -> str | None:
        if value is None or "/" in value:  # a kernel from the hub, org/name
            return value
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
        if value not in known and value.removeprefix("paged|") not in known:
            close = difflib.get_close_matches(value, known, n=1)
            raise ValueError(f"unknown attention {value!r}{f'; did you mean {close[0]!r}?' if close else ''} Known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _adapter_has_a_base(self):
        if self.lora is not None and self.init == "scratch" and not self.lora.merge_on_save:
            raise ValueError(
                "lora on init: scratch would save an adapter over random weights that nothing can load again; set "
                "lora.merge_on_save: true, or start from a pretrained model"
            )
        return self

    @model_validator(mode="after")
    def _fits_the_context(self):
        """Sequences must fit the position embeddings of a model from scratch, and generation
        needs room for a prompt: max_new_tokens < max_length <= n_positions."""
        if self.init == "scratch" and self.n_positions is not None and self.max_length > self.n_positions:
            if "max_length" in self.model_fields_set:
                raise ValueError(
                    f"max_length={self.max_length} is longer than n_positions={self.n_positions}, the context of the "
                    "model from scratch; lower max_length or raise n_positions"
                )
            object.__setattr__(self, "max_length", self.n_positions)  # the default follows the context
        if self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt within max_length={self.max_length}"
                + (f" (lowered to n_positions={self.n_positions})" if "max_length" not in self.model_fields_set else "")
                + "; lower max_new_tokens or raise max_length"
            )
        return self


def build_rollout(policy: Policy, prompts: Sequence[str], ids: torch.Tensor, attn: torch.Tensor, gen: torch.Tensor) -> Rollout:
    """A Rollout from left-padded prompt ids/mask and the generated tokens: the response runs up
    to and including the first EOS; its log-probs are recomputed with the policy's training
    forward (so the PPO ratio is exactly 1 on the first minibatch) when first read, which must
    come before the policy's next update."""
    tok = policy.tokenizer
    gen = gen.cpu()
    is_eos = gen == tok.eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    resp_mask = (~after_eos).long()
    finished = is_eos.any(-1)
    policy.counters["generated_tokens"] += int(resp_mask.sum())
    gen = gen.masked_fill(after_eos, tok.pad_token_id)
    sequences = torch.cat([ids, gen], dim=1)
    attention_mask = torch.cat([attn, resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(attn), resp_mask], dim=1)
    kept = (resp_mask.sum(-1) - finished.long()).tolist()  # the tokens before the first EOS, decoded as plain lists
    responses = [tok.decode(row[:k], skip_special_tokens=True).strip() for row, k in zip(gen.tolist(), kept)]
    module, training = policy.module, policy.module.training  # computed in the mode of now, when read later

    def logprobs() -> torch.Tensor:
        device, was = next(module.parameters()).device, module.training
        module.train(training)
        try:
            with torch.no_grad():
                return policy.logprobs(sequences.to(device), attention_mask.to(device)).float().cpu() * response_mask[:, 1:]
        finally:
            module.train(was)

    return Rollout(sequences, attention_mask, response_mask, logprobs, list(prompts), responses, finished)


@torch.no_grad()
def sample_rollout(policy: Policy, prompts: Sequence[str], cfg: HFPolicyConfig) -> Rollout:
    """Sample one response per prompt from `policy.module.lm` (in eval mode) with the sampling
    options of `cfg`, prompts cut from the left to fit `max_length`."""
    tok = policy.tokenizer
    lm = policy.module.lm
    encoded: list[list[int]] = []  # a group's copies of one prompt (consecutive) are tokenised once
    for i, p in enumerate(prompts):
        encoded.append(encoded[-1] if i and p == prompts[i - 1] else prompt_ids(tok, p)[-(cfg.max_length - cfg.max_new_tokens):])
    ids = pad(encoded, tok.pad_token_id, side="left")
    attn = pad([[1] * len(e) for e in encoded], 0, side="left")
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    out = lm.generate(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        do_sample=True,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
    )
    lm.train(was_training)
    return build_rollout(policy, prompts, ids, attn, out[:, ids.shape[1] :])


def fit_to_context(config: HFPolicyConfig, model_config: Any) -> HFPolicyConfig:
    """`config` with `max_length` lowered to the model's context (its position embeddings; from
    its transformers config), where it is longer: sequences are then truncated to what the model
    can read instead of indexing past the embeddings. A model whose context leaves no room for a
    prompt before `max_new_tokens` is an error."""
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not context or config.max_length <= context:
        return config
    if config.max_new_tokens >= context:
        raise UserError(
            f"policy.max_new_tokens={config.max_new_tokens} leaves no room for a prompt within the model's context of "
            f"{context} tokens; lower max_new_tokens"
        )
    return config.model_copy(update={"max_length": context})


class HFPolicy(Policy):
    name = "hf"
    aliases = ("transformers",)
    summary = "A Hugging Face transformers causal LM (local path, hub id, or trained from scratch)."
    paper = ""
    Config = HFPolicyConfig

    @classmethod
    def required_stages(cls, config: HFPolicyConfig) -> list[str]:
        """`init: sft` reads the task's SFT stage."""
        return ["sft"] if config.init == "sft" else []

    def __init__(self, config: HFPolicyConfig | None = None, task: Any = None, model: torch.nn.Module | None = None, tokenizer: Any = None):
        self.config = config or HFPolicyConfig()
        self.task = task
        self.dropout_config: dict[str, float] = {}  # the model config's dropout before it was disabled, for `save`
        if model is None:
            model, tokenizer = self._build(task)
        elif not isinstance(model, LMWithHeads):  # a transformers model passed in (`rlhfzoo.train(model=...)`)
            model = self.prepare(model, getattr(model, "name_or_path", None) or None)
        self.tokenizer = tokenizer
        self.model = model if isinstance(model, LMWithHeads) else LMWithHeads(model, self.config.value_head)
        self.config = fit_to_context(self.config, lora.causal_lm(self.module.lm).config)
        if self.config.value_head and self.config.critic == "separate" and self.module.critic is None:
            self.module.critic = copy.deepcopy(self.module.lm)  # the critic starts from the policy's weights
        # Work done, for budgets in comparable units (benchmarks): tokens through training
        # forwards and tokens generated.
        self.counters = {"train_tokens": 0, "generated_tokens": 0}
        if self.config.value_head and self.module.value_head is None:
            self.module.value_head = LMWithHeads(self.module.lm, True).value_head

    # ------------------------------------------------------------------------------ building
    def _build(self, task: Any) -> tuple[torch.nn.Module, Any]:
        init = self.config.init
        if init == "scratch":
            if task is None:
                raise ValueError("policy.init=scratch needs a task (for the tokenizer and model size)")
            tok, _ = self.load_tokenizer(self.config, task)
            return self.prepare(build_scratch_model(self.config, tok, task.default_model_config()), None), tok
        if init == "sft":
            if task is None:
                raise ValueError("policy.init=sft needs a task")
            path = str(stages.path("sft", task))
        else:
            path = init
        try:
            model = self.load_lm(path)
            value_file = Path(path) / "value_head.safetensors"
            critic_dir = Path(path) / "critic"
            critic = self.load_lm(str(critic_dir)) if critic_dir.is_dir() else None
            policy_model = LMWithHeads(model, self.config.value_head or value_file.exists(), critic=critic)
            if value_file.exists():
                from safetensors.torch import load_file

                policy_model.value_head.load_state_dict(load_file(str(value_file)))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... for bad files
            raise load_error("policy.init", path, "causal LM", e, INIT_FIX) from None
        return policy_model, self.load_tokenizer(self.config, task)[0]

    def load_lm(self, path: str) -> torch.nn.Module:
        """The causal LM of a directory or hub id (of an adapter directory: its base, the adapter on), `prepare`d."""
        from transformers import AutoModelForCausalLM

        adapter = path if lora.is_adapter_dir(path) else lora.hub_adapter(path)
        base = lora.adapter_base(adapter) if adapter else path
        return self.prepare(AutoModelForCausalLM.from_pretrained(base, **model_kwargs(self.config)), base, adapter)

    def prepare(self, model: torch.nn.Module, base: str | None, adapter: str | None = None) -> torch.nn.Module:
        """A transformers model with the options applied: dropout off, gradient checkpointing, and
        LoRA (a new adapter on `base`, or the one in the directory `adapter`)."""
        if not self.config.dropout:
            self.dropout_config = disable_dropout(model)
        if self.config.gradient_checkpointing:  # transformers >= 5 renamed it activation checkpointing
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if adapter is not None:
            return lora.load_adapter(model, adapter, self.config.lora)
        if self.config.lora is not None:
            return lora.add_adapter(model, self.config.lora, None if base is None else lora.base_reference(base))
        return model

    def is_lora(self) -> bool:
        """Whether the policy trains LoRA adapters (`policy.lora`, or `init` an adapter directory)."""
        return lora.is_peft(self.module.lm)

    @classmethod
    def load_tokenizer(cls, config: HFPolicyConfig, task: Any) -> tuple[Any, str]:
        """The tokenizer a policy of `config` uses, without loading any weights, and where it comes
        from: `policy.tokenizer`, else the model's own (the `init` directory or hub id, or the SFT
        stage), else, for a model trained from scratch, the task's."""
        from transformers import AutoTokenizer

        model_path = None if config.init == "scratch" else str(stages.path("sft", task)) if config.init == "sft" else config.init
        model_path = model_path and (lora.hub_adapter(model_path) or model_path)  # an adapter on the hub: its snapshot
        if model_path and lora.is_adapter_dir(model_path) and not any((Path(model_path) / f).is_file() for f in TOKENIZER_FILES):
            model_path = lora.adapter_base(model_path)  # an adapter saved without its tokenizer: the base's
        source = config.tokenizer or model_path
        if source is None:
            tok, where = task.tokenizer(), f"task {task.name!r}"
        else:
            try:
                tok, where = AutoTokenizer.from_pretrained(source), source
            except Exception as e:  # noqa: BLE001 - missing files, corrupt JSON, no network, ...
                field = "policy.tokenizer" if config.tokenizer else "policy.init"
                raise load_error(field, source, "tokenizer", e, TOKENIZER_FIX) from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok, where

    # ------------------------------------------------------------------------------ log-probs
    def forward(self, input_ids, attention_mask, **kwargs) -> dict[str, torch.Tensor]:
        if torch.is_grad_enabled():
            self.counters["train_tokens"] += int(attention_mask.sum())
        return self.model(input_ids, attention_mask, temperature=self.config.temperature, **kwargs)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward(input_ids, attention_mask)["logprobs"]

    # ------------------------------------------------------------------------------ the value head
    @classmethod
    def with_value_head(cls, config: HFPolicyConfig) -> HFPolicyConfig:
        return config.model_copy(update={"value_head": True})

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.module.value_head is None:
            raise NotImplementedError(
                f"policy {self.name!r} has no value head; set `policy.value_head: true` (or load a directory saved with one)"
            )
        return self.forward(input_ids, attention_mask, return_values=True, return_logprobs=False)["values"]

    # ------------------------------------------------------------------------------ the transformer
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return last_hidden_states(self.transformer(), input_ids, attention_mask)

    def output_layer(self) -> torch.nn.Module:
        return self.module.lm.get_output_embeddings()

    def transformer(self) -> torch.nn.Module:
        return lora.causal_lm(self.module.lm).base_model

    # ------------------------------------------------------------------------------ attached modules
    def attach(self, name: str, module: torch.nn.Module, save: Callable[[torch.nn.Module, str], None] | None = None) -> torch.nn.Module:
        device = next(self.module.parameters()).device
        return self.module.attach(name, module.to(device), save)

    def attached(self, name: str) -> torch.nn.Module | None:
        return self.module.attached(name)

    # ------------------------------------------------------------------------------ sampling
    def generate(self, prompts: Sequence[str], **sampling: Any) -> Rollout:
        return sample_rollout(self, prompts, self.config.model_copy(update=sampling) if sampling else self.config)

    # ------------------------------------------------------------------------------ copies & files
    def frozen_copy(self) -> Policy:
        """A copy with gradients off; of a LoRA policy, a view of the same weights run as the
        reference (`rlhfzoo.lora.AdapterReference`: the adapter training started from, or none)."""
        if self.is_lora():
            return lora.AdapterReference(self)
        critic, self.module.critic = self.module.critic, None  # a frozen copy (the reference) needs no critic
        try:
            module = copy.deepcopy(self.module)
        finally:
            self.module.critic = critic
        module.requires_grad_(False)
        module.eval()
        config = self.config.model_copy(update={"critic": "shared"})
        frozen = HFPolicy(config, task=self.task, model=module, tokenizer=self.tokenizer)
        frozen.dropout_config = self.dropout_config
        return frozen

    def save(self, path: str) -> None:
        """A directory that `transformers.AutoModelForCausalLM.from_pretrained` loads (of a LoRA
        policy: `peft.AutoPeftModelForCausalLM`, or AutoModelForCausalLM with `lora.merge_on_save`),
        with the value head, the separate critic and the attached modules (each written by its
        `save`) beside it. The model config keeps the dropout it was loaded with."""
        os.makedirs(path, exist_ok=True)
        with ExitStack() as stack:
            for lm in (m for m in (self.module.lm, self.module.critic) if m is not None):
                stack.enter_context(config_values(lora.causal_lm(lm).config, self.dropout_config))
            self.save_lm(self.module.lm, path)
            if self.module.critic is not None:
                self.save_lm(self.module.critic, os.path.join(path, "critic"))
        self.tokenizer.save_pretrained(path)
        if self.module.value_head is not None:
            from safetensors.torch import save_file

            save_file(self.module.value_head.state_dict(), os.path.join(path, "value_head.safetensors"))
        for name, save in self.module.attachments.items():
            if save is not None:
                save(self.module.attached(name), path)
        with open(os.path.join(path, "rlhfzoo_policy.json"), "w") as f:
            json.dump({"policy": self.name, "config": self.config.model_dump(mode="json")}, f, indent=1)

    def save_lm(self, lm: torch.nn.Module, path: str) -> None:
        if lora.is_peft(lm):
            lora.save_lm(lm, path, merge=(self.config.lora or LoraOptions()).merge_on_save)
        else:
            lm.save_pretrained(path, safe_serialization=True)

    def save_weights(self, file: str) -> None:
        """All weights; of a LoRA policy, all but the frozen base (which `init` gives again)."""
        (lora.save_trainable if self.is_lora() else save_model)(self.module, file)

    def load_weights(self, path: str) -> None:
        file = path if str(path).endswith(".safetensors") else os.path.join(path, "model.safetensors")
        (lora.load_trainable if self.is_lora() else load_model)(self.module, file)


@hookimpl
def register_policies(register):
    register(HFPolicy)
