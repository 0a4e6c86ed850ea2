"""The default policy: a Hugging Face `transformers` causal LM (registered as `hf`).

Weights come from the task's SFT stage (`init: sft`, read with `rlhfzoo.stages`; whoever
constructs the policy builds it first), a new model trained from scratch
(`init: scratch`, GPT-2 or Llama style, sized by the task), or a local path / hub id.

Every log-prob goes through `rlhfzoo.kernels.linear_logprobs`, from the last hidden states and
the LM-head weight, so the [B, T, V] logits never exist at once. `LMWithHeads.forward` does this
inside the module's forward, so the same code runs under DDP/FSDP wrappers.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_model, save_model

from rlhfzoo import hookimpl, kernels, stages
from rlhfzoo.data.collate import pad, prompt_ids
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Policy, PluginConfig, Rollout
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

    @field_validator("init")
    @classmethod
    def _init_names_weights(cls, value: str) -> str:
        if value in INIT_KEYWORDS:
            return value
        close = difflib.get_close_matches(value, INIT_KEYWORDS, n=1, cutoff=0.6)
        if close and "/" not in value and not Path(value).exists():
            raise ValueError(f"{value!r} is neither a directory nor one of {', '.join(INIT_KEYWORDS)}. Did you mean {close[0]!r}?")
        return check_source(value, "model", MODEL_FILES, INIT_FIX)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value, "tokenizer", TOKENIZER_FILES, TOKENIZER_FIX)

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


def last_hidden_states(transformer: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of a transformer (a causal LM's `base_model`). Positions count
    real tokens only, so left padding does not shift them."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


class LMWithHeads(torch.nn.Module):
    """A causal LM plus an optional value head; forward returns per-token log-probs (and values).

    The value head reads the hidden states of `critic` when there is one (a separate critic
    model, a causal LM whose vocabulary projection is unused), else those of `lm` itself.

    Modules an objective attaches (`attach`, e.g. ILQL's heads) are children under their own
    names, so they are trained, in the state dict and deep-copied with the rest; `attachments`
    maps each name to the function that writes it into a policy directory (or None).
    """

    def __init__(self, lm: torch.nn.Module, value_head: bool = False, critic: torch.nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.critic = critic
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.value_head = torch.nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        self.attachments: dict[str, Callable[[torch.nn.Module, str], None] | None] = {}

    def attach(self, name: str, module: torch.nn.Module, save: Callable[[torch.nn.Module, str], None] | None = None) -> torch.nn.Module:
        """Add `module` as the child `name`; `save(module, dir)` writes it into a policy directory."""
        if hasattr(self, name):
            what = "already attached" if name in self.attachments else "a name of the policy's own module"
            raise ValueError(f"cannot attach a module as {name!r}: {what}; choose another name")
        self.add_module(name, module)
        self.attachments[name] = save
        return module

    def attached(self, name: str) -> torch.nn.Module | None:
        """The module attached as `name`, or None."""
        return getattr(self, name) if name in self.attachments else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_values: bool = False,
        return_logprobs: bool = True,
    ) -> dict[str, torch.Tensor]:
        """`logprobs` [B, T-1] (with `entropy` [B, T-1] if asked) unless `return_logprobs=False`, and
        `values` [B, T] with `return_values=True`."""
        if return_entropy and not return_logprobs:
            raise ValueError("return_entropy=True needs return_logprobs=True")
        out: dict[str, torch.Tensor] = {}
        # The LM's hidden states, unless only the values are asked for and a separate critic gives them.
        hidden = last_hidden_states(self.lm.base_model, input_ids, attention_mask) if return_logprobs or self.critic is None else None
        if return_logprobs:
            head = self.lm.get_output_embeddings()
            targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
            result = kernels.linear_logprobs(
                hidden[:, :-1], head.weight, targets, bias=head.bias, temperature=temperature, return_entropy=return_entropy
            )
            if return_entropy:
                out["logprobs"], out["entropy"] = result
            else:
                out["logprobs"] = result
        if return_values:
            if self.value_head is None:
                raise RuntimeError("this policy has no value head; set `policy.value_head: true`")
            if self.critic is not None:
                hidden = last_hidden_states(self.critic.base_model, input_ids, attention_mask)
            out["values"] = self.value_head(hidden).squeeze(-1).float()
        return out


def build_scratch_model(config: HFPolicyConfig, tokenizer: Any, defaults: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    size = {k: getattr(config, k) if getattr(config, k) is not None else defaults.get(k) for k in ("n_layer", "n_embd", "n_head", "n_positions")}
    size = {k: v if v is not None else d for (k, v), d in zip(size.items(), (2, 128, 4, 128))}
    arch = config.arch
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        mcfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=size["n_embd"], intermediate_size=4 * size["n_embd"],
            num_hidden_layers=size["n_layer"], num_attention_heads=size["n_head"],
            max_position_embeddings=size["n_positions"], tie_word_embeddings=True, **ids,
        )
    else:
        mcfg = GPT2Config(
            vocab_size=len(tokenizer), n_positions=size["n_positions"], n_embd=size["n_embd"], n_layer=size["n_layer"],
            n_head=size["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(mcfg)


def build_rollout(policy: Policy, prompts: Sequence[str], ids: torch.Tensor, attn: torch.Tensor, gen: torch.Tensor) -> Rollout:
    """A Rollout from left-padded prompt ids/mask and the generated tokens: the response runs up
    to and including the first EOS; its log-probs are recomputed with the policy's training
    forward, so the PPO ratio is exactly 1 on the first minibatch."""
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
    responses = [
        tok.decode(row[m.bool() & (row != tok.eos_token_id)].tolist(), skip_special_tokens=True).strip()
        for row, m in zip(gen, resp_mask)
    ]
    device = next(policy.module.parameters()).device
    lp = policy.logprobs(sequences.to(device), attention_mask.to(device)).float().cpu() * response_mask[:, 1:]
    return Rollout(sequences, attention_mask, response_mask, lp, list(prompts), responses, finished)


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
        if model is None:
            model, tokenizer = self._build(task)
        self.tokenizer = tokenizer
        self.model = model if isinstance(model, LMWithHeads) else LMWithHeads(model, self.config.value_head)
        self.config = fit_to_context(self.config, self.module.lm.config)
        if self.config.value_head and self.config.critic == "separate" and self.module.critic is None:
            self.module.critic = copy.deepcopy(self.module.lm)  # the critic starts from the policy's weights
        # Work done, for budgets in comparable units (benchmarks): tokens through training
        # forwards and tokens generated.
        self.counters = {"train_tokens": 0, "generated_tokens": 0}
        if self.config.value_head and self.module.value_head is None:
            self.module.value_head = LMWithHeads(self.module.lm, True).value_head

    # ------------------------------------------------------------------------------ building
    def _build(self, task: Any) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoModelForCausalLM

        init = self.config.init
        if init == "scratch":
            if task is None:
                raise ValueError("policy.init=scratch needs a task (for the tokenizer and model size)")
            tok, _ = self.load_tokenizer(self.config, task)
            return build_scratch_model(self.config, tok, task.default_model_config()), tok
        if init == "sft":
            if task is None:
                raise ValueError("policy.init=sft needs a task")
            path = str(stages.path("sft", task))
        else:
            path = init
        try:
            model = AutoModelForCausalLM.from_pretrained(path)
            value_file = Path(path) / "value_head.safetensors"
            critic_dir = Path(path) / "critic"
            critic = AutoModelForCausalLM.from_pretrained(str(critic_dir)) if critic_dir.is_dir() else None
            policy_model = LMWithHeads(model, self.config.value_head or value_file.exists(), critic=critic)
            if value_file.exists():
                from safetensors.torch import load_file

                policy_model.value_head.load_state_dict(load_file(str(value_file)))
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... for bad files
            raise load_error("policy.init", path, "causal LM", e, INIT_FIX) from None
        return policy_model, self.load_tokenizer(self.config, task)[0]

    @classmethod
    def load_tokenizer(cls, config: HFPolicyConfig, task: Any) -> tuple[Any, str]:
        """The tokenizer a policy of `config` uses, without loading any weights, and where it comes
        from: `policy.tokenizer`, else the model's own (the `init` directory or hub id, or the SFT
        stage), else, for a model trained from scratch, the task's."""
        from transformers import AutoTokenizer

        model_path = None if config.init == "scratch" else str(stages.path("sft", task)) if config.init == "sft" else config.init
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
        return self.module.lm.base_model

    # ------------------------------------------------------------------------------ attached modules
    def attach(self, name: str, module: torch.nn.Module, save: Callable[[torch.nn.Module, str], None] | None = None) -> torch.nn.Module:
        device = next(self.module.parameters()).device
        return self.module.attach(name, module.to(device), save)

    def attached(self, name: str) -> torch.nn.Module | None:
        return self.module.attached(name)

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], **sampling: Any) -> Rollout:
        cfg = self.config.model_copy(update=sampling) if sampling else self.config
        tok = self.tokenizer
        lm = self.module.lm
        encoded = [prompt_ids(tok, p)[-(cfg.max_length - cfg.max_new_tokens):] for p in prompts]
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
        )
        lm.train(was_training)
        return build_rollout(self, prompts, ids, attn, out[:, ids.shape[1] :])

    # ------------------------------------------------------------------------------ copies & files
    def frozen_copy(self) -> "HFPolicy":
        critic, self.module.critic = self.module.critic, None  # a frozen copy (the reference) needs no critic
        try:
            module = copy.deepcopy(self.module)
        finally:
            self.module.critic = critic
        module.requires_grad_(False)
        module.eval()
        config = self.config.model_copy(update={"critic": "shared"})
        return HFPolicy(config, task=self.task, model=module, tokenizer=self.tokenizer)

    def save(self, path: str) -> None:
        """A directory that `transformers.AutoModelForCausalLM.from_pretrained` loads, with the value
        head, the separate critic and the attached modules (each written by its `save`) beside it."""
        os.makedirs(path, exist_ok=True)
        self.module.lm.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.module.value_head is not None:
            from safetensors.torch import save_file

            save_file(self.module.value_head.state_dict(), os.path.join(path, "value_head.safetensors"))
        if self.module.critic is not None:
            self.module.critic.save_pretrained(os.path.join(path, "critic"), safe_serialization=True)
        for name, save in self.module.attachments.items():
            if save is not None:
                save(self.module.attached(name), path)
        with open(os.path.join(path, "rlhfzoo_policy.json"), "w") as f:
            json.dump({"policy": self.name, "config": self.config.model_dump(mode="json")}, f, indent=1)

    def save_weights(self, file: str) -> None:
        save_model(self.module, file)

    def load_weights(self, path: str) -> None:
        file = path if str(path).endswith(".safetensors") else os.path.join(path, "model.safetensors")
        load_model(self.module, file)


@hookimpl
def register_policies(register):
    register(HFPolicy)
