"""Cached stages: expensive steps whose output other plugins read (a task's SFT policy, its reward
model, a critique judge, the samples that preference data is derived from).

A stage is a registered plugin (`rlhfzoo.interfaces.Stage`, hook `register_stages`); this module
is the one mechanism that builds and finds them, and it names none of them:

    stages.build(name, task)      # its `requires` first, then the stage itself; cached
    stages.path(name, task)       # the built output, or StageNotBuilt saying how to build it
    stages.build_for(cfg)         # every stage a resolved run config needs

Plugins say which stages they read: `Plugin.required_stages(config)` (e.g. a policy whose weights
are the task's SFT policy) and `Task.stages_for(kind)` (examples derived from a stage). Whoever
constructs plugins -- the trainer, the bench, the command line -- builds those first, so a
constructor only reads (`path`) and never trains.

Each output is an artifact (`rlhfzoo.artifacts`) named by the stage (or its `artifact`) and keyed
by `key(task)`, so every run and benchmark starts from the same one and the work is done once per
cache. A finished `rlhfzoo train` run that produced exactly a stage's output is cached as that
stage by `adopt`, which asks every registered stage (`Stage.adopts`).

A stage whose output is a nested training run (a task's SFT policy, its reward model) subclasses
`TrainingStage`, which runs it; the subclass gives the run config.
"""

from __future__ import annotations

import json
import shlex
import shutil
from abc import abstractmethod
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar

from rlhfzoo.artifacts import artifact, cache_root, finished
from rlhfzoo.config import load_config
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Stage, Task
from rlhfzoo.registry import registry

Log = Callable[[str], None] | None


class StageError(UserError):
    """A stage cannot be built as asked (e.g. stages that require each other)."""


class StageNotBuilt(StageError):
    """A plugin asked for a stage's output before anything built it; the message says how to."""

    def __init__(self, name: str, task: Task):
        self.name, self.task = name, task
        super().__init__(
            f"the {name!r} stage of task {task.name!r} is not built yet (cache: {cache_root()}). Build it with "
            f"`{build_command(name, task)}`, or run `rlhfzoo train` or `rlhfzoo bench`, which build the stages "
            "a run needs before it starts."
        )


def build_command(name: str, task: Task) -> str:
    """The command line that builds stage `name` for this task (its non-default options as `--set`)."""
    options = task.config.model_dump(mode="json", exclude_defaults=True)
    sets = [f"--set {shlex.quote(f'task.{k}={json.dumps(v)}')}" for k, v in options.items()]
    return " ".join(["rlhfzoo stage", shlex.quote(name), "--task", shlex.quote(task.name), *sets])


def get(name: str) -> Stage:
    """The registered stage `name` (or alias), with its default config."""
    return registry.get("stage", name).cls()


def _artifact_name(name: str) -> str:
    entry = registry.get("stage", name)
    return entry.cls.artifact or entry.name


def path(name: str, task: Task) -> Path:
    """The output of stage `name` for this task; raises `StageNotBuilt` when it is not built.
    Builds nothing: what constructors call."""
    stage = get(name)
    directory = finished(_artifact_name(name), stage.key(task))
    if directory is None:
        raise StageNotBuilt(name, task)
    return directory / stage.output


def build(name: str, task: Task, log: Log = print, progress: bool = False) -> Path:
    """The output of stage `name` for this task, built first if needed: its `requires` (and theirs)
    first, then the stage itself. `progress` shows the progress bars of what runs. Every key is
    computed before anything is built, so a stage that does not apply to the task fails at once."""
    return _build(name, task, log, progress, chain=())


def _build(name: str, task: Task, log: Log, progress: bool, chain: tuple[str, ...]) -> Path:
    canonical = registry.get("stage", name).name
    if canonical in chain:
        raise StageError(f"stages require each other in a cycle: {' -> '.join([*chain, canonical])}")
    stage = get(name)
    key = stage.key(task)
    for required in stage.requires:
        _build(required, task, log, progress, (*chain, canonical))
    directory = artifact(_artifact_name(name), key, partial(stage.build, task=task, log=log, progress=progress), log=log)
    return directory / stage.output


def needed(cfg: Any, task: Task, given: tuple[str, ...] = ()) -> list[str]:
    """Names of the stages a resolved run config (`rlhfzoo.config.RunConfig`) reads, asked from its
    plugins: each section's `required_stages(config)`, and the task's `stages_for` the kind of
    examples the objective trains on. Their own `requires` are not listed (`build` adds them).
    `given`: the sections whose plugins the caller built itself (objects passed to
    `rlhfzoo.train`, e.g. "policy"), whose constructors read no stage."""
    names: list[str] = []
    for name in ("task", "policy", "algorithm", "reward"):
        section = getattr(cfg, name)
        if section is not None and name not in given:
            names += section.entry.cls.required_stages(section.config)
    if cfg.algorithm is not None:  # None: a policy evaluated as is (a bench row of best-of-n)
        names += task.stages_for(cfg.algorithm.create().example_kind())
    return list(dict.fromkeys(names))


def build_for(
    cfg: Any, log: Log = print, progress: bool = False, task: Task | None = None, given: tuple[str, ...] = ()
) -> dict[str, Path]:
    """Build every stage a resolved run config needs (see `needed`, and its `given`) for its task
    (`task`, else the config's); name -> output."""
    task = task if task is not None else cfg.task.create()
    return {name: build(name, task, log, progress) for name in needed(cfg, task, given)}


def adopt(cfg: Any, run_dir: Path, log: Log = print) -> list[tuple[str, Path]]:
    """Cache the finished `rlhfzoo train` run in `run_dir` (config `cfg`) as every registered stage
    that says it produced exactly that stage's output (`Stage.adopts`), unless the stage is cached
    already; (name, output) of each such stage."""
    adopted: list[tuple[str, Path]] = []
    task = None
    for entry in registry.entries("stage"):
        stage = entry.cls()
        if not stage.adopts(cfg, Path(run_dir)):
            continue
        task = task or cfg.task.create()
        directory = artifact(_artifact_name(entry.name), stage.key(task), partial(stage.adopt, cfg, Path(run_dir)), log=log)
        adopted.append((entry.name, directory / stage.output))
    return adopted


# ------------------------------------------------------------------------------------ stages that train

RUN = "run"  # a training stage's nested run, inside its artifact


class TrainingStage(Stage):
    """A stage whose output is a nested `rlhfzoo train` run: the task's SFT policy, its reward model,
    its critique judge. A subclass says what differs:

        trains = "the reward model"            # for the log
        def run_data(self, task): ...          # the run config, as a mapping without `output_dir`
        def after_training(self, directory, trainer, summary, log): ...   # optional: e.g. a report

    and this class does the rest: the key (the run config, and the key of every stage it requires:
    what it starts from), the run into `<artifact>/run` with the progress bar shown as asked, and,
    for a subclass that says which finished runs it `adopts`, copying such a run's output.
    """

    output = f"{RUN}/policy"  # the nested run's policy
    trains: ClassVar[str] = ""

    @abstractmethod
    def run_data(self, task: Task) -> dict[str, Any]:
        """The config of the nested run for this task, as a mapping without `output_dir`."""

    def key(self, task: Task) -> dict[str, Any]:
        return {**self.run_data(task), **{name: get(name).key(task) for name in self.requires}}

    def build(self, directory: Path, task: Task, log: Log, progress: bool = False) -> None:
        from rlhfzoo.trainer import Trainer  # not at the top: the trainer builds the stages a run reads

        if log:
            log(f"[rlhfzoo] training {self.trains} for task {task.name!r} (cached for later runs)")
        data = self.run_data(task)
        data = {**data, "train": {**data["train"], "progress": progress}, "output_dir": str(directory / RUN)}
        trainer = Trainer(load_config(data=data), log=log)
        summary = trainer.fit()
        self.after_training(directory, trainer, summary, log)

    def after_training(self, directory: Path, trainer: Any, summary: dict[str, Any], log: Log) -> None:
        """Called by `build` once the nested run (`trainer`, its `summary`) has finished, its output
        in place; nothing by default."""

    def adopt(self, cfg: Any, run_dir: Path, directory: Path) -> None:
        """Copy the finished run's output where `build` puts it."""
        shutil.copytree(Path(run_dir) / PurePosixPath(self.output).relative_to(RUN), directory / self.output)
