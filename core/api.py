"""`rlhfzoo.train`: the Python API beside `rlhfzoo train`, for notebooks and scripts.

    import rlhfzoo
    result = rlhfzoo.train(
        {"algorithm": {"name": "dpo", "beta": 0.1}, "train": {"steps": 100, "batch_size": 8}},
        model=model, tokenizer=tokenizer,      # a transformers causal LM and its tokenizer: the policy
        train_dataset=pairs,                   # a datasets.Dataset (or a list of dicts) in a standard format
        output_dir="runs/my-dpo",
    )
    result.policy.module.lm                    # the trained model (the very object passed in)
    result.summary                             # what summary.json holds

The config is what a YAML run config holds (see `rlhfzoo.config`), as a mapping or the path of
the file. Each object stands for a section, which the config may then omit:

    model, tokenizer             -> policy   (its other options still apply: max_new_tokens, ...)
    train_dataset, eval_dataset  -> task     the `dataset` task over the rows (its options still apply)
    reward                       -> reward   a function (prompts, responses) -> rewards, or a RewardSource

A config that also gives what an object gives (`task.path` and `train_dataset`, `policy.init`
and `model`) is an error, as is a missing `output_dir`. `rlhfzoo train` runs through `run`,
as `train` does: the run directory is made and checked the same way (`rlhfzoo.run_dir`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import ValidationError

from rlhfzoo.config import ConfigError, RunConfig, read_yaml, resolve
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Policy, RewardSource, Task
from rlhfzoo.registry import DEFAULTS, registry
from rlhfzoo.sections import explain

ROWS_TASK = DEFAULTS["rows_task"]  # the task that reads `train_dataset` (its classmethod `from_rows`)


class TrainArgumentError(UserError):
    """A bad argument of `rlhfzoo.train`; the message names it and the fix."""


@dataclasses.dataclass
class TrainResult:
    """What `rlhfzoo.train` returns: the trained `policy` (an `HFPolicy` by default: `policy.module.lm`
    is the transformers model, `policy.tokenizer` its tokenizer), the run's `summary` (what
    summary.json holds; `{"finished": False, ...}` after `train.stop_after`) and its `output_dir`."""

    policy: Policy
    summary: dict[str, Any]
    output_dir: Path


def train(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    reward: Callable[[list[str], list[str]], Any] | RewardSource | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train as `rlhfzoo train` does, from a config (a mapping shaped like a YAML run config, or the
    path of one) and objects that replace its sections (see the module docstring).

    model: a transformers causal LM (`PreTrainedModel`), trained in place; needs `tokenizer`.
    train_dataset / eval_dataset: `datasets.Dataset`s (or lists of dicts) in a standard format of
        the `dataset` task (prompt/chosen/rejected, prompt/completion, text, ...); without
        `eval_dataset`, the task's `test_fraction` of the rows is held out.
    reward: `reward(prompts, responses) -> list[float] | torch.Tensor` (one per response), or a
        `RewardSource`; what online algorithms (ppo-clip, rejection-sampling, ...) optimise. The
        prompts are strings, or `Chat`s for conversational data (see `RewardFunction`).
    output_dir: where the run is written (required here or as the config's `output_dir`).
    resume / overwrite: as `rlhfzoo train --resume` / `--overwrite`.
    """
    if isinstance(config, Mapping):
        data, source = copy.deepcopy(dict(config)), None
    elif isinstance(config, (str, os.PathLike)):
        data, source = read_yaml(config), os.fspath(config)
    else:
        raise TrainArgumentError(
            f"rlhfzoo.train(config=...) takes a mapping of config sections or the path of a YAML config, not a "
            f"{type(config).__name__}"
        )
    if output_dir is not None:
        data["output_dir"] = os.fspath(output_dir)
    elif data.get("output_dir") is None:
        raise TrainArgumentError(
            "rlhfzoo.train needs an output directory, where the run writes its checkpoints, metrics and final policy: "
            "pass output_dir=... (or give `output_dir` in the config)"
        )
    if model is None and tokenizer is not None:
        raise TrainArgumentError(
            "rlhfzoo.train(tokenizer=...) is the tokenizer of model=...; pass the model too, or set `policy.tokenizer` "
            "(a path or hub id) in the config"
        )
    if model is not None and tokenizer is None:
        raise TrainArgumentError(
            "rlhfzoo.train(model=...) needs the model's tokenizer too: pass tokenizer=AutoTokenizer.from_pretrained(...)"
        )
    if model is not None and isinstance(data.get("policy"), Mapping) and "init" in data["policy"]:
        raise TrainArgumentError(
            f"rlhfzoo.train got model=... and the config's policy.init={data['policy']['init']!r}: the model is the "
            "policy's weights; drop one of them"
        )
    task = rows_task(data, train_dataset, eval_dataset)
    if reward is not None and data.get("reward") is not None:
        raise TrainArgumentError("rlhfzoo.train got reward=... and a `reward` section in the config; drop one of them")
    if reward is not None:
        # `resolve` asks algorithms that need rewards for a `reward` section, which the object stands for: a
        # placeholder (the registry's default source) is validated in its place and dropped, and config.yaml has none.
        cfg = dataclasses.replace(resolve({**data, "reward": {"name": DEFAULTS["reward_source"]}}, source=source), reward=None)
    else:
        cfg = resolve(data, source=source)
    if model is not None and task is None:
        task = cfg.task.create()
    policy = given_policy(cfg, task, model, tokenizer) if model is not None else None
    given_reward = reward_source(reward, task) if reward is not None else None
    return run(cfg, task=task, policy=policy, reward=given_reward, resume=resume, overwrite=overwrite)


def run(
    cfg: RunConfig, *, task: Task | None = None, policy: Policy | None = None, reward: RewardSource | None = None,
    resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a resolved config (`rlhfzoo.config.load_config`), with plugins built by the caller in
    place of the sections' own; what `train` and `rlhfzoo train` call."""
    from rlhfzoo.trainer import Trainer

    trainer = Trainer(cfg, log=log, task=task, policy=policy, reward=reward)
    summary = trainer.fit(resume=resume, overwrite=overwrite)
    return TrainResult(trainer.policy, summary, Path(cfg.output_dir))


# ------------------------------------------------------------------------------------ the objects


def as_dataset(rows: Any, argument: str) -> Any:
    """A `datasets.Dataset` of `rows` (a Dataset, or a list of dicts)."""
    import datasets

    if isinstance(rows, datasets.Dataset):
        return rows
    if isinstance(rows, list) and rows and all(isinstance(r, Mapping) for r in rows):
        return datasets.Dataset.from_list([dict(r) for r in rows])
    hint = " (pick a split: dataset['train'])" if isinstance(rows, datasets.DatasetDict) else ""
    raise TrainArgumentError(
        f"rlhfzoo.train({argument}=...) takes a datasets.Dataset or a non-empty list of dicts, not a "
        f"{type(rows).__name__}{hint}"
    )


def rows_task(data: dict[str, Any], train_dataset: Any, eval_dataset: Any) -> Task | None:
    """The `dataset` task over `train_dataset` (and `eval_dataset`), with the options of the config's
    `task` section, which it replaces in `data`; None without `train_dataset`."""
    if train_dataset is None:
        if eval_dataset is not None:
            raise TrainArgumentError("rlhfzoo.train(eval_dataset=...) holds out rows of train_dataset=...; pass that too")
        return None
    section = data.get("task") or {}
    options = dict(section) if isinstance(section, Mapping) else {"name": section}
    entry = registry.get("task", str(options.pop("name", ROWS_TASK)))
    if entry.name != ROWS_TASK:
        raise TrainArgumentError(
            f"rlhfzoo.train got train_dataset=... and the config's task {entry.name!r}: the rows are read by the "
            f"{ROWS_TASK!r} task; drop the `task` section, or keep only {ROWS_TASK!r} options in it"
        )
    for key in ("path", "dataset"):
        if options.get(key) is not None:
            raise TrainArgumentError(
                f"rlhfzoo.train got train_dataset=... and the config's task.{key}={options[key]!r}: give the data one "
                f"way; drop task.{key} or train_dataset"
            )
    train_rows = as_dataset(train_dataset, "train_dataset")
    test_rows = as_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
    try:
        task = entry.cls.from_rows(train_rows, test_rows, **options)
    except ValidationError as e:
        problems = [(".".join(map(str, ("task", *err["loc"]))), explain(err, entry.cls.Config)) for err in e.errors()]
        raise ConfigError(problems) from None
    data["task"] = {"name": ROWS_TASK, **task.config.model_dump(mode="json", exclude_unset=True)}
    return task


def given_policy(cfg: RunConfig, task: Task, model: Any, tokenizer: Any) -> Policy:
    """The config's policy (a transformers policy, `rlhfzoo.policy.HFPolicy`) over `model` and `tokenizer`."""
    from transformers import PreTrainedModel

    from rlhfzoo.policy import HFPolicy

    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise TrainArgumentError(
            f"rlhfzoo.train(model=...) takes a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...)), "
            f"not a {type(model).__name__}"
        )
    cls = cfg.policy.entry.cls
    if not issubclass(cls, HFPolicy):
        raise TrainArgumentError(
            f"rlhfzoo.train got model=..., a transformers model, but the config's policy is {cfg.policy.entry.name!r}, "
            "which does not take one; drop `policy.name`"
        )
    if tokenizer.pad_token is None:  # as TRL does: pad with eos
        if tokenizer.eos_token is None:
            raise TrainArgumentError("rlhfzoo.train(tokenizer=...) has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise TrainArgumentError(
            f"rlhfzoo.train: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; pass the "
            "model's own tokenizer, or call model.resize_token_embeddings(len(tokenizer)) first"
        )
    config = cfg.policy.config
    if cfg.algorithm.entry.cls.needs_value_head:
        config = cls.with_value_head(config)
    return cls(config, task=task, model=model, tokenizer=tokenizer)


def reward_source(reward: Any, task: Task | None) -> RewardSource:
    """`reward` as a reward source: a RewardSource as it is, a function wrapped in `RewardFunction`."""
    if isinstance(reward, RewardSource):
        return reward
    if isinstance(reward, type) or not callable(reward):
        what = f"the class {reward.__name__}" if isinstance(reward, type) else f"a {type(reward).__name__}"
        raise TrainArgumentError(
            f"rlhfzoo.train(reward=...) takes a function (prompts, responses) -> rewards or a RewardSource instance, "
            f"not {what}"
        )
    return RewardFunction(reward, task=task)


class RewardFunctionError(UserError):
    """A reward function passed to `rlhfzoo.train` returned something other than one finite float per response."""


class RewardFunction(RewardSource):
    """A Python function `reward(prompts, responses) -> list[float] | torch.Tensor` as a reward source.

    The prompts are as the task hands them out: strings, or `rlhfzoo.interfaces.Chat`s for
    conversational data (`chat.messages()` is the list of `{role, content}` messages, `str(chat)`
    a readable text); the responses are the generated texts."""

    summary = "A Python function (prompts, responses) -> rewards, passed to rlhfzoo.train(reward=...)."

    def __init__(self, function: Callable[[list[str], list[str]], Any], task: Task | None = None):
        super().__init__(None, task)
        self.function = function
        self.name = getattr(function, "__qualname__", None) or type(function).__name__

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out = self.function(list(prompts), list(responses))
        where = f"the reward function {self.name!r} (rlhfzoo.train(reward=...))"
        try:
            rewards = (out.detach() if isinstance(out, torch.Tensor) else torch.as_tensor(list(out))).to("cpu", torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardFunctionError(
                f"{where} returned {type(out).__name__} ({e}); return one float per response, as a list or a 1-D tensor"
            ) from None
        if rewards.dim() != 1 or len(rewards) != len(responses):
            raise RewardFunctionError(
                f"{where} returned {tuple(rewards.shape)} rewards for {len(responses)} responses; return one float per "
                "response, in the order of `responses`"
            )
        bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)]
        if bad:
            raise RewardFunctionError(
                f"{where} returned non-finite rewards ({rewards[bad[0]].item()}) for responses {bad[:5]} of {len(responses)} "
                f"(e.g. {responses[bad[0]]!r}); return finite floats"
            )
        return rewards
