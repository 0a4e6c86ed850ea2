"""The contracts every plugin must meet, usable by third-party plugin authors. Each check raises
AssertionError on a breach, naming the plugin and what broke.

    from rlhfzoo.testing import check_objective

    def test_my_objective(tmp_path):
        check_objective("my-algo", tmp_path)

Two optimizer steps on a tiny policy with the objective's data kind (or, for online objectives,
one iteration of rollout -> reward -> experience -> updates) through the real trainer, then:
the loss is finite, the parameters changed, and a checkpoint written and read back restores
the weights, the optimizer and the objective's state exactly. The trainer builds the cached
stages the run reads first (e.g. the SFT samples sentiment's pairs come from). The reward source
is the task's (gold by default) plus a deterministic term in [0, 0.1) from each response's text
(`DistinctScores`): a scratch policy's samples all get the same gold reward (-1 on sentiment, 0 on
arithmetic), which leaves group-relative objectives (GRPO, RLOO) no advantage to learn from;
with the term, two different responses to a prompt differ in reward.

A stage's contract, checked without building it (that may take minutes), `check_stage`:

    check_stage("my-stage", task="sentiment")

The other kinds are checked on a built instance, and never train (`rlhfzoo.stages` builds what
they read only when asked to, with `build_stages=True`):

    check_task("my-task", **task_options)                   # tokenizer, examples, gold reward, ...
    check_reward_source("my-rm", task="sentiment", **opts)  # score, compare, metrics
    check_policy("my-lm", task="sentiment", **opts)         # generate, logprobs, copies, files, counters

The tasks, policies and reward sources these default to are the registry's `DEFAULTS`.
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from rlhfzoo import stages
from rlhfzoo.config import load_config
from rlhfzoo.counting_reward import CountingReward
from rlhfzoo.data.collate import sequence_batch
from rlhfzoo.evaluation import sample
from rlhfzoo.interfaces import DATA_KINDS, Chat, Demonstration, Policy, PreferencePair, RewardedExample, RewardSource, Task, UnpairedExample
from rlhfzoo.registry import DEFAULTS, registry
from rlhfzoo.trainer import Trainer

TINY_POLICY = {"name": DEFAULTS["policy"], "init": "scratch", "n_layer": 1, "n_embd": 32, "n_head": 2, "max_new_tokens": 12}


def contract_config(
    objective: str, output_dir: str | Path, task: str | dict = DEFAULTS["task"], reward: str | None = DEFAULTS["reward_source"], **options: Any
) -> dict:
    """The run config of the contract: `task` is a name or a section with options (`{name: ..., path: ...}`)."""
    data: dict[str, Any] = {
        "task": dict(task) if isinstance(task, dict) else {"name": task},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": objective, **options},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(output_dir),
    }
    if reward:
        data["reward"] = {"name": reward}
    return data


# ------------------------------------------------------------------------------ objectives and stages


class DistinctScores(RewardSource):
    """A reward source plus 0.1 x a hash of each response's text in [0, 1): different responses
    get different rewards (see the module docstring); `compare` orders pairs by those scores."""

    def __init__(self, inner: RewardSource):
        super().__init__(inner.config, task=inner.task)
        self.inner, self.name = inner, inner.name

    def score(self, prompts, responses) -> torch.Tensor:
        spread = torch.tensor([zlib.crc32(r.encode()) % 1000 / 1000 for r in responses], dtype=torch.float32)
        return self.inner.score(prompts, responses).float().cpu() + 0.1 * spread

    def compare(self, prompts, responses_a, responses_b) -> torch.Tensor:
        return torch.sign(self.score(prompts, responses_a) - self.score(prompts, responses_b))


def check_objective(
    objective: str, output_dir: str | Path, task: str | dict = DEFAULTS["task"], reward: str | None = DEFAULTS["reward_source"], **options: Any
) -> dict:
    """Run the contract on a registered objective; raises AssertionError on a breach. An objective
    that needs a value head gets one: the policy's `values` are [B, T]. `task`: a task name, or a
    task section with its options, e.g. `{"name": "dataset", "path": "pairs.jsonl"}`."""
    cfg = load_config(data=contract_config(objective, output_dir, task, reward, **options))
    trainer = Trainer(cfg, log=lambda *_: None)
    if trainer.reward is not None:
        trainer.reward = CountingReward(DistinctScores(trainer.reward.inner))
    if trainer.objective.needs_value_head:
        seq = sequence_batch(trainer.policy.tokenizer, [(p, "") for p in trainer.task.eval_prompts()[:2]], 64)
        device = next(trainer.policy.module.parameters()).device
        with torch.no_grad():
            values = trainer.policy.values(seq.input_ids.to(device), seq.attention_mask.to(device))
        assert tuple(values.shape) == tuple(seq.input_ids.shape), f"{objective}: values {tuple(values.shape)}, expected [B, T]"
        assert torch.isfinite(values).all(), f"{objective}: values not finite"
    before = {k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}

    trainer.prepare_output(resume=False, overwrite=True)
    metrics = {}
    for step in range(2):
        metrics = trainer.train_step(step)
        trainer.step = step + 1
        assert "loss" in metrics and torch.isfinite(torch.tensor(metrics["loss"])), f"{objective}: loss not finite: {metrics}"
        for k, v in metrics.items():
            assert isinstance(v, float), f"{objective}: metric {k!r} is {type(v).__name__}, expected float"

    after = trainer.policy.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"{objective}: two optimizer steps changed no parameter"

    ckpt = trainer.save_checkpoint()
    saved = {k: v.detach().clone() for k, v in after.items()}
    saved_objective = trainer.objective.state_dict()
    opt_state = trainer.optimizer.state_dict()["state"]
    # Perturb, then restore from the checkpoint.
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(1.0)
    trainer.load_checkpoint(ckpt)
    restored = trainer.policy.module.state_dict()
    for k in saved:
        assert torch.equal(saved[k], restored[k]), f"{objective}: checkpoint did not restore {k}"
    assert trainer.step == 2
    assert _nested_equal(trainer.objective.state_dict(), saved_objective), f"{objective}: objective state not restored"
    reloaded = trainer.optimizer.state_dict()["state"]
    for i in opt_state:
        for k, v in opt_state[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(reloaded[i][k])), f"{objective}: optimizer state {k}"
    return metrics


def _nested_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    return a == b


def check_stage(name: str, task: str = DEFAULTS["task"], **task_options: Any) -> dict[str, Any]:
    """The contract of a registered stage, without building it: its key for the task is a non-empty
    JSON object (no stand-in string conversions) and the same for an equal task, what it requires
    is registered and free of cycles, and its output lies inside its artifact. Returns the key."""
    stage = stages.get(name)
    key = stage.key(registry.create("task", task, dict(task_options)))
    assert isinstance(key, dict) and key, f"stage {name!r}: key() must be a non-empty dict, got {key!r}"
    text = json.dumps(key, sort_keys=True)  # raises on anything JSON cannot hold exactly
    again = stage.key(registry.create("task", task, dict(task_options)))
    assert json.dumps(again, sort_keys=True) == text, f"stage {name!r}: key() differs between two equal tasks"

    def requirements(n: str, chain: tuple[str, ...]) -> None:
        assert n not in chain, f"stage {name!r}: stages require each other in a cycle: {' -> '.join([*chain, n])}"
        for r in registry.get("stage", n).cls.requires:
            requirements(registry.get("stage", r).name, (*chain, n))

    requirements(registry.get("stage", name).name, ())
    output = PurePosixPath(stage.output)
    assert not output.is_absolute() and ".." not in output.parts, f"stage {name!r}: output {stage.output!r} leaves the artifact"
    return key


# ------------------------------------------------------------------------------ tasks

# The example type of each data kind, and the fields of it that hold the prompt and the responses.
EXAMPLE_TYPES: dict[str, tuple[type | tuple[type, ...], str | None, tuple[str, ...]]] = {
    "demonstrations": (Demonstration, "prompt", ("response",)),
    "pairs": (PreferencePair, "prompt", ("chosen", "rejected")),
    "unpaired": (UnpairedExample, "prompt", ("response",)),
    "rewarded": (RewardedExample, "prompt", ("response",)),
    "prompts": ((str, Chat), None, ()),
}


def check_task(name: str, **options: Any) -> dict[str, Any]:
    """The contract of a registered task, built with `options`: its tokenizer is a fast one with pad
    and eos; every data kind of `DATA_KINDS` it `provides` has, in both splits, a non-empty list of
    the kind's example type with non-empty prompts and not only empty responses (rewards finite);
    `eval_prompts()` are non-empty strings; `has_gold_reward` says whether `gold_reward` answers
    (finite float32 [B]) or raises NotImplementedError; `default_model_config()` holds options of
    the default policy only; `stages_for` names registered stages.

    A kind whose examples read stages (`stages_for`) is checked only if they are built: nothing
    here trains. Returns {"checked": {kind: {split: count}}, "skipped": {kind: why}, "absent": [kind]}."""
    task = registry.create("task", name, dict(options))
    tok = task.tokenizer()
    assert getattr(tok, "is_fast", False), f"task {name!r}: tokenizer() must be a fast tokenizer, got {type(tok).__name__}"
    assert tok.pad_token_id is not None and tok.eos_token_id is not None, f"task {name!r}: the tokenizer needs pad and eos set"

    report: dict[str, Any] = {"checked": {}, "skipped": {}, "absent": []}
    for kind in DATA_KINDS:
        needed = task.stages_for(kind)
        unknown = [s for s in needed if not any(e.kind == "stage" for e in registry.find(s))]
        assert not unknown, f"task {name!r}: stages_for({kind!r}) names unregistered stages {unknown}"
        if not task.provides(kind):
            report["absent"].append(kind)
            continue
        missing = [stage for stage in needed if not _built(stage, task)]
        if missing:
            report["skipped"][kind] = f"reads the stages {', '.join(missing)}, not built (checking never trains)"
            continue
        report["checked"][kind] = {split: _check_examples(task, kind, split) for split in ("train", "test")}

    prompts = task.eval_prompts()
    assert isinstance(prompts, list) and prompts, f"task {name!r}: eval_prompts() must be a non-empty list"
    assert all(isinstance(p, (str, Chat)) and str(p).strip() for p in prompts), f"task {name!r}: eval_prompts() must be non-empty texts or chats"

    probe_prompts, probe_responses = _probe_texts(task, 3, long=False)
    if task.has_gold_reward:
        _check_rewards(task.gold_reward(probe_prompts, probe_responses), 3, f"task {name!r}: gold_reward")
    else:
        try:
            task.gold_reward(probe_prompts, probe_responses)
        except NotImplementedError:
            pass
        else:
            raise AssertionError(f"task {name!r}: has_gold_reward is False, yet gold_reward() answers")

    model = task.default_model_config()
    assert isinstance(model, dict), f"task {name!r}: default_model_config() must be a dict"
    unknown = sorted(set(model) - set(registry.get("policy", DEFAULTS["policy"]).cls.Config.model_fields))
    assert not unknown, f"task {name!r}: default_model_config() has keys the default policy does not know: {unknown}"
    return report


def _built(stage: str, task: Task) -> bool:
    """Whether `stage` is built for `task` (`stages.path` only looks; it builds nothing)."""
    try:
        stages.path(stage, task)
    except stages.StageNotBuilt:
        return False
    return True


def _check_examples(task: Task, kind: str, split: str) -> int:
    what = f"task {task.name!r}: examples({kind!r}, {split!r})"
    rows = task.examples(kind, split)
    assert isinstance(rows, list) and rows, f"{what} must be a non-empty list"
    cls, prompt_field, response_fields = EXAMPLE_TYPES[kind]
    bad = [r for r in rows if not isinstance(r, cls)]
    expected = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
    assert not bad, f"{what} holds a {type(bad[0]).__name__}, expected {expected}: {bad[0]!r:.200}"
    prompts = rows if prompt_field is None else [getattr(r, prompt_field) for r in rows]
    assert all(isinstance(p, (str, Chat)) and str(p).strip() for p in prompts), f"{what}: every prompt must be non-empty text or a chat"
    responses = [getattr(r, f) for r in rows for f in response_fields]
    assert all(isinstance(r, (str, Chat)) for r in responses), f"{what}: responses must be text or chats"
    assert not responses or any(str(r).strip() for r in responses), f"{what}: every response is empty"
    if kind == "rewarded":
        assert all(math.isfinite(r.reward) for r in rows), f"{what}: rewards must be finite"
    if kind == "unpaired":
        assert all(isinstance(r.desirable, bool) for r in rows), f"{what}: `desirable` must be a bool"
    return len(rows)


def _probe_texts(task: Task, n: int, long: bool = True) -> tuple[list[str], list[str]]:
    """`n` of the task's eval prompts and responses to them: one of its own demonstrations' responses
    (where it has them without a stage), an empty one and, if `long`, that response repeated far
    past any context length, in turn."""
    prompts = task.eval_prompts()
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    response = prompts[-1]
    if task.provides("demonstrations") and not task.stages_for("demonstrations"):
        response = task.examples("demonstrations", "test")[0].response or response
    cycle = [response, "", " ".join([response] * 50)] if long else [response, ""]
    return prompts, [cycle[i % len(cycle)] for i in range(n)]


def _check_rewards(rewards: Any, n: int, what: str, dtype: torch.dtype | None = torch.float32) -> None:
    """`rewards` is a finite tensor [n] (of `dtype`, unless None)."""
    assert isinstance(rewards, torch.Tensor), f"{what} must return a tensor, got {type(rewards).__name__}"
    assert tuple(rewards.shape) == (n,), f"{what}: shape {tuple(rewards.shape)}, expected [{n}]"
    assert dtype is None or rewards.dtype == dtype, f"{what}: {rewards.dtype}, expected {dtype}"
    assert torch.isfinite(rewards).all(), f"{what}: not finite: {rewards.tolist()}"


def _task(task: str | Task) -> Task:
    return registry.create("task", task) if isinstance(task, str) else task


def _create(kind: str, name: str, task: Task, build_stages: bool, options: dict[str, Any]) -> Any:
    """The plugin built for `task`, after building the stages it reads if `build_stages`."""
    entry = registry.get(kind, name)
    config = entry.cls.Config(**options)
    if build_stages:
        for stage in entry.cls.required_stages(config):
            stages.build(stage, task, log=None)
    return entry.cls(config, task=task)


# ------------------------------------------------------------------------------ reward sources


def check_reward_source(name: str, task: str | Task = DEFAULTS["task"], build_stages: bool = False, **options: Any) -> dict[str, Any]:
    """The contract of a registered reward source, built with `options` for `task` (a name or a
    task). The stages it reads (`required_stages`) must be built already, unless `build_stages`.

    `score` gives finite float32 [B] for B prompts and responses (one of them empty, one far longer
    than any context), the same on a second call; `compare` raises NotImplementedError or gives [B]
    with compare(a, b) = -compare(b, a) (so 0 for a response against itself); `metrics()` is a
    dict of floats. Returns the metrics."""
    task = _task(task)
    source: RewardSource = _create("reward_source", name, task, build_stages, options)
    what = f"reward source {name!r}"
    prompts, responses = _probe_texts(task, 4)
    first = source.score(prompts, responses)
    _check_rewards(first, 4, f"{what}: score")
    again = source.score(prompts, responses)
    assert torch.equal(first, again), f"{what}: score differs between two calls: {first.tolist()} then {again.tolist()}"

    others = [responses[0], *responses[:3]]  # the first pair: a response against itself
    try:
        forward = source.compare(prompts, responses, others)
    except NotImplementedError:
        pass
    else:
        backward = source.compare(prompts, others, responses)
        _check_rewards(forward, 4, f"{what}: compare", dtype=None)
        assert torch.allclose(forward, -backward), f"{what}: compare(a, b) {forward.tolist()} != -compare(b, a) {backward.tolist()}"

    metrics = source.metrics()
    assert isinstance(metrics, dict), f"{what}: metrics() must be a dict"
    wrong = {k: v for k, v in metrics.items() if not isinstance(k, str) or not isinstance(v, float)}
    assert not wrong, f"{what}: metrics() must map names to floats: {wrong}"
    return metrics


# ------------------------------------------------------------------------------ policies


def check_policy(name: str, task: str | Task = DEFAULTS["task"], build_stages: bool = False, **options: Any) -> dict[str, float]:
    """The contract of a registered policy, built with `options` for `task` (a name or a task). The
    stages it reads (`required_stages`) must be built already, unless `build_stages`.

    `generate` on 3 prompts (one far longer than any context) gives a Rollout of consistent shapes
    (sequences, attention and response masks [B, T], log-probs [B, T-1], zero off the response,
    finite and <= 0 on it, B responses) that `logprobs` of its sequences reproduces on the response; `frozen_copy` has no trainable
    parameters and the same log-probs; weights written by `save_weights` and perturbed come back
    exactly with `load_weights`; `save` writes files; `counters` is a dict of numbers that
    `generate` increases. Returns the counters after generating."""
    task = _task(task)
    policy: Policy = _create("policy", name, task, build_stages, options)
    what = f"policy {name!r}"
    policy.module.eval()  # no dropout: log-probs computed twice must agree

    prompts = _probe_texts(task, 2)[0]
    prompts.append(" ".join(prompts * 40))  # far longer than any context: generate must cut it
    before = _counters(policy, what)
    rollout = sample(policy, prompts)[0]
    after = _counters(policy, what)
    assert after.keys() >= before.keys() and all(after[k] >= before[k] for k in before), f"{what}: counters went down: {before} -> {after}"
    assert any(after[k] > before.get(k, 0) for k in after), f"{what}: generate increased no counter: {after}"

    B, T = rollout.sequences.shape
    assert B == 3 and len(rollout.responses) == B, f"{what}: {B} sequences and {len(rollout.responses)} responses for 3 prompts"
    for field in ("attention_mask", "response_mask"):
        assert tuple(getattr(rollout, field).shape) == (B, T), f"{what}: rollout.{field} is {tuple(getattr(rollout, field).shape)}, expected {(B, T)}"
    assert tuple(rollout.logprobs.shape) == (B, T - 1), f"{what}: rollout.logprobs is {tuple(rollout.logprobs.shape)}, expected {(B, T - 1)}"
    assert (rollout.response_mask <= rollout.attention_mask).all(), f"{what}: response tokens outside the attention mask"
    on = rollout.response_mask[:, 1:].bool()
    assert on.any(), f"{what}: the rollout has no response token"
    lp = rollout.logprobs.float()
    assert torch.isfinite(lp[on]).all() and (lp[on] <= 0).all(), f"{what}: response log-probs must be finite and <= 0"
    assert (lp[~on] == 0).all(), f"{what}: rollout log-probs must be 0 off the response"

    mine = _logprobs(policy, rollout)
    assert torch.allclose(mine[on], lp[on], atol=1e-4, rtol=1e-3), (
        f"{what}: logprobs() of the rollout's sequences differ from the rollout's by up to {(mine[on] - lp[on]).abs().max():.3g}"
    )
    frozen = policy.frozen_copy()
    params = list(frozen.parameters())
    assert params and not any(p.requires_grad for p in params), f"{what}: frozen_copy() has trainable parameters"
    assert torch.allclose(_logprobs(frozen, rollout), mine, atol=1e-5), f"{what}: frozen_copy() gives other log-probs"

    with tempfile.TemporaryDirectory() as directory:
        _check_weight_files(policy, Path(directory), what)
    return after


def _counters(policy: Policy, what: str) -> dict[str, float]:
    counters = policy.counters
    assert isinstance(counters, dict), f"{what}: counters must be a dict, got {type(counters).__name__}"
    wrong = {k: v for k, v in counters.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
    assert not wrong, f"{what}: counters must be numbers: {wrong}"
    return dict(counters)


@torch.no_grad()
def _logprobs(policy: Policy, rollout: Any) -> torch.Tensor:
    device = next(policy.module.parameters()).device
    return policy.logprobs(rollout.sequences.to(device), rollout.attention_mask.to(device)).float().cpu()


def _check_weight_files(policy: Policy, directory: Path, what: str) -> None:
    """save_weights -> perturb -> load_weights restores every weight exactly; save writes files."""
    file = directory / "weights.safetensors"
    policy.save_weights(str(file))
    saved = {k: v.detach().clone() for k, v in policy.module.state_dict().items()}
    with torch.no_grad():
        for p in policy.module.parameters():
            if p.requires_grad:  # the weights a policy trains (and saves): a LoRA policy's frozen base is not among them
                p.add_(1.0)
    perturbed = policy.module.state_dict()
    assert any(not torch.equal(saved[k], perturbed[k]) for k in saved), f"{what}: has no weights to perturb"
    policy.load_weights(str(file))
    restored = policy.module.state_dict()
    assert restored.keys() == saved.keys(), f"{what}: load_weights changed the module's entries"
    for k in saved:
        assert torch.equal(saved[k], restored[k]), f"{what}: load_weights did not restore {k}"
    policy.save(str(directory / "saved"))
    assert any(p.is_file() for p in (directory / "saved").rglob("*")), f"{what}: save(dir) wrote no file"
