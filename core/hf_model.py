"""The transformers model under the `hf` policy: `LMWithHeads` (a causal LM with an optional value
head, a separate critic and attached modules, whose forward gives per-token log-probs), a model
built from scratch, and the options applied when one is loaded (`dtype`, `attn_implementation`,
dropout off).

Every log-prob goes through `rlhfzoo.kernels.linear_logprobs`, from the last hidden states and
the LM-head weight, so the [B, T, V] logits never exist at once; `LMWithHeads.forward` does this
inside the module's forward, so the same code runs under DDP/FSDP wrappers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from rlhfzoo import kernels, lora


def last_hidden_states(transformer: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of a transformer (a causal LM's `base_model`). Positions count
    real tokens only, so left padding does not shift them."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state


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
        hidden = last_hidden_states(lora.causal_lm(self.lm).base_model, input_ids, attention_mask) if return_logprobs or self.critic is None else None
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
                hidden = last_hidden_states(lora.causal_lm(self.critic).base_model, input_ids, attention_mask)
            out["values"] = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return out


def build_scratch_model(config: Any, tokenizer: Any, defaults: dict[str, Any]) -> torch.nn.Module:
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
    return AutoModelForCausalLM.from_config(mcfg, **model_kwargs(config, scratch=True))


def model_kwargs(config: Any, scratch: bool = False) -> dict[str, Any]:
    """`dtype` and `attn_implementation` as `from_pretrained` (or, `scratch`, `from_config`) takes them."""
    import transformers
    from packaging.version import Version

    kwargs: dict[str, Any] = {}
    if config.dtype != "auto" or not scratch:  # a new model's `auto` is float32, from_config's default
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs[key] = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    return kwargs


def disable_dropout(model: torch.nn.Module) -> dict[str, float]:
    """Set every dropout probability of a transformers model to 0: `torch.nn.Dropout` modules, the
    float `*dropout*` attributes attention modules keep (Llama's `attention_dropout`) and the config's
    `*dropout*` / `*pdrop` fields (some models read them in forward). Returns the config's old values."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)
    old = {k: v for k, v in model.config.to_dict().items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)}
    for key in old:
        setattr(model.config, key, 0.0)
    return old


@contextmanager
def config_values(config: Any, values: dict[str, Any]) -> Iterator[None]:
    """A transformers config with `values` set inside (to save the dropout it was loaded with)."""
    before = {k: getattr(config, k) for k in values}
    for k, v in values.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(config, k, v)
