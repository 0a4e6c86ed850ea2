"""Run configs: YAML + dotted command-line overrides, validated with pydantic.

A run config names a plugin per section and gives that plugin's options beside its name:

    task:      {name: sentiment}
    policy:    {name: hf, init: sft}
    algorithm: {name: dpo, beta: 0.1}
    reward:    {name: gold}            # optional; online algorithms need one
    train:     {steps: 100, batch_size: 16, lr: 1.0e-4}
    output_dir: runs/dpo

Each named section is validated against the registered plugin's own `Config` class, `train`
against `TrainConfig`. Every error is collected and reported at once, with its dotted path;
unknown keys get a did-you-mean. A key given twice in one mapping is an error (plain YAML
would silently keep the last), and so is a non-finite number (`.inf`, `.nan`) in any field.
A plugin option that names another plugin (best-of-n's `base`) is a nested section, found and
validated the same way (`rlhfzoo.sections`), its problems reported at their full path.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from rlhfzoo.budget import BUDGET_AXES, check_budget
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import PluginConfig
from rlhfzoo.registry import DEFAULTS, Entry
from rlhfzoo.sections import SectionError, explain, find_plugin
from rlhfzoo.tracking import TRACKERS


class ConfigError(UserError):
    """One or more problems with a config, each as (dotted path, message)."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(errors)} problem{'s' if len(errors) != 1 else ''} with the config{where}:"]
        lines += [f"  {path or '<top>'}: {msg}".replace("\n", "\n    ") for path, msg in errors]
        super().__init__("\n".join(lines))


# Held-out figures of the periodic evaluation that `train.eval_target` can wait for (higher is better).
EVAL_TARGET_FIGURES = ("gold", "proxy")

# AdamW moves every weight by about `lr` per step: above 1 no run learns anything, it only diverges.
MAX_LR = 1.0


class TrainConfig(PluginConfig):
    """Training-loop settings shared by every algorithm."""

    steps: int = Field(100, ge=1, description="Optimizer steps (offline) or iterations (online) in total.")
    batch_size: int = Field(
        16, ge=1, description="Examples per optimizer step across all processes (online: prompts per iteration)."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step on each process.")
    lr: float = Field(1e-4, gt=0, le=MAX_LR, description=f"Peak learning rate of AdamW (at most {MAX_LR:g}).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps at the start.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After warm-up: constant, or cosine decay to 10% of `lr` at the last step."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null: no clipping).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Mixed precision, as accelerate offers it.")
    seed: int = Field(0, description="Seed for data order, initialisation and sampling.")
    log_every: int = Field(1, ge=1, description="Log metrics every this many steps.")
    save_every: int = Field(0, ge=0, description="Write a checkpoint every this many steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many most recent checkpoints to keep.")
    eval_every: int = Field(0, ge=0, description="Evaluate on held-out prompts every this many steps (0: only at the end).")
    eval_prompts: int = Field(64, ge=0, description="Held-out prompts used for evaluation (0: no evaluation).")
    stop_after: int | None = Field(
        None, ge=1, description="Stop after this many steps in this invocation (with a checkpoint), e.g. to fit a job time limit; continue with --resume."
    )
    budget: dict[str, float] | None = Field(
        None,
        description="End the run at the first step where this much has been spent, on one axis: {AXIS: AMOUNT} with AXIS one of "
        + ", ".join(BUDGET_AXES) + " (rlhfzoo.budget); `steps` is then the cap, and the learning-rate schedule still runs over it.",
    )
    eval_target: dict[str, float] | None = Field(
        None,
        description="End the run at the first periodic evaluation (every `eval_every` steps) whose held-out figure "
        "reaches this: {FIGURE: VALUE} with FIGURE one of " + ", ".join(EVAL_TARGET_FIGURES) + "; `steps` is then "
        "the cap. E.g. an SFT policy trained until it is good enough, whenever a run gets there.",
    )
    progress: bool = Field(True, description="Show a progress bar on the console.")
    num_threads: int | None = Field(
        None, ge=1,
        description="CPU intra-op threads of this run (torch.set_num_threads; null: torch's default, one per core). "
        "Small models often train as fast on 1, and much faster when other processes share the cores.",
    )
    cpu_allocator: Literal["keep-freed", "system"] = Field(
        "keep-freed",
        description="Training on the CPU, `keep-freed` sets glibc's malloc to keep freed memory for the next step "
        "(mmap threshold 32 MiB, no trimming; rlhfzoo.cpu_memory): far fewer page faults, 10-20 % faster small "
        "steps, the same results and peak memory; process-wide, and it stays after the run. `system`: leave it alone.",
    )
    report_to: list[Literal[tuple(TRACKERS)]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Experiment trackers through accelerate, beside metrics.jsonl, with the run config logged: "
        + ", ".join(TRACKERS) + " (their files under OUTPUT_DIR/trackers; each needs its package installed).",
    )

    @field_validator("budget")
    @classmethod
    def one_axis(cls, budget: dict[str, float] | None) -> dict[str, float] | None:
        return check_budget(budget)

    @field_validator("eval_target")
    @classmethod
    def one_figure(cls, target: dict[str, float] | None) -> dict[str, float] | None:
        if target is not None and (len(target) != 1 or next(iter(target)) not in EVAL_TARGET_FIGURES):
            raise ValueError(f"give one figure of {', '.join(EVAL_TARGET_FIGURES)} and its value, e.g. {{gold: 0.5}}; got {dict(target)}")
        return target

    @model_validator(mode="after")
    def target_is_evaluated(self):
        if self.eval_target is not None and not (self.eval_every and self.eval_prompts):
            raise ValueError("train.eval_target is checked at the periodic evaluations: set train.eval_every "
                             f"and train.eval_prompts above 0 (they are {self.eval_every} and {self.eval_prompts})")
        return self


SECTIONS: dict[str, str] = {"task": "task", "policy": "policy", "algorithm": "objective", "reward": "reward_source"}
REQUIRED_SECTIONS = ("task", "algorithm")
DEFAULT_SECTIONS: dict[str, dict[str, Any]] = {"policy": {"name": DEFAULTS["policy"]}}
TOP_LEVEL = (*SECTIONS, "train", "output_dir")


@dataclass
class Section:
    """A resolved config section: the plugin's name, registry entry and validated config."""

    name: str
    entry: Entry
    config: PluginConfig

    def create(self, *args: Any, **kwargs: Any) -> Any:
        return self.entry.cls(self.config, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.entry.name, **self.config.model_dump(mode="json")}


@dataclass
class RunConfig:
    task: Section
    policy: Section
    algorithm: Section | None  # None only where `resolve(require=...)` allowed it (a policy evaluated as is)
    reward: Section | None
    train: TrainConfig
    output_dir: str
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (every default filled in), as written next to a run."""
        out: dict[str, Any] = {s: getattr(self, s).to_dict() for s in SECTIONS if getattr(self, s) is not None}
        out["train"] = self.train.model_dump(mode="json")
        out["output_dir"] = self.output_dir
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_hash(obj: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able object (used to key cached artifacts)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ------------------------------------------------------------------------------------ loading


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping: `key`, and the 1-based `line`s of both."""

    def __init__(self, key: str, first: yaml.Mark, again: yaml.Mark):
        self.key, self.first_line, self.line = key, first.line + 1, again.line + 1
        super().__init__(None, None, f"duplicate key {key!r} at line {self.line} (first given at line {self.first_line})", again)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain YAML loading keeps the last of two equal keys without a word, so a second `train:`
    section would silently replace the first. Keys merged in with `<<: *anchor` may still be
    overridden, as YAML intends.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Check each mapping once, before flattening adds the merged-in keys to it.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict[tuple[str, str], yaml.Mark] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value)
                if key in first:
                    raise DuplicateKeyError(key_node.value, first[key], key_node.start_mark)
                first[key] = key_node.start_mark
        super().flatten_mapping(node)


def parse_value(text: str) -> Any:
    """A YAML value from the command line (`0.2`, `true`, `[1, 2]`, `{a: 1}`); raises DuplicateKeyError."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; every problem with the file is a ConfigError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError([("", f"{path} is a directory. Pass the path of a YAML config file, e.g. configs/sft.yaml.")])
    if not path.exists():
        raise ConfigError([("", f"file not found: {path}. Pass the path of a YAML config, e.g. configs/sft.yaml.")])
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise ConfigError(
            [("", f"{e.problem}. A key may appear once per mapping (YAML would silently keep the last); "
                  "keep one of them, or merge the two if they are sections.")],
            source=str(path),
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([("", f"malformed YAML{where}: {problem}. Fix the syntax there.")], source=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([("", f"not UTF-8 text ({e}). Save the file as UTF-8.")], source=str(path)) from None
    except OSError as e:
        raise ConfigError([("", f"cannot read the file: {e.strerror or e}. Check its permissions.")], source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", f"the top level must be a mapping of sections, got {type(data).__name__}")], source=str(path))
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: `0.2`, `true`, `[1, 2]`)."""
    data = copy.deepcopy(data)
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            errors.append((item, "an override must look like section.key=value, e.g. algorithm.beta=0.2"))
            continue
        try:
            value = parse_value(raw) if raw != "" else ""
        except DuplicateKeyError as e:
            errors.append((item, f"duplicate key {e.key!r} in the value; give each key once"))
            continue
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    if errors:
        raise ConfigError(errors, source="command line")
    return data


def _pydantic_errors(err: ValidationError, prefix: str, model: type) -> list[tuple[str, str]]:
    """(dotted path under `prefix`, message) of each error of validating `model` (see `explain`)."""
    return [(".".join(str(p) for p in (prefix, *e["loc"]) if p != ""), explain(e, model)) for e in err.errors()]


def _validate_model(model: type, values: dict[str, Any], prefix: str, errors: list) -> Any:
    try:
        return model(**values)
    except ValidationError as e:
        errors.extend(_pydantic_errors(e, prefix, model))
        return None


def resolve(data: dict[str, Any], source: str | None = None, require: tuple[str, ...] = REQUIRED_SECTIONS) -> RunConfig:
    """Validate a raw config mapping; raise ConfigError with every problem at once. `require`: the
    sections that must be there (a policy evaluated without training needs no `algorithm`)."""
    errors: list[tuple[str, str]] = []
    for key in data:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            errors.append((str(key), f"unknown section.{hint} Sections: {', '.join(TOP_LEVEL)}."))

    sections: dict[str, Section | None] = {}
    for sec, kind in SECTIONS.items():
        raw = data.get(sec, DEFAULT_SECTIONS.get(sec))
        if raw is None:
            if sec in require:
                errors.append((sec, f"required section is missing; add `{sec}: {{name: ...}}`"))
            sections[sec] = None
            continue
        if isinstance(raw, str):
            raw = {"name": raw}
        if isinstance(raw, dict):  # what it does not give is the default section's (the policy's name)
            raw = {**DEFAULT_SECTIONS.get(sec, {}), **raw}
        try:
            entry, options = find_plugin(kind, raw)
        except SectionError as e:
            errors.append((".".join(p for p in (sec, e.where) if p), e.message))
            sections[sec] = None
            continue
        name = options.pop("name")
        cfg = _validate_model(entry.cls.Config, options, sec, errors)
        sections[sec] = Section(name, entry, cfg) if cfg is not None else None

    train_raw = data.get("train", {}) or {}
    train = None
    if not isinstance(train_raw, dict):
        errors.append(("train", f"must be a mapping, got {type(train_raw).__name__}"))
    else:
        train = _validate_model(TrainConfig, train_raw, "train", errors)

    output_dir = data.get("output_dir")
    if output_dir is None:
        algo = data.get("algorithm")
        algo_name = algo.get("name") if isinstance(algo, dict) else algo
        output_dir = f"runs/{algo_name or 'run'}"
    elif not isinstance(output_dir, str):
        errors.append(("output_dir", f"must be a path string, got {output_dir!r}"))

    algo = sections.get("algorithm")
    if algo is not None and getattr(algo.entry.cls, "needs_reward", False) and data.get("reward") is None:
        errors.append(("reward", f"algorithm {algo.entry.name!r} needs a reward source; add `reward: {{name: ...}}`"))

    if errors:
        raise ConfigError(errors, source=source)
    return RunConfig(
        task=sections["task"],
        policy=sections["policy"],
        algorithm=sections["algorithm"],
        reward=sections["reward"],
        train=train,
        output_dir=str(output_dir),
        source=source,
    )


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None, require: tuple[str, ...] = REQUIRED_SECTIONS
) -> RunConfig:
    """Read a YAML config (or take `data`), apply dotted overrides, validate everything."""
    raw = read_yaml(path) if path is not None else dict(data or {})
    raw = apply_overrides(raw, overrides or [])
    return resolve(raw, source=str(path) if path is not None else None, require=require)
