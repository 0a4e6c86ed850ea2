"""`rlhfzoo` command line: list | show | plugins | registry | train | data | bench | stage.

`show NAME` describes a registered plugin and its config fields (`show train`: the `train:`
section's options); `data CONFIG` prints a run's first training examples as the model sees them
(`rlhfzoo.data_preview`), with the counts of examples, skipped rows and truncated sequences.

User errors (bad config, unknown names, bad data) print one message and exit with status 2;
`--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from rlhfzoo import __version__, stages
from rlhfzoo.config import ConfigError, TrainConfig, apply_overrides
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Task
from rlhfzoo.registry import DEFAULTS, KINDS, registry

EXIT_USER_ERROR = 2
TRAIN_SECTION = "train"  # `rlhfzoo show train`: reserved for the run config's section, never a plugin


def _kind_arg(value: str) -> str:
    """Accept `objective`, `objectives`, `reward-source`, `reward_sources`, `policies`, ..."""
    spellings = {}
    for k, kind in KINDS.items():
        for s in (k, kind.plural, k.replace("_", "-"), kind.plural.replace(" ", "-"), kind.plural.replace(" ", "_")):
            spellings[s] = k
    if value not in spellings:
        raise argparse.ArgumentTypeError(f"unknown kind {value!r}; kinds are: {', '.join(k.replace('_', '-') for k in KINDS)}")
    return spellings[value]


# ------------------------------------------------------------------------------------ commands


def cmd_list(args) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        entries = list(registry.entries(kind))
        print(f"{KINDS[kind].plural}:")
        for e in entries:
            extra = f" [{e.data_kind}]" if e.data_kind else ""
            if e.kind == "stage" and e.cls.requires:
                extra = f" [after {', '.join(e.cls.requires)}]"
            alias = f" (alias: {', '.join(e.aliases)})" if e.aliases else ""
            pkg = "" if e.package == "rlhfzoo" else f" <{e.package}>"
            status = " (experimental)" if e.status == "experimental" else ""
            print(f"  {e.name:<20}{extra}{alias}{status}{pkg}  {e.summary}")
        if not entries:
            print("  (none)")
    _print_load_errors()
    return 0


def cmd_show(args) -> int:
    if args.name == TRAIN_SECTION:  # a reserved word: the run config's `train:` section
        print(f"{TRAIN_SECTION}  (the `train:` section of a run config, rlhfzoo.config.TrainConfig)")
        print(f"  summary:   {TrainConfig.__doc__.strip().splitlines()[0]}")
        print_config_fields(TrainConfig)
        return 0
    found = registry.find(args.name)
    if not found:
        raise registry.missing(args.name, args.kind)
    if args.kind:
        found = [e for e in found if e.kind == args.kind] or found
    for e in found:
        print(f"{e.name}  ({KINDS[e.kind].title.lower()}, from package {e.package}, {e.status})")
        if e.aliases:
            print(f"  aliases:   {', '.join(e.aliases)}")
        print(f"  summary:   {e.summary}")
        if e.paper:
            print(f"  paper:     {e.paper}")
        if e.data_kind:
            online = " (online: samples from the policy)" if getattr(e.cls, "online", False) else ""
            print(f"  data kind: {e.data_kind}{online}")
        if e.kind == "stage":
            print(f"  requires:  {', '.join(e.cls.requires) or '(nothing)'}")
            print(f"  build:     rlhfzoo stage {e.name} --task TASK [--set task.KEY=VALUE ...]")
        print_config_fields(e.cls.Config)
    return 0


def print_config_fields(config_cls: type[BaseModel]) -> None:
    """The `config:` block of `rlhfzoo show`: every field of a pydantic config with its default,
    type and description."""
    fields = config_cls.model_fields
    print("  config:" if fields else "  config:    (no options)")
    _print_fields(config_cls, "")


def _print_fields(config_cls: type[BaseModel], prefix: str) -> None:
    for fname, f in config_cls.model_fields.items():
        default = "<required>" if f.is_required() else repr(f.get_default(call_default_factory=True))
        print(f"    {prefix}{fname} = {default}  ({type_name(f.annotation)})\n        {f.description or ''}")
        for nested in (f.annotation, *get_args(f.annotation)):  # a nested options model (policy.lora): its fields too
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                _print_fields(nested, f"{prefix}{fname}.")


def type_name(annotation: Any) -> str:
    """A field's type as people write it: `int`, `float | None`, `'constant' | 'cosine'`, `dict[str, str]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    return getattr(annotation, "__name__", str(annotation))


def cmd_plugins(args) -> int:
    registry._ensure_loaded()
    for info in registry.plugins.values():
        origin = "built-in" if info.builtin else "entry point"
        names = ", ".join(f"{n} ({k.replace('_', ' ')})" for k, n in info.registered) or "nothing"
        print(f"{info.name}  [{info.package} {info.version}, {origin}]: {names}")
    _print_load_errors()
    return 0


def catalogue() -> dict[str, Any]:
    """registry.yaml's content: every name this distribution registers, with metadata and defaults."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        rows = {e.name: e.metadata() for e in registry.entries(kind) if e.package == "rlhfzoo"}
        out[kind] = rows
    return out


def render_catalogue() -> str:
    head = (
        "# Every name the rlhfzoo distribution registers, with its metadata and config defaults.\n"
        "# Generated by `rlhfzoo registry --write`; a test runs `rlhfzoo registry --check`.\n"
        "# Names from third-party plugin packages are listed by `rlhfzoo list`, not here.\n"
    )
    return head + yaml.safe_dump(catalogue(), sort_keys=False, width=100)


def cmd_registry(args) -> int:
    path = Path(args.path)
    text = render_catalogue()
    if args.write:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"wrote {path}")
        return 0
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            import difflib

            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(path), "live registry", lineterm="", n=1)
            print("\n".join(list(diff)[:60]))
            print(f"{path} is out of step with the live registry; run `rlhfzoo registry --write` and commit it", file=sys.stderr)
            return 1
        print(f"{path} matches the live registry")
        return 0
    print(text)
    return 0


def cmd_train(args) -> int:
    from rlhfzoo.api import run
    from rlhfzoo.config import load_config

    cfg = load_config(args.config, args.overrides)
    summary = run(cfg, resume=args.resume, overwrite=args.overwrite).summary  # what rlhfzoo.train runs
    if summary.get("finished"):
        ev = summary.get("eval", {})
        figures = ", ".join(f"{k}={v:.4g}" for k, v in ev.items())
        print(f"finished {summary['step']} steps -> {cfg.output_dir}/policy" + (f"\nheld-out: {figures}" if figures else ""))
        line = reward_source_line(cfg.reward.entry.name if cfg.reward else None, summary.get("reward_source", {}))
        if line:
            print(line)
        for name, path in stages.adopt(cfg, Path(cfg.output_dir), log=None):  # e.g. configs/sft.yaml: the `sft` stage
            print(f"this run is the {name!r} stage of task {cfg.task.entry.name!r}; cached at {path} (what reads the stage starts from it)")
    else:
        print(f"stopped at step {summary['step']} (train.stop_after); continue with --resume")
    return 0


def cmd_data(args) -> int:
    from rlhfzoo.config import load_config
    from rlhfzoo.data_preview import preview

    cfg = load_config(args.config, args.overrides)
    print(preview(cfg, n=args.n, split=args.split), end="")
    return 0


def reward_source_line(name: str | None, metrics: dict[str, float]) -> str | None:
    """The reward source's own counters (calls, failures and fallback rates), printed at the end of a
    run so that a source that fell back on a default is never silent."""
    if not name or not metrics:
        return None
    return f"reward source {name!r}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def cmd_stage(args) -> int:
    """Build one stage (and the stages it requires) for a task, with the progress bars of what trains."""
    name = registry.get("stage", args.name).name
    task = stage_task(args.task, args.set or [])
    path = stages.build(name, task, log=print, progress=True)
    print(f"stage {name!r} of task {task.name!r}: {path}")
    return 0


def stage_task(name: str, sets: list[str]) -> Task:
    """The task `--task NAME` with the options of every `--set task.KEY=VALUE`, validated."""
    data = apply_overrides({"task": {"name": name}}, sets)
    problems = [(str(k), "a stage depends on its task only: give task options, --set task.KEY=VALUE") for k in data if k != "task"]
    options = dict(data["task"]) if isinstance(data.get("task"), dict) else {}
    entry = registry.get("task", str(options.pop("name", name)))
    try:
        config = entry.cls.Config(**options)
    except ValidationError as e:
        problems += [("task." + ".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]
    if problems:
        raise ConfigError(problems, source="--task, --set")
    return entry.cls(config)


def cmd_bench(args) -> int:
    from rlhfzoo.bench import main as bench_main

    return bench_main(args.bench_args)


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfzoo", description="A plugin-based zoo of RLHF algorithms.")
    parser.add_argument("--version", action="version", version=f"rlhfzoo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered names")
    p.add_argument("--kind", type=_kind_arg, help="objective | reward-source | policy | task | stage")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "show",
        help="describe one registered name and its config fields (`show train`: the train section's options)",
        description="Describe a registered plugin and every config field (default, type, description). "
        f"`{TRAIN_SECTION}` is reserved for the run config's `train:` section: `rlhfzoo show {TRAIN_SECTION}` lists its "
        "options, whatever plugins are registered.",
    )
    p.add_argument("name", help=f"a registered name, or `{TRAIN_SECTION}` for the train section")
    p.add_argument("--kind", type=_kind_arg, help="when a name exists in several kinds")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("plugins", help="which package contributed what")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("registry", help="print, write or check registry.yaml")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="regenerate the catalogue file")
    g.add_argument("--check", action="store_true", help="exit non-zero when the file is out of date")
    p.add_argument("--path", default="registry.yaml", help="catalogue file (default: registry.yaml)")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("train", help="train from a YAML config, with dotted overrides (algorithm.beta=0.2)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in output_dir first")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "data",
        help="print a run's first training examples as the model sees them, and counts of examples and truncation",
        description="Read CONFIG as `rlhfzoo train` does and print the first N examples of a split of the data the "
        "algorithm trains on, tokenized and collated as in training and decoded back to text: special tokens "
        "(bos, eos) show as their text, and [[ ]] enclose the tokens the loss is taken over (the response, "
        "response_mask = 1); everything outside them is context. Pairs show chosen and rejected with the margin, "
        "unpaired examples their label, rewarded ones their reward; the prompts of online algorithms are shown as "
        "generation sees them (cut from the left to max_length - max_new_tokens). Then the counts: examples in the "
        "split, rows read, kept and skipped (where the task tells), and sequences longer than policy.max_length. "
        "Loads the policy's tokenizer only, no weights; builds no stage.",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for `rlhfzoo train`")
    p.add_argument("--n", type=int, default=3, help="examples to show (default: 3)")
    p.add_argument("--split", default="train", help="train (default) or test")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("stage", help="build a cached stage (a task's SFT policy, reward model, ...) with a progress bar")
    p.add_argument("name", help="a registered stage (`rlhfzoo list --kind stage`)")
    p.add_argument("--task", default=DEFAULTS["task"], help=f"registered task (default: {DEFAULTS['task']})")
    p.add_argument("--set", action="append", metavar="task.KEY=VALUE", help="a task option (repeatable)")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("bench", help="run algorithms head to head", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def _print_load_errors() -> None:
    for msg in registry.load_errors:
        print(f"warning: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench` has its own parser: hand it everything after the word.
    if "bench" in argv and all(a.startswith("-") for a in argv[: argv.index("bench")]):
        i = argv.index("bench")
        argv = [*argv[:i], "bench", "--", *argv[i + 1 :]]
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench" and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    # Overrides may follow flags (`train cfg.yaml --resume train.steps=5`): collect them too.
    if args.command in ("train", "data") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="rlhfzoo.registry")
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; finished checkpoints are kept (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
