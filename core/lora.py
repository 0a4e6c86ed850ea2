"""LoRA adapters (`peft`) on the `hf` policy: `policy: {lora: {r: 8, lora_alpha: 16}}`.

The transformers model is wrapped with `peft.get_peft_model`: its weights are frozen and only the
adapter (plus the value head and attached modules, which stay as they are) trains. The reference
that DPO/IPO/KTO/PPO-style objectives take from `policy.frozen_copy()` is no second copy of the
weights but `AdapterReference`, a view of the same module run with the adapter off (`with
disable_adapter()`) -- or, when `init` is an adapter directory (or a hub repository holding one,
`hub_adapter`), with a frozen copy of that start adapter, so the reference is the policy training
started from either way.

Files: `policy/` is a peft adapter directory (`peft.AutoPeftModelForCausalLM.from_pretrained`
loads it, from the base named in its `adapter_config.json`), or with `merge_on_save: true` the
merged full weights (`AutoModelForCausalLM`). Checkpoints hold the trainable weights only
(`save_trainable` / `load_trainable`): the frozen base comes from `init` again.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Policy, PluginConfig, Rollout

ADAPTER_CONFIG = "adapter_config.json"
DEFAULT = "default"  # peft's name of the adapter that trains
START = "start"  # a frozen copy of the adapter `init` named: the reference


class LoraOptions(PluginConfig):
    """`policy.lora`: peft's LoraConfig options, and how the trained policy is saved."""

    r: int = Field(8, ge=1, description="Rank of the low-rank update B @ A of each adapted weight.")
    lora_alpha: float = Field(16.0, gt=0, description="Scale of the update: it is multiplied by lora_alpha / r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input in training (peft's lora_dropout).")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules given an adapter, as peft takes them: `all-linear` (every linear layer but the output layer), "
        "a list of module names (e.g. [q_proj, v_proj]) or a regex matched against full names.",
    )
    merge_on_save: bool = Field(
        False,
        description="Write `policy/` as merged full weights (loadable by AutoModelForCausalLM, no peft needed) instead of "
        "a peft adapter directory (AutoPeftModelForCausalLM, with the base model named in adapter_config.json).",
    )


class LoraError(UserError):
    """LoRA asked for without peft, or with options that cannot work; the message names the fix."""


def peft_module() -> Any:
    try:
        import peft
    except ImportError:
        raise LoraError("policy.lora needs the `peft` package: pip install 'rlhfzoo[lora]' (or pip install peft)") from None
    return peft


# ------------------------------------------------------------------------------ adapter directories


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


ADAPTER_FILES = ["adapter_config.json", "adapter_model.*", "tokenizer*", "special_tokens_map.json", "*.jinja", "vocab*", "merges.txt"]


def hub_adapter(value: str) -> str | None:
    """`init: org/name` naming a peft adapter on the Hugging Face hub: the local snapshot of its
    adapter files (and tokenizer, if it has one), fetched or found in the hub cache, to be loaded
    as an adapter directory. None for a local path, a value that is no hub id, or a repository
    without `adapter_config.json` (a full model, which transformers loads); None also where the
    hub cannot be reached, so that loading the model reports it with its own message."""
    from rlhfzoo.pretrained import is_hub_id

    if Path(value).expanduser().exists() or not is_hub_id(value):
        return None
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(value, ADAPTER_CONFIG)
    except Exception:  # noqa: BLE001 - no such file (a full model), no such repository, or no network
        return None
    return snapshot_download(value, allow_patterns=ADAPTER_FILES)


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (`base_model_name_or_path`)."""
    file = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(file)!r} does not read as JSON ({e})") from None
    if not base:
        raise ValueError(f"{str(file)!r} names no base model (`base_model_name_or_path`); set it to the base's directory or hub id")
    return str(base)


def base_reference(path: str) -> str:
    """How an adapter names its base: an absolute directory (a run can be started from anywhere), or the hub id."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def is_peft(lm: torch.nn.Module) -> bool:
    return hasattr(lm, "peft_config") and hasattr(lm, "disable_adapter")


def causal_lm(lm: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under a peft wrapper (adapters inside), or `lm` itself."""
    return lm.get_base_model() if is_peft(lm) else lm


def add_adapter(model: torch.nn.Module, options: LoraOptions, base: str | None) -> torch.nn.Module:
    """`model` wrapped by `peft.get_peft_model` with a new adapter of `options` (B = 0: the
    output is the base's); only the adapter is trainable."""
    peft = peft_module()
    config = peft.LoraConfig(
        r=options.r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
        target_modules=options.target_modules, task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft():
            lm = peft.get_peft_model(model, config)
    except ValueError as e:  # no module matched target_modules, an unsupported layer, ...
        raise LoraError(f"policy.lora.target_modules={options.target_modules!r}: {e}") from None
    return checked(lm, base)


def load_adapter(model: torch.nn.Module, path: str, options: LoraOptions | None) -> torch.nn.Module:
    """`model` (the base) with the adapter of directory `path` loaded to train on, and a frozen
    copy of it (`START`) that the reference runs with. `options` set explicitly must match it."""
    peft = peft_module()
    saved = peft.PeftConfig.from_pretrained(path)
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules") if options is not None else ():
        mine, theirs = getattr(options, key), getattr(saved, key, None)
        if key == "target_modules" and isinstance(mine, list) and theirs is not None:
            mine, theirs = sorted(mine), sorted(theirs) if not isinstance(theirs, str) else theirs
        if key in options.model_fields_set and mine != theirs:
            raise LoraError(
                f"policy.lora.{key}={getattr(options, key)!r}, but the adapter in policy.init={path!r} has {key}={theirs!r}; "
                f"leave policy.lora.{key} unset to continue training that adapter"
            )
    base = saved.base_model_name_or_path
    with quiet_peft():
        lm = peft.PeftModel.from_pretrained(model, path, is_trainable=True)
        lm.load_adapter(path, adapter_name=START, is_trainable=False)
    lm.set_adapter(DEFAULT)
    for name, p in lm.named_parameters():
        p.requires_grad_(f".{DEFAULT}." in name)
    return checked(lm, base)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Without the warnings peft gives about what it handles itself: the deprecation it triggers in
    transformers >= 5 (`is_gradient_checkpointing`), GPT-2's Conv1D layers (`fan_in_fan_out`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out is set to False.*", category=UserWarning)
        yield


def checked(lm: torch.nn.Module, base: str | None) -> torch.nn.Module:
    head = lm.get_output_embeddings()
    if hasattr(head, "base_layer"):
        raise LoraError(
            "policy.lora.target_modules gives the output layer an adapter, which the log-probs would ignore (they read its "
            "weight directly); leave it out (`all-linear` does)"
        )
    lm.peft_config[DEFAULT].base_model_name_or_path = base
    return lm


@contextmanager
def as_reference(lm: torch.nn.Module) -> Iterator[None]:
    """Run the peft model `lm` as the reference inside: with its start adapter (`init` was an
    adapter directory), else with no adapter. Trainability flags are left as they were."""
    if START not in lm.peft_config:
        with lm.disable_adapter():  # nests: an inner one leaves the adapter off
            yield
        return
    if lm.active_adapter == START:  # inside another `as_reference`
        yield
        return
    params = list(lm.parameters())
    flags = [p.requires_grad for p in params]
    lm.set_adapter(START, inference_mode=True)
    try:
        yield
    finally:
        lm.set_adapter(DEFAULT)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode inside (no dropout), each submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ------------------------------------------------------------------------------ the reference view


class AdapterReference(Policy):
    """The reference of a LoRA policy: its module (shared, not copied) run under `as_reference`,
    in eval mode and without gradients. Its `parameters()` are the frozen ones it computes with."""

    name = "hf"

    def __init__(self, policy: Any):
        self.model = policy.module
        self.tokenizer = policy.tokenizer
        self.config = policy.config
        self.task = policy.task
        self.counters = {"train_tokens": 0, "generated_tokens": 0}

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.no_grad(), eval_mode(self.module), as_reference(self.module.lm):
            yield

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **outputs: Any) -> dict[str, torch.Tensor]:
        with self.active():
            return self.module(input_ids, attention_mask, temperature=self.config.temperature, **outputs)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward(input_ids, attention_mask)["logprobs"]

    def generate(self, prompts: Sequence[str], **sampling: Any) -> Rollout:
        from rlhfzoo.policy import sample_rollout  # the module that imports this one

        with self.active():
            return sample_rollout(self, prompts, self.config.model_copy(update=sampling) if sampling else self.config)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.module.lm.parameters() if not p.requires_grad)

    def frozen_copy(self) -> "AdapterReference":
        return self

    def save(self, path: str) -> None:
        raise NotImplementedError("a LoRA reference shares the policy's weights; save the policy (its base is policy.init)")

    def save_weights(self, file: str) -> None:
        raise NotImplementedError("a LoRA reference shares the policy's weights and has none of its own to save")

    def load_weights(self, path: str) -> None:
        raise NotImplementedError("a LoRA reference shares the policy's weights; load them into the policy")


# ------------------------------------------------------------------------------ files


def save_lm(lm: torch.nn.Module, path: str, merge: bool) -> None:
    """The adapter (`adapter_config.json`, `adapter_model.safetensors`) into `path`, or with `merge`
    the full weights with the adapter merged in (of a copy: the live model keeps its adapter)."""
    if merge:
        import copy

        copy.deepcopy(lm).merge_and_unload().save_pretrained(path, safe_serialization=True)
    else:
        lm.save_pretrained(path, selected_adapters=[DEFAULT], safe_serialization=True)


def frozen_base_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of the frozen weights inside `module`'s peft models (`lm`, `critic`): the
    base, and a start adapter. Attached modules keep all their entries, frozen or not."""
    names = set()
    for child_name in ("lm", "critic"):
        child = getattr(module, child_name, None)
        if child is not None and is_peft(child):
            names |= {f"{child_name}.{n}" for n, p in child.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return names


def save_trainable(module: torch.nn.Module, file: str) -> None:
    """`module`'s state dict without the frozen base weights, to one safetensors file (tensors that
    shared memory are written as separate copies)."""
    skip = frozen_base_names(module)
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items() if k not in skip}, file)


def load_trainable(module: torch.nn.Module, file: str) -> None:
    """Load a `save_trainable` file: every entry but the frozen base must be in it, and nothing else."""
    state = load_file(file, device=str(next(module.parameters()).device))
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - frozen_base_names(module))
    if missing or unexpected:
        raise RuntimeError(f"{file}: does not hold this LoRA policy's weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
