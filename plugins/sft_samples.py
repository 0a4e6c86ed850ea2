"""The SFT samples stages: `samples_per_prompt` responses of a task's SFT policy to each of its
prompts (`sft-samples` for the train prompts, `sft-samples-test` for the held-out ones), sampled
under the task's `seed`. Tasks with a gold reward (`sentiment`, `arithmetic`) derive their labelled
data -- pairs, rankings, unpaired labels, rewarded samples -- from them: the task's `stages_for`
names them for those kinds, so they are built before the task is asked for such examples, and the
task's `examples` only reads them (`SAMPLES_STAGES[split]`). `SampleLabelledTask` is the base
of such tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfzoo import hookimpl, stages
from rlhfzoo.errors import UserError
from rlhfzoo.evaluation import sample
from rlhfzoo.interfaces import PluginConfig, Stage, Task
from rlhfzoo.registry import registry

SAMPLES_STAGES = {"train": "sft-samples", "test": "sft-samples-test"}  # split -> the stage of its samples


class SampleLabelledTask(Task):
    """Base of the tasks whose labelled data is derived from SFT samples by a gold reward
    (`sentiment`, `arithmetic`): examples built once per (kind, split) by the subclass's `_build`
    and cached; the derived kinds (`derived_kinds`) read the samples stages of both splits."""

    kinds: tuple[str, ...] = ()  # every data kind the task provides
    derived_kinds: tuple[str, ...] = ()  # those labelled from the SFT samples

    def __init__(self, config: PluginConfig | None = None):
        super().__init__(config)
        self._cache: dict[tuple[str, str], list[Any]] = {}

    def _build(self, kind: str, split: str) -> list[Any]:
        raise NotImplementedError

    def examples(self, kind: str, split: str = "train") -> list[Any]:
        if kind not in self.kinds:
            raise ValueError(f"task {self.name!r} has no data kind {kind!r}; valid kinds: {', '.join(self.kinds)}")
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, test")
        if (kind, split) not in self._cache:
            self._cache[kind, split] = self._build(kind, split)
        return list(self._cache[kind, split])

    def samples(self, split: str = "train") -> tuple[list[str], list[list[str]]]:
        """The split's prompts and `samples_per_prompt` responses of the task's SFT policy to each,
        read from the split's samples stage (`StageNotBuilt` when nothing built it yet)."""
        if ("samples", split) not in self._cache:
            prompts = self.examples("prompts", split)
            samples = json.loads(stages.path(SAMPLES_STAGES[split], self).read_text())
            self._cache["samples", split] = [prompts, samples]
        prompts, samples = self._cache["samples", split]
        return prompts, samples

    def provides(self, kind: str) -> bool:
        return kind in self.kinds

    def stages_for(self, kind: str) -> list[str]:
        """Labelled data comes from the SFT samples of both splits (training reads the train split,
        held-out evaluations the test split)."""
        return list(SAMPLES_STAGES.values()) if kind in self.derived_kinds else []


class SFTSamples(Stage):
    """`samples_per_prompt` responses of the task's SFT policy to each train prompt, sampled under
    the task's seed: what the task's labelled data is derived from."""

    name = "sft-samples"
    summary = "Samples of the task's SFT policy for its train prompts, from which a task (sentiment, arithmetic) derives pairs, rankings, ..."
    paper = "Gao, Schulman & Hilton 2022, arXiv:2210.10760"
    requires = ("sft",)
    artifact = "sft-samples"
    output = "samples.json"
    split = "train"

    def key(self, task) -> dict[str, Any]:
        n, seed = self._sampling(task)
        return {"sft": stages.get("sft").key(task), "prompts": task.examples("prompts", self.split), "n": n, "seed": seed}

    def build(self, directory: Path, task, log, progress: bool = False) -> None:
        n, seed = self._sampling(task)
        prompts = task.examples("prompts", self.split)
        policy = registry.create("policy", "hf", {"init": "sft"}, task=task)
        repeated = [p for p in prompts for _ in range(n)]
        responses = [r for ro in sample(policy, repeated, batch_size=256, seed=seed) for r in ro.responses]
        grouped = [responses[i * n : (i + 1) * n] for i in range(len(prompts))]
        (directory / self.output).write_text(json.dumps(grouped))

    def _sampling(self, task) -> tuple[int, int]:
        """(samples per prompt, seed) from the task's options."""
        options = task.config.model_dump()
        if "samples_per_prompt" not in options or "seed" not in options:
            raise UserError(
                f"stage {self.name!r} samples `samples_per_prompt` responses per prompt under the task's `seed`; "
                f"task {task.name!r} has no such options (`sentiment` and `arithmetic` have)"
            )
        return options["samples_per_prompt"], options["seed"]


class SFTSamplesTest(SFTSamples):
    """The same for the held-out prompts (held-out pairs, rankings, ... for evaluations)."""

    name = "sft-samples-test"
    summary = "Samples of the task's SFT policy for its held-out prompts (the task's held-out labelled data)."
    split = "test"


@hookimpl
def register_stages(register):
    register(SFTSamples)
    register(SFTSamplesTest)
