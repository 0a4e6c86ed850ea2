"""The training loops, on accelerate.

    offline:  dataset batches ------------------------------------------> objective.loss -> step
    online:   prompts -> policy.generate -> reward.score -> objective.make_experience
                      -> objective.minibatches -> objective.loss -> step

One `Trainer` runs both. It runs unchanged under `accelerate launch` / `torchrun`: the global
batch of each step (`train.batch_size` examples) is cut into equal slices per process and then
into `train.grad_accum` micro-batches, so N processes x 1 micro-batch compute the same update
as 1 process x N micro-batches.

Run directory (`output_dir`):
    config.yaml          the resolved config
    metrics.jsonl        one JSON object per logged step
    checkpoints/step-N/  weights (safetensors), optimizer, scheduler, RNG states, step; written
                         to a temporary directory and renamed, with a manifest, so a kill
                         mid-write never leaves a checkpoint that looks whole
    policy/              the final policy (transformers format)
    summary.json         written last: a run without it is not finished
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfzoo import artifacts
from rlhfzoo.config import RunConfig
from rlhfzoo.errors import UserError
from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import Batch, Objective, Policy, RewardSource, Task


class TrainingError(UserError, RuntimeError):
    """A run stopped for a reason the user can act on (message says what and where)."""


class NonFiniteError(TrainingError):
    pass


# ------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of the examples of optimizer step `step` (0-based): a deterministic function of
    the step, so a resumed run sees exactly the batches the uninterrupted one would have."""
    rows: list[int] = []
    start = step * batch_size
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), n)
        order = epoch_order(n, epoch, seed)
        rows.extend(order[offset : offset + batch_size - len(rows)])
    return rows


def lr_factor(train) -> Any:
    """Multiplier of the peak learning rate at optimizer step s: linear warm-up, then the schedule."""

    def factor(s: int) -> float:
        if s < train.warmup_steps:
            return (s + 1) / train.warmup_steps
        if train.lr_schedule == "cosine":
            progress = min(1.0, (s - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def peak_rss_mb() -> float:
    """High-water resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (partial ones are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[1]), p) for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
    )
    for _, p in reversed(steps):
        if artifacts.verify(p):
            return p
    return None


class CountingReward(RewardSource):
    """Wraps a reward source and counts the responses it scored (reward-model calls, for budgets)."""

    def __init__(self, inner: RewardSource):
        self.inner, self.config, self.task, self.calls = inner, inner.config, inner.task, 0
        self.name = inner.name

    def score(self, prompts, responses):
        self.calls += len(responses)
        return self.inner.score(prompts, responses)

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), "reward_calls": float(self.calls)}

    def __getattr__(self, attr):  # anything else (e.g. a critique judge's `compare`) goes to the source
        return getattr(self.inner, attr)


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator: Any = None, log=print):
        from accelerate import Accelerator

        self.cfg = cfg
        self.train = cfg.train
        self.log = log
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        per_rank, rem = divmod(self.train.batch_size, self.world * self.train.grad_accum)
        if rem or per_rank == 0:
            raise TrainingError(
                f"train.batch_size={self.train.batch_size} must be a multiple of processes x train.grad_accum "
                f"= {self.world} x {self.train.grad_accum}; change one of them"
            )
        self.micro_batch = per_rank
        self.out = Path(cfg.output_dir)

        if self.train.num_threads:
            torch.set_num_threads(self.train.num_threads)
        seed_everything(self.train.seed)
        self.task: Task = cfg.task.create()
        self.objective: Objective = cfg.algorithm.create()
        policy_cfg = cfg.policy.config
        if self.objective.needs_value_head and "value_head" in type(policy_cfg).model_fields:
            policy_cfg = policy_cfg.model_copy(update={"value_head": True})
        self.policy: Policy = cfg.policy.entry.cls(policy_cfg, task=self.task)
        self.reward: RewardSource | None = CountingReward(cfg.reward.create(task=self.task)) if cfg.reward else None
        self.reference: Policy | None = self.policy.frozen_copy() if self.objective.needs_reference else None
        if self.objective.online and self.reward is None:
            raise TrainingError(f"algorithm {cfg.algorithm.entry.name!r} is online and needs `reward: {{name: ...}}`")
        self.collator = Collator(self.policy.tokenizer, max_length=getattr(self.policy.config, "max_length", 128))
        self.data = self._load_data()
        self.objective.setup(self.policy, self.task)
        if self.objective.prepare(self.data, self.collator, self.reference):
            self.reference = None  # e.g. reference log-probs are cached: free the second model
        if self.reference is not None:
            self.reference.module.to(self.accelerator.device)

        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.train.lr, weight_decay=self.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.train))
        self.policy.model, self.optimizer = self.accelerator.prepare(self.policy.model, self.optimizer)
        self.step = 0

    # -------------------------------------------------------------------------------- data
    def _load_data(self) -> list[Any]:
        kind = self.objective.example_kind()
        data = self.task.examples(kind, split="train")
        need = self.train.batch_size
        if len(data) < need:
            raise TrainingError(
                f"task {self.cfg.task.entry.name!r} has {len(data)} {kind} examples, fewer than train.batch_size={need}; "
                "lower the batch size or provide more data"
            )
        return data

    def _rows_of_step(self, step: int) -> list[int]:
        rows = global_batch(len(self.data), self.train.batch_size, step, self.train.seed)
        per_rank = len(rows) // self.world
        return rows[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _micro_batches(self, rows: list[int]) -> list[Batch]:
        m = self.micro_batch
        return [self.collator([(i, self.data[i]) for i in rows[k : k + m]]) for k in range(0, len(rows), m)]

    # -------------------------------------------------------------------------------- steps
    def _backward_and_step(self, batches: list[Any], step: int) -> dict[str, float]:
        model = self.policy.model
        sums: dict[str, float] = {}
        for k, batch in enumerate(batches):
            last = k == len(batches) - 1
            ctx = nullcontext() if last or self.world == 1 else self.accelerator.no_sync(model)
            with ctx, self.accelerator.autocast():
                out = self.objective.loss(batch.to(self.accelerator.device), self.policy, self.reference)
            if not torch.isfinite(out.loss):
                rows = batch.index.tolist() if hasattr(batch, "index") else "?"
                raise NonFiniteError(
                    f"the loss is {out.loss.item()} at step {step + 1}, micro-batch {k} (dataset rows {rows}). "
                    "Nothing was saved from this step. Lower train.lr, check the data, or use mixed_precision: no."
                )
            with ctx:
                self.accelerator.backward(out.loss / len(batches))
            for key, v in out.metrics.items():
                if key == "loss":  # the loss itself is added below, once
                    continue
                sums[key] = sums.get(key, 0.0) + float(v) / len(batches)
            sums["loss"] = sums.get("loss", 0.0) + out.loss.item() / len(batches)
        if self.train.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), self.train.max_grad_norm)
            norm = float(norm)
            if not math.isfinite(norm):
                raise NonFiniteError(f"the gradient norm is {norm} at step {step + 1}; nothing was saved from this step")
            sums["grad_norm"] = norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _offline_step(self, step: int) -> dict[str, float]:
        return self._backward_and_step(self._micro_batches(self._rows_of_step(step)), step)

    def _online_step(self, step: int) -> dict[str, float]:
        # Objectives that compare several samples of a prompt (rejection sampling) ask for k of each.
        k = int(getattr(self.objective, "samples_per_prompt", 1))
        prompts = [str(self.data[i]) for i in self._rows_of_step(step) for _ in range(k)]
        self.policy.model.eval()
        rollout = self.policy.generate(prompts)
        rewards = self.reward.score(rollout.prompts, rollout.responses).float()
        if not torch.isfinite(rewards).all():
            bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)]
            raise NonFiniteError(
                f"reward source {self.cfg.reward.entry.name!r} returned non-finite rewards at iteration {step + 1} "
                f"for responses {bad[:5]} (e.g. {rollout.responses[bad[0]]!r}); the last good checkpoint is kept"
            )
        self.policy.model.train()
        experience = self.objective.make_experience(rollout, rewards, self.policy, self.reference)
        metrics: dict[str, float] = {"reward": rewards.mean().item()}
        n = 0
        for minibatch_group in self.objective.minibatches(experience):
            group = minibatch_group if isinstance(minibatch_group, list) else [minibatch_group]
            for key, v in self._backward_and_step(group, step).items():
                metrics[key] = metrics.get(key, 0.0) + v
            n += 1
        for key in list(metrics):
            if key != "reward" and n:
                metrics[key] /= n
        return metrics

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{self.rank}.pt")
        if acc.is_main_process:
            self.policy.save_weights(str(tmp / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(self.objective.state_dict(), tmp / "objective.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "world": self.world}))
        acc.wait_for_everyone()
        if acc.is_main_process:
            artifacts.write_manifest(tmp, {"step": self.step})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpts = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
            for old in ckpts[: -self.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if state["world"] != self.world:
            raise TrainingError(f"checkpoint {path} was written by {state['world']} processes, this run has {self.world}")
        self.policy.load_weights(str(path / "model.safetensors"))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        self.objective.load_state_dict(torch.load(path / "objective.pt", weights_only=False))
        set_rng_state(torch.load(path / f"rng-{self.rank}.pt", weights_only=False))
        self.step = state["step"]

    # -------------------------------------------------------------------------------- the loop
    def prepare_output(self, resume: bool, overwrite: bool) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            started = self.out.exists() and any(self.out.iterdir())
            if started and not resume:
                if not overwrite:
                    raise TrainingError(
                        f"output_dir {self.out} already holds a run; continue it with --resume, or start over with --overwrite"
                    )
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "summary.json").unlink(missing_ok=True)
            (self.out / "config.yaml").write_text(self.cfg.to_yaml())
        acc.wait_for_everyone()
        if resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is None:
                self.log(f"[rlhfzoo] --resume: no complete checkpoint in {self.out}; starting from step 0")
            else:
                self.load_checkpoint(ckpt)
                self.log(f"[rlhfzoo] resumed from {ckpt} (step {self.step})")
                # Drop metrics logged after the checkpoint, so the log reads as one run.
                mpath = self.out / "metrics.jsonl"
                if acc.is_main_process and mpath.exists():
                    rows = [r for r in mpath.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
                    mpath.write_text("".join(r + "\n" for r in rows))

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.prepare_output(resume, overwrite)
        acc, tr = self.accelerator, self.train
        log = MetricsLog(self.out / "metrics.jsonl", acc.is_main_process)
        step_fn = self._online_step if self.objective.online else self._offline_step
        stop_at = tr.steps if tr.stop_after is None else min(tr.steps, self.step + tr.stop_after)
        bar = tqdm(total=tr.steps, initial=self.step, disable=not (tr.progress and acc.is_main_process), desc=self.cfg.algorithm.entry.name)
        self.policy.model.train()
        start = time.time()
        while self.step < stop_at:
            metrics = step_fn(self.step)
            metrics.update(self.objective.after_iteration(metrics))
            self.step += 1
            metrics = self._reduce(metrics)
            if tr.eval_every and self.step % tr.eval_every == 0 and self.step < tr.steps:
                metrics.update(self.periodic_eval())
            if self.step % tr.log_every == 0 or self.step == tr.steps or any(k.startswith("eval/") for k in metrics):
                row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], **metrics}
                log.write(row)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "reward", "kl", "accuracy")})
            if tr.save_every and self.step % tr.save_every == 0 and self.step < tr.steps:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        seconds = time.time() - start
        if self.step < tr.steps:  # stopped early on purpose: leave a checkpoint to resume from
            self.save_checkpoint()
            return {"finished": False, "step": self.step}
        return self.finish(seconds)

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    def _reference_for_eval(self) -> Policy | None:
        if self.reference is None and self.objective.needs_reference:  # freed after caching: rebuild it
            self.reference = self.cfg.policy.create(task=self.task).frozen_copy()
        return self.reference

    def periodic_eval(self) -> dict[str, float]:
        """Held-out figures during training (for learning curves), logged as `eval/...`."""
        from rlhfzoo.evaluation import evaluate

        if not self.accelerator.is_main_process or not self.train.eval_prompts:
            return {}
        self.policy.model.eval()
        n = min(self.train.eval_prompts, 64)
        figures = evaluate(self.policy, self.task, self.reward, self._reference_for_eval(), n, seed=self.train.seed)
        self.policy.model.train()
        return {f"eval/{k}": v for k, v in figures.items() if k in ("gold", "proxy", "kl")}

    def finish(self, seconds: float) -> dict[str, Any]:
        from rlhfzoo.evaluation import evaluate

        acc = self.accelerator
        acc.wait_for_everyone()
        summary: dict[str, Any] = {"finished": True, "step": self.step, "train_seconds": seconds}
        if acc.is_main_process:
            self.policy.model.eval()
            own = (
                self.objective.evaluate(
                    self.policy, self.task, reward=self.reward, seed=self.train.seed, n_prompts=self.train.eval_prompts,
                    reference=self._reference_for_eval(), output_dir=str(self.out),
                )
                if self.train.eval_prompts
                else None
            )
            if own is not None:
                summary["eval"] = own
            elif self.train.eval_prompts:
                summary["eval"] = evaluate(
                    self.policy, self.task, self.reward, self._reference_for_eval(), self.train.eval_prompts, seed=self.train.seed
                )
            summary["peak_rss_mb"] = peak_rss_mb()
            summary["counters"] = dict(getattr(self.policy, "counters", {}))
            summary["reward_source"] = self.reward.metrics() if self.reward is not None else {}
            tmp = self.out / ".policy.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.policy.save(str(tmp))
            shutil.rmtree(self.out / "policy", ignore_errors=True)
            os.replace(tmp, self.out / "policy")
            tmp_summary = self.out / ".summary.json.tmp"
            tmp_summary.write_text(json.dumps(summary, indent=1))
            os.replace(tmp_summary, self.out / "summary.json")
        acc.wait_for_everyone()
        return summary


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    return Trainer(cfg, log=log).fit(resume=resume, overwrite=overwrite)
