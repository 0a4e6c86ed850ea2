"""The three interfaces every plugin implements -- Policy, RewardSource, Objective -- plus Task and
Stage, and (re-exported from `rlhfzoo.data.types`) the small dataclasses that flow between them.

Data flows as *examples* (plain text records, see `Demonstration`, `PreferencePair`, ...) out of a
Task, then as *batches* (token tensors, see `SequenceBatch`) into an Objective's loss. Online
objectives additionally see a `Rollout` (what the policy generated) and build their own
experience from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict

# Examples, batches and rollouts live in rlhfzoo.data.types; re-exported here beside the interfaces.
from rlhfzoo.bench_protocol import BenchProtocol  # noqa: F401  (declared by objectives and policies)
from rlhfzoo.errors import UserError
from rlhfzoo.data.types import (  # noqa: F401
    DataKind, DATA_KINDS, Chat, Text, Demonstration, PreferencePair, UnpairedExample, RewardedExample, SequenceBatch,
    Batch, Rollout, LossOutput,
)

# ------------------------------------------------------------------------------ configs


class PluginConfig(BaseModel):
    """Base class of every plugin's `Config`: unknown keys are errors, every field is described,
    and no float field takes `inf` or `nan` (a non-finite `lr` or `beta` only produces NaN weights)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class EmptyConfig(PluginConfig):
    """A plugin with no options."""


# ------------------------------------------------------------------------------ plugin base: metadata the registry reads


class Plugin:
    """Metadata shared by all plugin classes; subclasses set these class attributes."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    status: ClassVar[Literal["stable", "experimental"]] = "stable"
    Config: ClassVar[type[PluginConfig]] = EmptyConfig

    @classmethod
    def required_stages(cls, config: PluginConfig) -> list[str]:
        """Names of the cached stages (`Stage`) an instance with this config reads, e.g. the task's
        SFT policy for a policy initialised from it. Whoever constructs plugins (the trainer, the
        bench, the command line) builds these first with `rlhfzoo.stages`; a constructor only reads
        them. None by default."""
        return []


# ------------------------------------------------------------------------------ the interfaces


class Policy(Plugin, ABC):
    """A trainable language model with its tokenizer.

    `model` is the `torch.nn.Module` the optimiser updates (the trainer may wrap it for
    distributed training; `module` is always the unwrapped one).

    A policy implements the abstract methods; `counters` needs no code. The other members serve
    the objectives that ask for them (a scalar head, the transformer under the LM head, modules an
    objective attaches) and raise NotImplementedError, naming the policy, where it lacks them.
    """

    model: torch.nn.Module
    tokenizer: Any
    # How `rlhfzoo bench` runs it as a row, for inference-time methods evaluated without training
    # (best-of-n); None: not a bench row.
    bench: ClassVar[BenchProtocol | None] = None

    @property
    def module(self) -> torch.nn.Module:
        m = self.model
        while hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
            m = m.module
        return m

    @property
    def counters(self) -> dict[str, float]:
        """Work done in units comparable across policies (`train_tokens` through training forwards,
        `generated_tokens`, ...), for budgets; the trainer checkpoints, restores and reports it. Empty
        until a policy assigns its own dict, or overrides this with a property (best-of-n)."""
        return vars(self).setdefault("_counters", {})

    @counters.setter
    def counters(self, value: dict[str, float]) -> None:
        self._counters = value

    @abstractmethod
    def generate(self, prompts: Sequence[str], **sampling: Any) -> Rollout:
        """Sample one response per prompt."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **outputs: Any) -> dict[str, torch.Tensor]:
        """`logprobs` [B, T-1], and with `return_values=True` / `return_entropy=True` also
        `values` [B, T] (value head) and `entropy` [B, T-1], from one forward pass."""
        if outputs:
            raise NotImplementedError(f"policy {self.name!r} does not provide {', '.join(outputs)}")
        return {"logprobs": self.logprobs(input_ids, attention_mask)}

    @abstractmethod
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs [B, T-1]: entry t is log pi(input_ids[:, t+1] | input_ids[:, :t+1])."""

    @abstractmethod
    def frozen_copy(self) -> "Policy":
        """A copy with gradients off, for the reference policy (attached modules included)."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Write weights (safetensors), config and tokenizer to a directory, and each attached
        module with the `save` function it was attached with."""

    @abstractmethod
    def save_weights(self, file: str) -> None:
        """Write all trainable weights, attached modules included, to one safetensors file (checkpoints)."""

    @abstractmethod
    def load_weights(self, path: str) -> None:
        """Load a file written by `save_weights` into this policy."""

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return self.model.parameters()

    def kl_reference(self) -> "Policy":
        """The policy whose distribution this one's KL is measured from: itself by default (a copy of
        it before training), the base it samples from for an inference-time method (best-of-n)."""
        return self

    def analytic_kl(self) -> float:
        """KL(self || kl_reference()) per response in closed form, for policies whose bench protocol
        says `kl="analytic"`; the others have their KL estimated from samples."""
        raise NotImplementedError(f"policy {self.name!r} has no closed-form KL")

    def sequence_logprobs(self, seq: SequenceBatch, average: bool = False) -> torch.Tensor:
        """Sum (or mean) of the response tokens' log-probs, per example: [B]."""
        lp = self.logprobs(seq.input_ids, seq.attention_mask)
        mask = seq.response_mask[:, 1:].to(lp.dtype)
        total = (lp * mask).sum(-1)
        return total / mask.sum(-1).clamp(min=1) if average else total

    # The scalar head, for objectives that set `needs_value_head` ------------------------------
    @classmethod
    def with_value_head(cls, config: PluginConfig) -> PluginConfig:
        """`config` (this policy's) with a scalar head added, the one `values` reads. The trainer
        builds the policy from it when the objective sets `needs_value_head`."""
        raise UserError(f"policy {cls.name!r} has no value head, which this objective needs; use a policy that has one")

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The scalar head at every position [B, T] (float32): state values for actor-critic, the
        reward at the last real token for a reward model. Computed through `model`'s forward (so
        DDP synchronises its gradients) without the log-probs; needs a `with_value_head` config."""
        raise NotImplementedError(f"policy {self.name!r} has no value head")

    # The transformer under the LM head, for objectives with heads of their own (ILQL) ---------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, H] of the transformer, which `output_layer` maps to next-token logits;
        positions count real tokens only (left padding shifts nothing). Computed on `module`, unwrapped."""
        raise NotImplementedError(f"policy {self.name!r} does not expose its hidden states")

    def output_layer(self) -> torch.nn.Module:
        """The LM head, logits = h @ weight.T + bias: `.weight` [V, H] and `.bias` [V] or None."""
        raise NotImplementedError(f"policy {self.name!r} does not expose its output layer")

    def transformer(self) -> torch.nn.Module:
        """The module mapping token ids to `hidden_states`: `transformer(input_ids=, attention_mask=,
        position_ids=).last_hidden_state` (a `transformers` base model). ILQL trains a copy of it."""
        raise NotImplementedError(f"policy {self.name!r} does not expose its transformer")

    # Extra trainable modules an objective adds in `Objective.setup` (ILQL's Q/V heads) -------
    def attach(self, name: str, module: torch.nn.Module, save: Callable[[torch.nn.Module, str], None] | None = None) -> torch.nn.Module:
        """Make `module` part of `self.module` as `name` (a new name): optimised, in `save_weights` /
        `load_weights`, copied by `frozen_copy`; `save(dir)` also calls `save(module, dir)` when given.
        Returns the module, on the policy's device."""
        raise NotImplementedError(f"policy {self.name!r} does not take attached modules")

    def attached(self, name: str) -> torch.nn.Module | None:
        """The module attached under `name`, or None."""
        return None


class RewardSource(Plugin, ABC):
    """Turns (prompt, response) texts into scalar rewards.

    Constructed as `cls(config, task=task)`; the task is there for sources that need it (gold).
    """

    # True for a source that scores with the task's own gold reward: evaluations then report it as
    # the gold figure only, not again as a proxy beside it.
    is_gold: ClassVar[bool] = False

    def __init__(self, config: PluginConfig | None = None, task: "Task | None" = None):
        self.config = config if config is not None else self.Config()
        self.task = task

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards [B] (float32)."""

    def compare(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> torch.Tensor:
        """Pairwise judgement [B]: > 0 where response A is better, < 0 where B is, 0 for a tie or no
        verdict. Optional: only sources that judge pairs directly (an LLM judge) implement it."""
        raise NotImplementedError(f"reward source {self.name!r} does not compare responses pairwise")

    def metrics(self) -> dict[str, float]:
        """Counters worth logging (calls, fallbacks, truncations); empty by default."""
        return {}


class Objective(Plugin, ABC):
    """An algorithm: its config, the data it needs and its loss.

    Offline objectives set `data_kind` to one of DATA_KINDS and implement `loss`. Online
    objectives set `online = True`, `data_kind = "prompts"`, and also implement
    `make_experience` (rollout + rewards -> experience) and `minibatches` (experience ->
    batches for `loss`).

    The trainer calls the hooks in this order (every one but `loss` is optional):

        setup(policy, task)                      once, before the optimizer is built
        prepare(data, collate, reference)        once, with the whole training set
        reference_needed_in_training()           once, after `prepare`: False frees the reference model
        offline, each step:
            begin_step(micro-batches) -> loss(micro-batch) ...  -> optimizer step -> after_step(metrics)
        online, each iteration (`train.steps` counts iterations):
            samples_per_prompt() rollouts of each prompt -> score_rollout(rollout, reward)
            make_experience(rollout, rewards, policy, reference)
            for each item of minibatches(experience, policy):
                begin_step(micro-batches) -> loss(micro-batch) ...  -> optimizer step -> after_step(metrics)
            after_iteration(metrics)

    `begin_step` sees all of an optimizer step's micro-batches before their losses (statistics of
    the whole step, e.g. KTO's reference point); `after_step` is the per-optimizer-step hook after
    the update (target-network updates, early stopping within an iteration); `after_iteration` the
    per-iteration one (adaptive KL coefficients, per-iteration counters), never called offline.
    What `after_step` or `after_iteration` returns is logged with the step's metrics.
    """

    data_kind: ClassVar[str] = "demonstrations"
    online: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    needs_reward: ClassVar[bool] = False
    needs_value_head: ClassVar[bool] = False
    # How `rlhfzoo bench` runs it as a row: budget, options, evaluation, KL knob (see BenchProtocol).
    bench: ClassVar[BenchProtocol] = BenchProtocol()

    def __init__(self, config: PluginConfig | None = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def loss(self, batch: Any, policy: Policy, reference: Policy | None) -> LossOutput:
        """The loss on one (micro-)batch."""

    def example_kind(self) -> str:
        """Which of the task's example kinds to train on (`data_kind` unless the config says otherwise)."""
        return self.data_kind

    def inference_policy(self, policy: "Policy") -> "Policy":
        """The policy to sample from after training (ILQL decodes with its value heads); the
        trained policy itself by default. Benchmarks evaluate this."""
        return policy

    def evaluate(self, policy: "Policy", task: "Task", **context: Any) -> dict[str, float] | None:
        """Held-out figures for this objective's output, where sampling from the policy is not the
        right evaluation (e.g. a reward model's pairwise accuracy); None: the default evaluation."""
        return None

    def setup(self, policy: "Policy", task: "Task") -> None:
        """Called once by the trainer with the policy to train and the task, before `prepare` and
        before the optimizer is built: attach extra trainable modules to `policy.module` here
        (ILQL's Q/V heads) so they are optimised and checkpointed with it."""

    def prepare(self, data: Sequence[Any], collate: Callable[[list], Any], reference: "Policy | None") -> None:
        """Called once before training with the whole training set, a collate function taking
        a list of (row, example), and the reference policy (None unless `needs_reference`).
        Offline objectives may cache reference log-probs here (then say so through
        `reference_needed_in_training`)."""

    def reference_needed_in_training(self) -> bool:
        """Whether `loss` / `make_experience` still need the reference model once `prepare` has run.
        The trainer asks once, after `prepare`, and frees the reference model when this is False
        (it builds it again for the evaluations that need it). Default: `needs_reference`; an
        objective that cached the reference's log-probs in `prepare` returns False."""
        return self.needs_reference

    def begin_step(self, batches: list[Any], policy: "Policy", reference: "Policy | None") -> None:
        """Once per optimizer step, before its losses, with all of this process's micro-batches (on the
        device, under autocast, step totals set: the objects `loss` then gets). Compute here statistics
        of the whole step (reduced over processes; every process calls it) into each batch's `extra`, so
        the update does not depend on the split; `loss` must still work without it. Nothing by default."""

    def after_step(self, metrics: dict[str, float]) -> dict[str, float]:
        """Called after every optimizer step, offline and online, with that step's metrics (each
        averaged over the step's micro-batches and processes, so every process decides alike, e.g.
        to stop early); returns extra metrics, logged
        with the step's (online: averaged over the iteration's steps)."""
        return {}

    # Online objectives only -----------------------------------------------------------------
    def samples_per_prompt(self) -> int:
        """Rollouts the trainer draws for each prompt of an iteration, consecutively in the rollout
        (1; rejection sampling compares N samples of a prompt)."""
        return 1

    def score_rollout(self, rollout: Rollout, reward: RewardSource) -> torch.Tensor:
        """The rewards [B] of a rollout that `make_experience` receives: the reward source's scores
        by default; online DPO may instead label pairs with the source's pairwise `compare`."""
        return reward.score(rollout.prompts, rollout.responses)

    def make_experience(
        self, rollout: Rollout, rewards: torch.Tensor, policy: Policy, reference: Policy | None
    ) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is offline and has no experience step")

    def minibatches(self, experience: Any, policy: Policy) -> Iterable[Any]:
        """The iteration's optimizer steps: each item is one step's batch, or a list of its
        micro-batches. A generator resumes after the trainer's `after_step` of the step it
        yielded, so it may stop early on what that hook recorded (PPO's KL early stop), and runs
        its remaining code after the last step (PPO-penalty measures the KL of the update)."""
        raise NotImplementedError(f"{type(self).__name__} is offline and has no experience step")

    def after_iteration(self, metrics: dict[str, float]) -> dict[str, float]:
        """Called after each online iteration (never offline) with its metrics (the reward, the
        step metrics averaged over its optimizer steps); returns extra metrics. Adapt coefficients
        between iterations here (adaptive KL)."""
        return {}

    # Checkpointed state of the objective itself (e.g. an adaptive KL coefficient).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Task(Plugin, ABC):
    """Where data, tokenizers, base models and (where known) the gold reward come from."""

    def __init__(self, config: PluginConfig | None = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def examples(self, kind: str, split: str = "train") -> list[Any]:
        """Examples of a data kind ('demonstrations', 'pairs', ...) for a split ('train', 'test')."""

    @abstractmethod
    def tokenizer(self) -> Any:
        """A `transformers` fast tokenizer with pad and eos set."""

    def eval_prompts(self) -> list[Text]:
        """Held-out prompts to evaluate policies on (texts, or `Chat`s for conversational data)."""
        return list(self.examples("prompts", split="test"))

    def read_summary(self) -> str | None:
        """What reading the task's data did (rows read, kept, skipped and why), for `rlhfzoo data`;
        None for a task that reads no data files."""
        return None

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"task {self.name!r} has no gold reward")

    @property
    def has_gold_reward(self) -> bool:
        return type(self).gold_reward is not Task.gold_reward

    def default_reward(self) -> dict[str, Any] | None:
        """The reward section (`{name: ..., **options}`) online algorithms train against when the
        user names none (`rlhfzoo bench` without `--reward`): e.g. the task's reward model. None: the
        user must name one."""
        return None

    def default_model_config(self) -> dict[str, Any]:
        """Options for a model trained from scratch on this task (architecture sizes)."""
        return {}

    def provides(self, kind: str) -> bool:
        """Whether the task has examples of a data kind. By default: whether `examples(kind, "test")`
        answers without an error; a task whose examples come from a stage answers without it."""
        try:
            self.examples(kind, split="test")
        except (ValueError, KeyError, NotImplementedError):
            return False
        return True

    def stages_for(self, kind: str) -> list[str]:
        """Names of the cached stages (`Stage`) that `examples(kind, ...)` reads, for either split
        (e.g. the SFT samples a task derives its preference data from). Built before the task's
        examples are asked for; none by default."""
        return []

    def sft_task_options(self) -> dict[str, Any]:
        """The task options the SFT stage depends on (its cache key); all of them by default."""
        return self.config.model_dump(mode="json")

    def sft_recipe(self) -> dict[str, Any]:
        """Train settings (`TrainConfig` fields) of this task's cached SFT stage."""
        return {"steps": 300, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20}

    def response_metrics(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Task-specific quality figures of generated responses (e.g. grammatical rate)."""
        return {}


class Stage(Plugin, ABC):
    """A cached, expensive step whose output other plugins read: a task's SFT policy, its reward
    model, a critique judge, samples that preference data is derived from.

    `rlhfzoo.stages` builds a stage once per key: `requires` first, then `build`, into a temporary
    directory that becomes the artifact `<cache>/<artifact>/<hash of key(task)>/` (see
    `rlhfzoo.artifacts`); `stages.path(name, task)` returns the output inside it (`output`) or
    says how to build it. Plugins declare the stages they read (`Plugin.required_stages`,
    `Task.stages_for`), so the trainer, the bench and the command line build them before any
    constructor runs, and constructors never train.
    """

    requires: ClassVar[tuple[str, ...]] = ()  # stages built before this one
    artifact: ClassVar[str] = ""  # the cache directory (default: the name); variants of one stage may share it
    output: ClassVar[str] = ""  # where the output lies inside the artifact, e.g. "run/policy"

    def __init__(self, config: PluginConfig | None = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def key(self, task: Task) -> dict[str, Any]:
        """Everything the output depends on for this task (JSON-able); its hash names the artifact."""

    @abstractmethod
    def build(self, directory: Path, task: Task, log: Callable[[str], None] | None, progress: bool = False) -> None:
        """Write the output into `directory` (a temporary one, renamed into place when this returns).
        `progress`: show the progress bar of what runs (e.g. a nested training run)."""

    def adopts(self, cfg: Any, run_dir: Path) -> bool:
        """Whether the finished `rlhfzoo train` run of config `cfg` in `run_dir` produced exactly this
        stage's output for its task (so it can be cached as the stage instead of training it again)."""
        return False

    def adopt(self, cfg: Any, run_dir: Path, directory: Path) -> None:
        """Write the output of an adopted run (see `adopts`) into `directory`, as `build` would."""
        raise NotImplementedError(f"stage {self.name!r} adopts no run")
