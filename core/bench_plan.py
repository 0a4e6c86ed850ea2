"""Planning `rlhfzoo bench`: which runs, with which configs, in which directories -- all checked
before any run starts.

`plan(args)` turns the command line into one `RunSpec` per (row, seed): the SFT baseline first,
then every algorithm (one row per swept value). Everything a user can get wrong is found here
and reported as one message (a `BenchError` or `ConfigError`) while nothing has run yet:
meaningless counts, an unreadable or malformed `--config`, unknown names, a bad `--sweep`, and
every problem of every run's config -- validated exactly as `rlhfzoo train` validates it, so a
bad `--set` is reported in full before the baseline starts.

Run directories are built only from safe file-name characters (a plugin's name or a swept value
cannot hold a `/` or `..` that leads elsewhere) and must resolve inside `--out`.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfzoo import stages
from rlhfzoo.budget import BUDGET_AXES, check_budget, held_to
from rlhfzoo.config import REQUIRED_SECTIONS, ConfigError, RunConfig, apply_overrides, parse_value, read_yaml, resolve
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import BenchProtocol, Task
from rlhfzoo.registry import DEFAULTS, UnknownNameError, registry

BASELINE = "sft-baseline"
DEFAULT_TRAIN = {"steps": 50, "batch_size": 16, "lr": 1e-4}
BENCH_SECTIONS = ("task", "policy", "reward", "train")  # what --config and --set may set for every run
IGNORED_SECTIONS = ("algorithm", "output_dir")  # set per run by the bench itself
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._+-]")  # anything else in a run directory's name becomes `_`


class BenchError(UserError):
    """A bad bench command line or shared config; raised before anything runs."""


@dataclass
class RunSpec:
    label: str  # row name: the algorithm, plus the swept value if any
    name: str  # registered name
    kind: str  # "objective" (trained) or "policy" (evaluated as is)
    seed: int
    config: dict[str, Any]  # the run config (objective) or {"task", "policy", "reward"} (policy)
    directory: str
    eval_prompts: int
    variant: dict[str, Any] = field(default_factory=dict)
    eval_offset: int = 0  # held-out prompts skipped before the `eval_prompts` scored (`--tune`'s validation prompts follow the test ones)


def load_run_config(spec: RunSpec) -> RunConfig:
    """A run's config, validated as `rlhfzoo train` validates it; a policy row (evaluated as is)
    has no `algorithm` section."""
    return resolve(spec.config, require=REQUIRED_SECTIONS if spec.kind == "objective" else ("task",))


def protocol(kind: str, name: str) -> BenchProtocol:
    """The bench protocol a registered objective or policy declares (`bench`)."""
    declared = registry.get(kind, name).cls.bench
    if declared is None:
        raise BenchError(f"policy {name!r} is not a bench row (it declares no `bench` protocol); name an objective or an inference-time policy.")
    return declared


# ------------------------------------------------------------------------------------ the command line


def check_counts(args) -> None:
    """Counts that must be positive for a bench to mean anything, and a launcher that can run."""
    for flag, value, what in (
        ("--seeds", args.seeds, "runs per algorithm"),
        ("--eval-prompts", args.eval_prompts, "held-out prompts each run is scored on"),
        ("--jobs", 1 if args.jobs is None else args.jobs, "runs at the same time"),  # None: the default, set by `bench.main`
    ):
        if value < 1:
            raise BenchError(f"{flag} must be at least 1 ({what}), got {value}.")
    if args.launcher == "ray":
        from rlhfzoo.bench_launch import import_ray  # it imports this module

        import_ray()  # Ray installed, or a BenchError naming the extra


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file, not a directory. Pass a directory for the bench's outputs.")


def read_base(args, source: str) -> dict[str, Any]:
    """The sections shared by every run: `--config`, then every `--set`; each plugin section a
    name or a mapping, `train` a mapping. `source` names them in errors."""
    base: dict[str, Any] = {}
    if args.config:
        try:
            base = read_yaml(args.config)
        except OSError as e:
            raise BenchError(
                f"cannot read --config {args.config}: {e.strerror or e}. Pass a YAML file with task/policy/reward/train sections."
            ) from None
    problems = []
    for item in args.set or []:
        key = item.split("=", 1)[0].strip()
        if key.split(".", 1)[0] in IGNORED_SECTIONS:
            problems.append((key, "the bench sets `algorithm` and `output_dir` per run, so `--set` cannot: give an algorithm's "
                             "options with `--sweep algorithm.KEY=VALUE` (one value or several), its output with --out"))
    if problems:
        raise ConfigError(problems, source=source)
    base = apply_overrides(base, args.set or [])
    for key in base:
        if key not in BENCH_SECTIONS and key not in IGNORED_SECTIONS:
            close = difflib.get_close_matches(str(key), BENCH_SECTIONS, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append((str(key), f"unknown section.{hint} A bench config has the sections {', '.join(BENCH_SECTIONS)}."))
    for section in ("task", "policy", "reward"):
        if isinstance(base.get(section), str):
            base[section] = {"name": base[section]}
        elif base.get(section) is not None and not isinstance(base[section], dict):
            problems.append((section, f"must be a registered name or a mapping with a `name`, got {base[section]!r}"))
    if base.get("train") is not None and not isinstance(base["train"], dict):
        problems.append(("train", f"must be a mapping of training settings, got {base['train']!r}"))
    if problems:
        raise ConfigError(problems, source=source)
    return base


KL_SWEEP = "kl"  # `--sweep kl`: every row over its own KL knob's values (`BenchProtocol.kl_knob`, `kl_sweep`)


def parse_sweep(text: str | None) -> tuple[str | None, list[Any]]:
    """`algorithm.KEY=v1,v2,...` -> (key, distinct values parsed as YAML); `kl` -> ("kl", [])."""
    if not text:
        return None, []
    if text.strip() == KL_SWEEP:
        return KL_SWEEP, []
    usage = f"--sweep must look like algorithm.beta=0.05,0.1,0.5 (or `kl`: each algorithm's own KL knob), got {text!r}"
    key, sep, values = text.partition("=")
    parts = key.split(".")
    if not sep or len(parts) < 2 or parts[0] != "algorithm" or not all(parts):
        raise BenchError(usage)
    parsed, seen = [], set()
    for raw in values.split(","):
        if not raw.strip():
            raise BenchError(f"{usage}: an empty value. Separate values by single commas.")
        try:
            value = parse_value(raw)
        except yaml.YAMLError as e:  # duplicate keys included
            raise BenchError(f"{usage}: {raw!r} is not a YAML value ({getattr(e, 'problem', None) or e}).") from None
        if json.dumps(value, sort_keys=True, default=str) in seen:
            raise BenchError(f"--sweep lists {raw!r} twice (as {value!r}). List each value once.")
        seen.add(json.dumps(value, sort_keys=True, default=str))
        parsed.append(value)
    return key, parsed


BUDGET_STEP_CAP = 10  # --budget: a row's steps are capped at this many times its protocol's


def parse_budget(text: str | None) -> tuple[str, float] | None:
    """`--budget AXIS=AMOUNT` -> (axis, amount), checked as `train.budget` is (`rlhfzoo.budget`)."""
    if not text:
        return None
    axis, sep, amount = text.partition("=")
    usage = f"--budget must look like AXIS=AMOUNT with AXIS one of {', '.join(BUDGET_AXES)} (e.g. seconds=60), got {text!r}"
    try:
        (axis, value), = check_budget({axis.strip(): float(amount)}).items()
    except ValueError as e:
        raise BenchError(f"{usage}: {e}" if sep else usage) from None
    return axis, value


# ------------------------------------------------------------------------------------ names


def resolve_names(names: list[str]) -> list[tuple[str, str]]:
    """(kind, canonical name) for every algorithm, each once; all unknown names reported at once."""
    resolved, unknown = [], []
    for name in names:
        found = [e for e in registry.find(name) if e.kind == "objective" or (e.kind == "policy" and e.cls.bench is not None)]
        if not found:
            unknown.append(name)
            continue
        entry = next((e for e in found if e.kind == "objective"), found[0])
        if (entry.kind, entry.name) not in resolved:  # `dpo,dpo` or a name and its alias: one row
            resolved.append((entry.kind, entry.name))
    if unknown:
        choices = registry.names("objective") + [e.name for e in registry.entries("policy") if e.cls.bench is not None]
        messages = [str(UnknownNameError("objective", n, choices)).split("\n")[0] for n in unknown]
        raise UnknownNameError("objective", unknown[0], choices) if len(unknown) == 1 else BenchError(
            "\n".join(messages) + f"\nAlgorithms available: {', '.join(choices)}. Nothing was run."
        )
    return resolved


def builtin_algorithms() -> list[str]:
    """Every built-in objective and policy whose bench protocol makes it a contender."""
    return [
        e.name
        for kind in ("objective", "policy")
        for e in registry.entries(kind)
        if e.package == "rlhfzoo" and e.cls.bench is not None and e.cls.bench.contender
    ]


def default_algorithms(task: dict[str, Any]) -> list[str]:
    """What runs without `--algorithms`: every built-in contender; on a task without a gold reward
    (its sampled responses cannot be scored), the built-in offline contenders that report a held-out
    pair accuracy (`BenchProtocol.pair_accuracy`: DPO-style objectives, reward models) on a data kind
    the task provides, all compared by that accuracy."""
    instance = registry.create("task", task["name"], {k: v for k, v in task.items() if k != "name"})
    if instance.has_gold_reward:
        return builtin_algorithms()

    def provides(kind: str) -> bool:
        try:
            return bool(instance.examples(kind, split="train"))
        except (ValueError, KeyError, NotImplementedError):
            return False

    return [
        e.name
        for e in registry.entries("objective")
        if e.package == "rlhfzoo" and e.cls.bench.contender and e.cls.bench.pair_accuracy and not e.cls.online and provides(e.cls.data_kind)
    ]


# ------------------------------------------------------------------------------------ directories


def run_directory(out: str | Path, label: str, seed: int) -> str:
    """`<out>/runs/<label as a safe name>/seed-<seed>`. Spaces become `_` and `=` `-` (as in
    `dpo_beta-0.1`); any other character outside [A-Za-z0-9._+-] (`/`, `\\`, NUL...) becomes
    `_`, and leading dots are dropped, so the name is one plain component. The directory must
    also resolve inside `out` (a symbolic link in the way is refused)."""
    slug = UNSAFE_CHARACTERS.sub("_", label.replace(" ", "_").replace("=", "-")).lstrip(".") or "_"
    directory = Path(out) / "runs" / slug / f"seed-{seed}"
    root = Path(out).resolve()
    if not directory.resolve().is_relative_to(root):
        raise BenchError(
            f"the run directory {directory} of row {label!r} resolves to {directory.resolve()}, outside --out {root} "
            "(a symbolic link?). Remove the link or choose another --out."
        )
    return str(directory)


def check_distinct_directories(specs: list[RunSpec]) -> None:
    owners: dict[str, RunSpec] = {}
    for spec in specs:
        other = owners.setdefault(spec.directory, spec)
        if other is not spec:
            raise BenchError(
                f"rows {other.label!r} and {spec.label!r} would share the run directory {spec.directory}. "
                "Their names differ only in characters a directory name cannot hold; rename one or drop it from --algorithms/--sweep."
            )


# ------------------------------------------------------------------------------------ validation


def check_task(task: dict[str, Any], source: str) -> None:
    """The shared task section, validated before it is built to list the default algorithms."""
    try:
        resolve({"task": task}, require=("task",))
    except ConfigError as e:
        raise ConfigError(e.errors, source=source) from None


def validate_configs(specs: list[RunSpec], source: str) -> None:
    """Every run's config, validated as `rlhfzoo train` validates it, before any run starts: one
    error listing every problem once, with the rows it concerns when not all of them. `source`
    names what the configs came from (`--config FILE, --set`), where they are to be fixed."""
    problems: dict[str, list[str]] = {}
    for spec in specs:
        try:
            load_run_config(spec)
        except ConfigError as e:
            for path, message in e.errors:
                rows = problems.setdefault(f"{path or '<top>'}: {message}", [])
                if spec.label not in rows:
                    rows.append(spec.label)
    if not problems:
        return
    labels = list(dict.fromkeys(s.label for s in specs))
    lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with the runs' configs; nothing was run:"]
    for problem, rows in problems.items():
        lines.append(f"  {problem}" + ("" if rows == labels else f"  [in: {', '.join(rows)}]"))
    lines.append(f"Fix them in {source} (the keys of a `rlhfzoo train` config).")
    raise BenchError("\n".join(lines))


# ------------------------------------------------------------------------------------ the plan


def plan(args) -> list[RunSpec]:
    """Every run of the bench, each name resolved and each config validated; raises before
    anything is created or run."""
    check_counts(args)
    out = Path(args.out)
    check_out(out)
    given = (args.config and f"--config {args.config}", args.set and "--set", args.sweep and "--sweep", args.reward and f"--reward {args.reward}")
    source = ", ".join(x for x in given if x) or f"--task {args.task}"  # where the runs' configs come from
    base = read_base(args, source)
    task = {"name": args.task, **(base.get("task") or {})}  # --config's task name wins over --task
    if not args.config:
        task["name"] = args.task
    policy = {"name": DEFAULTS["policy"], **(base.get("policy") or {})}  # the baseline every row starts from
    check_task(task, source)
    instance = registry.create("task", task["name"], {k: v for k, v in task.items() if k != "name"})
    reward = base.get("reward") or ({"name": args.reward} if args.reward else instance.default_reward())
    train_base = base.get("train") or {}
    algorithms = default_algorithms(task) if args.algorithms is None else [n.strip() for n in args.algorithms.split(",") if n.strip()]
    names = resolve_names(algorithms)
    sweep_key, sweep_values = parse_sweep(args.sweep)
    budget = parse_budget(getattr(args, "budget", None))
    swept = set()
    specs: list[RunSpec] = []
    for seed in range(args.seeds):
        d = run_directory(out, BASELINE, seed)
        cfg = {"task": task, "policy": policy, **({"reward": reward} if reward else {})}
        specs.append(RunSpec(BASELINE, policy["name"], "policy", seed, cfg, d, args.eval_prompts))
    for kind, name in names:
        entry, bench = registry.get(kind, name), protocol(kind, name)
        variants: list[dict[str, Any]] = [{}]
        section = "algorithm" if kind == "objective" else "policy"
        if sweep_key == KL_SWEEP and bench.kl_knob:
            variants = [{f"{section}.{bench.kl_knob}": v} for v in bench.kl_sweep]
            swept.add(name)
        elif sweep_key and sweep_key != KL_SWEEP and kind == "objective" and sweep_key.split(".")[1] in entry.cls.Config.model_fields:
            variants = [{sweep_key: v} for v in sweep_values]
            swept.add(name)
        for variant in variants:
            label = name + "".join(f" {k.split('.')[-1]}={v}" for k, v in variant.items())
            for seed in range(args.seeds):
                d = run_directory(out, label, seed)
                if kind == "policy":  # an inference-time method, evaluated as is
                    row_policy = {"name": name, **bench.options}
                    if bench.base_option:
                        row_policy[bench.base_option] = policy
                    if bench.reward_option and reward:
                        row_policy[bench.reward_option] = reward
                    cfg = {"task": task, "policy": row_policy, **({"reward": reward} if reward else {})}
                else:
                    train = {**DEFAULT_TRAIN, **bench.train, **train_base}
                    train.update(seed=seed, eval_prompts=args.eval_prompts, progress=False)
                    if bench.evaluation == "sampled":  # learning curves; a scorer (reward model) is not sampled from
                        train.setdefault("eval_every", max(1, train["steps"] // 4) if isinstance(train["steps"], int) else 1)
                    if budget and not held_to(budget[0], entry.cls.online, entry.cls.needs_reward) and isinstance(train["steps"], int):
                        train.update(budget={budget[0]: budget[1]}, steps=train["steps"] * BUDGET_STEP_CAP)  # the budget ends the run
                    algorithm = {"name": name, **bench.options}
                    cfg = {"task": task, "policy": policy, "algorithm": algorithm, "train": train, "output_dir": str(Path(d) / "train")}
                    if (entry.cls.online or entry.cls.needs_reward) and reward:
                        cfg["reward"] = reward
                cfg = apply_overrides(cfg, [f"{k}={json.dumps(v, default=str)}" for k, v in variant.items()])
                specs.append(RunSpec(label, name, kind, seed, cfg, d, args.eval_prompts, variant))
    if sweep_key and not swept:
        what = "a KL knob (`BenchProtocol.kl_knob`)" if sweep_key == KL_SWEEP else f"the option {sweep_key.split('.')[1]!r}"
        raise BenchError(f"--sweep {sweep_key}: none of the algorithms run ({', '.join(n for _, n in names) or 'none'}) has {what}. "
                         "`rlhfzoo show NAME` lists an algorithm's options.")
    check_distinct_directories(specs)
    validate_configs(specs, source)
    return specs


# ------------------------------------------------------------------------------------ the stages the runs read


def stages_needed(specs: list[RunSpec]) -> list[tuple[Task, str]]:
    """(task, stage name) of every cached stage the runs read (`rlhfzoo.stages.needed`), each once
    per task config, in the order of the runs: what the bench builds before the first run."""
    out: list[tuple[Task, str]] = []
    tasks: dict[str, Task] = {}
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        cfg = load_run_config(spec)
        task_key = json.dumps(cfg.task.to_dict(), sort_keys=True)
        task = tasks.setdefault(task_key, cfg.task.create())
        for name in stages.needed(cfg, task):
            if (task_key, name) not in seen:
                seen.add((task_key, name))
                out.append((task, name))
    return out
