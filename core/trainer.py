"""The training loops, on accelerate.

    offline:  dataset batches ------------------------------------------> objective.loss -> step
    online:   prompts -> policy.generate -> objective.score_rollout -> objective.make_experience
                      -> objective.minibatches -> objective.loss -> step    (repeated)
                      -> objective.after_iteration

Every optimizer step starts with `objective.begin_step` and ends with `objective.after_step`; the
order of all the Objective hooks is in `rlhfzoo.interfaces.Objective`.

One `Trainer` runs both. It runs unchanged under `accelerate launch` / `torchrun`: the global
batch of each step (`train.batch_size` examples) is cut into equal slices per process and then
into `train.grad_accum` micro-batches, and token-level losses are normalised by the response tokens
of the whole step (`rlhfzoo.ops.step_denominator`), so the update does not depend on the split: N
processes x M micro-batches compute that of 1 process x 1 micro-batch. Only the main process
evaluates, on the bare module (a forward through the DDP wrapper is a collective).

Run directory (`output_dir`, see rlhfzoo.run_dir):
    config.yaml          the resolved config
    metrics.jsonl        one JSON object per logged step
    checkpoints/step-N/  weights, optimizer, scheduler, objective, RNG states, budget counters, step, in
                         safetensors and JSON (rlhfzoo.checkpoint; never pickles); written aside and renamed,
                         with a manifest: a kill mid-write never leaves a checkpoint that looks whole
    policy/              the final policy (transformers format)
    summary.json         written last: a run without it is not finished
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from rlhfzoo import budget, checkpoint, cpu_memory, run_dir, stages, tracking
from rlhfzoo.checkpoint import latest_checkpoint  # noqa: F401  (part of this module's API)
from rlhfzoo.config import ConfigError, RunConfig
from rlhfzoo.counting_reward import CountingReward
from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import Batch, Objective, Policy, RewardSource, Task
from rlhfzoo.ops import across_processes, average_gradients, counts_across_processes, set_step_tokens
from rlhfzoo.schedule import global_batch, lr_factor, peak_rss_mb, seed_everything  # noqa: F401  (part of this module's API)
from rlhfzoo.trainer_checkpoints import Checkpoints
from rlhfzoo.training_errors import NonFiniteError, TrainingError  # noqa: F401  (re-exported)


# ------------------------------------------------------------------------------------ trainer


class Trainer(Checkpoints):
    """One training run of a resolved config. `task`, `policy` and `reward` are plugins built by the
    caller (objects passed to `rlhfzoo.train`); each replaces the one the config's section would build."""

    def __init__(
        self, cfg: RunConfig, accelerator: Any = None, log=print, *,
        task: Task | None = None, policy: Policy | None = None, reward: RewardSource | None = None,
    ):
        from accelerate import Accelerator

        self.cfg = cfg
        self.train = cfg.train
        self.log = log or (lambda *_: None)
        if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise TrainingError(
                "train.mixed_precision=fp16 needs a CUDA GPU and this machine has none (on CPU it would silently "
                "train in fp32); set train.mixed_precision to bf16 or no"
            )
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
            **tracking.accelerator_options(cfg.train.report_to, cfg.output_dir),
        )
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
        if self.train.cpu_allocator == "keep-freed" and self.accelerator.device.type == "cpu":
            cpu_memory.keep_freed_memory()
        given = tuple(name for name, obj in (("task", task), ("policy", policy), ("reward", reward)) if obj is not None)
        # The cached stages the run reads (SFT policy, reward model, ...): constructors only read them.
        stages.build_for(cfg, log=log, task=task, given=given)
        seed_everything(self.train.seed)
        self.task: Task = task if task is not None else cfg.task.create()
        self.objective: Objective = cfg.algorithm.create()
        policy_cfg = cfg.policy.config
        if self.objective.needs_value_head:
            policy_cfg = cfg.policy.entry.cls.with_value_head(policy_cfg)
        self.policy: Policy = policy if policy is not None else cfg.policy.entry.cls(policy_cfg, task=self.task)
        if reward is None and cfg.reward is not None:
            reward = cfg.reward.create(task=self.task)
        self.reward: CountingReward | None = CountingReward(reward) if reward is not None else None
        self.reference: Policy | None = self.policy.frozen_copy() if self.objective.needs_reference else None
        if self.objective.online and self.reward is None:
            raise TrainingError(f"algorithm {cfg.algorithm.entry.name!r} is online and needs `reward: {{name: ...}}`")
        if self.train.budget:
            axis = next(iter(self.train.budget))
            why = budget.held_to(axis, self.objective.online, self.objective.needs_reward)
            if why:
                raise TrainingError(f"train.budget: {cfg.algorithm.entry.name!r} {why}, so a {axis} budget would never end it; "
                                    "give it a budget in seconds, train_tokens, examples or flops")
        self.params = budget.policy_params(self.policy)  # N of the FLOPs estimate (rlhfzoo.budget)
        if self.train.budget and "flops" in self.train.budget and self.params is None:
            raise TrainingError(f"train.budget: policy {cfg.policy.entry.name!r} has no transformers model to count FLOPs of; "
                                "give it a budget in seconds, train_tokens or examples")
        self.budget_record: dict[str, Any] | None = None  # train.budget: what was spent (`budget.report`)
        self.target_step: int | None = None  # the step whose evaluation reached train.eval_target
        self.collator = Collator(self.policy.tokenizer, max_length=getattr(self.policy.config, "max_length", 128))
        self.data = self._load_data()
        self.objective.setup(self.policy, self.task)
        # The reference log-probs cached here are then computed as the loss's, under mixed precision too.
        with self.accelerator.autocast():
            self.objective.prepare(self.data, self.collator, self.reference)
        shares_weights = self.reference is not None and self.reference.module is self.policy.module  # LoRA: adapter off
        if not self.objective.reference_needed_in_training() and policy is None and not shares_weights:
            # E.g. its log-probs are cached: free the second model (evaluation rebuilds it from the
            # config; a given policy's initial weights are in the reference only).
            self.reference = None
        if self.reference is not None:
            self.reference.module.to(self.accelerator.device)

        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.train.lr, weight_decay=self.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.train))
        self.policy.model, self.optimizer = self.accelerator.prepare(self.policy.model, self.optimizer)
        self.ddp = isinstance(self.policy.model, torch.nn.parallel.DistributedDataParallel)
        self.wrapped_forward = False
        if self.ddp:
            self.policy.model.register_forward_pre_hook(self._note_forward)
        if self.world > 1:  # the same seed everywhere would draw correlated rollouts on the processes
            seed_everything(self.train.seed + 1_000_003 * self.rank)
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
    def backward(self, batches: list[Any], step: int = 0) -> dict[str, float]:
        """The backward passes of one optimizer step over its micro-batches on this process: the
        gradient of the step's loss accumulated into `.grad`, the same on every process, whatever the
        split into micro-batches and processes (`ops.set_step_tokens`, then the objective's
        `begin_step` for its own statistics of the step). Returns the micro-batches' metrics,
        averaged over them and over the processes."""
        model = self.policy.model
        set_step_tokens(batches, self.accelerator.device)
        batches = [b.to(self.accelerator.device) for b in batches]  # what `begin_step` writes, `loss` reads
        with self.accelerator.autocast():
            self.objective.begin_step(batches, self.policy, self.reference)
        sums: dict[str, float] = {}
        for k, batch in enumerate(batches):
            last = k == len(batches) - 1
            # Gradients are all-reduced on the last micro-batch only; a context manager serves one `with`.
            no_sync = (lambda: nullcontext()) if last or self.world == 1 else (lambda: self.accelerator.no_sync(model))
            self.wrapped_forward = False
            with no_sync(), self.accelerator.autocast():
                out = self.objective.loss(batch, self.policy, self.reference)
            if not torch.isfinite(out.loss):
                rows = batch.index.tolist() if hasattr(batch, "index") else "?"
                raise NonFiniteError(
                    f"the loss is {out.loss.item()} at step {step + 1}, micro-batch {k} (dataset rows {rows}). "
                    "Nothing was saved from this step. Lower train.lr, check the data, or use mixed_precision: no."
                )
            with no_sync():
                self.accelerator.backward(out.loss / len(batches))
            for key, v in out.metrics.items():
                if key == "loss":  # the loss itself is added below, once
                    continue
                sums[key] = sums.get(key, 0.0) + float(v) / len(batches)
            sums["loss"] = sums.get("loss", 0.0) + out.loss.item() / len(batches)
        if self.ddp and not self.wrapped_forward:
            # The loss bypassed the DDP wrapper (ILQL computes on the bare module): DDP did not
            # average the gradients, so average them here.
            average_gradients(self.policy.parameters())
        return across_processes(sums, device=self.accelerator.device)  # the same figures on every process, for `after_step` to decide on

    def _note_forward(self, module: Any, args: Any) -> None:
        """Forward pre-hook of the DDP-wrapped model: whether the current loss went through it."""
        if torch.is_grad_enabled():
            self.wrapped_forward = True

    def _backward_and_step(self, batches: list[Any], step: int) -> dict[str, float]:
        model = self.policy.model
        sums = self.backward(batches, step)
        if self.train.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), self.train.max_grad_norm)
            norm = float(norm)
            if not math.isfinite(norm):
                raise NonFiniteError(f"the gradient norm is {norm} at step {step + 1}; nothing was saved from this step")
            sums["grad_norm"] = norm
        self.optimizer.step()
        self.check_weights(f"after step {step + 1}")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums.update(self.objective.after_step(sums))
        return sums

    def train_step(self, step: int) -> dict[str, float]:
        """Step `step` (0-based) of the run: one optimizer step offline, one iteration online; its
        metrics on this process, the objective's `after_step` / `after_iteration` figures included."""
        return self._online_step(step) if self.objective.online else self._offline_step(step)

    def _offline_step(self, step: int) -> dict[str, float]:
        return self._backward_and_step(self._micro_batches(self._rows_of_step(step)), step)

    def _online_step(self, step: int) -> dict[str, float]:
        # Objectives that compare several samples of a prompt (rejection sampling) ask for k of each.
        k = self.objective.samples_per_prompt()
        prompts = [self.data[i] for i in self._rows_of_step(step) for _ in range(k)]
        self.policy.model.eval()
        with self.accelerator.autocast():  # rollout and experience log-probs computed as the loss's are
            rollout = self.policy.generate(prompts)
        rewards = self.objective.score_rollout(rollout, self.reward).float()
        if not torch.isfinite(rewards).all():
            bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)]
            raise NonFiniteError(
                f"reward source {self.reward.name!r} returned non-finite rewards at iteration {step + 1} "
                f"for responses {bad[:5]} (e.g. {rollout.responses[bad[0]]!r}); the last good checkpoint is kept"
            )
        self.policy.model.train()
        with self.accelerator.autocast():
            experience = self.objective.make_experience(rollout, rewards, self.policy, self.reference)
        metrics: dict[str, float] = {"reward": rewards.mean().item()}
        n = 0
        for minibatch_group in self.objective.minibatches(experience, self.policy):
            group = minibatch_group if isinstance(minibatch_group, list) else [minibatch_group]
            for key, v in self._backward_and_step(group, step).items():
                metrics[key] = metrics.get(key, 0.0) + v
            n += 1
        for key in list(metrics):
            if key != "reward" and n:
                metrics[key] /= n
        metrics.update(self.objective.after_iteration(metrics))
        return metrics

    def check_weights(self, when: str) -> None:
        """Stop (NonFiniteError) if any weight is NaN or infinite, so that none is ever saved: called
        after every optimizer step and before every save. A NaN or infinite weight makes the L2 norms
        non-finite, so finite ones (a fast fused pass) clear the weights; else the max norm decides (a sum
        of squares can overflow)."""
        params = [p.detach() for p in self.policy.parameters() if p.numel()]
        if not params or torch.isfinite(torch.stack(torch._foreach_norm(params, 2)).sum()):  # ~8x faster than the max norm on CPU
            return
        if torch.isfinite(torch.stack(torch._foreach_norm(params, float("inf"))).max()):
            return
        bad = next((n for n, p in self.policy.module.named_parameters() if not torch.isfinite(p).all()), "?")
        raise NonFiniteError(
            f"the weights are not finite {when} (first: {bad}); nothing from this step was saved and the last good "
            f"checkpoint is kept. The update overflowed: lower train.lr (now {self.train.lr:g}), keep "
            "train.max_grad_norm set, or use train.mixed_precision: no"
        )

    # -------------------------------------------------------------------------------- the loop
    def prepare_output(self, resume: bool, overwrite: bool) -> None:
        """Ready output_dir; on resume load the newest checkpoint, and only then forget what followed it."""
        acc = self.accelerator
        if acc.is_main_process:
            run_dir.make_dir(self.out)
            if not resume:
                run_dir.clear_for_new_run(self.out, overwrite)
                run_dir.write_atomic(self.out / "config.yaml", self.cfg.to_yaml())
        acc.wait_for_everyone()
        if not resume:
            return
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.log(f"[rlhfzoo] --resume: no complete checkpoint in {self.out}; starting from step 0")
        else:
            run_dir.check_config_unchanged(self.out, self.cfg.to_dict())
            self.load_checkpoint(ckpt)
            self.log(f"[rlhfzoo] resumed from {ckpt} (step {self.step})")
        if acc.is_main_process:
            run_dir.forget_after(self.out, self.step, self.log)
            checkpoint.remove_partial(self.out / "checkpoints")
            run_dir.write_atomic(self.out / "config.yaml", self.cfg.to_yaml())
        acc.wait_for_everyone()

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.prepare_output(resume, overwrite)
        acc, tr = self.accelerator, self.train
        log = run_dir.MetricsLog(self.out, acc.is_main_process)
        tracking.start(acc, tr.report_to, self.cfg.to_dict(), self.out)
        stop_at = tr.steps if tr.stop_after is None else min(tr.steps, self.step + tr.stop_after)
        bar = tqdm(total=tr.steps, initial=self.step, disable=not (tr.progress and acc.is_main_process), desc=self.cfg.algorithm.entry.name)
        self.policy.model.train()
        start = time.time()
        last = self.step >= tr.steps  # resumed from the last step: only the end of the run remains
        while self.step < stop_at:
            metrics = self.train_step(self.step)
            self.step += 1
            metrics = across_processes(metrics, device=self.accelerator.device)
            last = self.step == tr.steps
            if tr.budget:
                metrics["budget_spent"] = self.budget_spent(time.time() - start)
                self.budget_record = budget.report(tr.budget, metrics["budget_spent"], self.step, tr.steps)
                last = last or self.budget_record["reached"]
            if tr.eval_every and self.step % tr.eval_every == 0 and not last:
                metrics.update(self.periodic_eval())
                last = self.target_reached(metrics)
            if self.step % tr.log_every == 0 or last or any(k.startswith("eval/") for k in metrics):
                row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "elapsed": time.time() - start, **metrics}
                log.write(row)
                if tr.report_to:
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=self.step)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "reward", "kl", "accuracy")})
            if tr.save_every and self.step % tr.save_every == 0 and not last:
                self.save_checkpoint()
            bar.update(1)
            if last:
                break
        bar.close()
        seconds = time.time() - start
        try:
            if not last:  # stopped early on purpose (stop_after): leave a checkpoint to resume from
                self.save_checkpoint()
                return {"finished": False, "step": self.step}
            summary = self.finish(seconds)
            if tr.report_to:  # the end-of-run evaluation's figures, beside the curves
                final = {f"final/{k}": v for k, v in summary.get("eval", {}).items() if isinstance(v, (int, float))}
                acc.log(final, step=self.step)
            return summary
        finally:
            if tr.report_to:
                acc.end_training()

    def reference_for_eval(self) -> Policy | None:
        if self.reference is None and self.objective.needs_reference:  # freed after caching: rebuild it
            self.reference = self.cfg.policy.create(task=self.task).frozen_copy()
        return self.reference

    @contextmanager
    def evaluating(self):
        """The policy in eval mode with `policy.model` the bare module, for the main process's
        evaluations: a forward through the DDP wrapper is a collective (it broadcasts buffers, e.g.
        Llama's rotary frequencies) that the other processes, not evaluating, would never join.
        Under mixed precision, as in training (the reference's log-probs too)."""
        wrapped = self.policy.model
        self.policy.model = self.accelerator.unwrap_model(wrapped)
        self.policy.model.eval()
        try:
            with self.accelerator.autocast():
                yield
        finally:
            self.policy.model = wrapped
            wrapped.train()

    def periodic_eval(self) -> dict[str, float]:
        """Held-out figures during training (for learning curves), logged as `eval/...`."""
        from rlhfzoo.evaluation import evaluate

        if not self.accelerator.is_main_process or not self.train.eval_prompts:
            return {}
        n = min(self.train.eval_prompts, 64)
        with self.evaluating():
            figures = evaluate(self.policy, self.task, self.reward, self.reference_for_eval(), n, seed=self.train.seed)
        return {f"eval/{k}": v for k, v in figures.items() if k in ("gold", "proxy", "kl")}

    def target_reached(self, metrics: dict[str, float]) -> bool:
        """Whether this step's periodic evaluation reached `train.eval_target` (decided by the main
        process, which evaluates, and shared with the others so that every process stops)."""
        if self.train.eval_target is None:
            return False
        (figure, value), = self.train.eval_target.items()
        reached = 0.0
        if self.accelerator.is_main_process:
            if f"eval/{figure}" not in metrics:
                reports = ", ".join(k.removeprefix("eval/") for k in metrics if k.startswith("eval/")) or "nothing"
                raise ConfigError([("train.eval_target", f"this run's evaluation reports no `{figure}` (it reports {reports}); "
                                    "name one of those, or leave eval_target out")], self.cfg.source)
            reached = float(metrics[f"eval/{figure}"] >= value)
        if counts_across_processes({"reached": reached}, device=self.accelerator.device)["reached"] > 0:
            self.log(f"[rlhfzoo] step {self.step}: held-out {figure} {metrics.get(f'eval/{figure}', float('nan')):.3f} "
                     f">= {value:g} (train.eval_target); ending the run")
            self.target_step = self.step
            return True
        return False

    def budget_spent(self, seconds: float) -> float:
        """How much of `train.budget`'s axis the run has spent so far, over every process (the same
        figure on each, so they all stop at the same step)."""
        calls = self.reward.calls if self.reward is not None else 0
        totals = counts_across_processes({**self.policy.counters, "reward calls": calls, "seconds": seconds}, device=self.accelerator.device)
        axis = next(iter(self.train.budget))
        return budget.spent(axis, totals["seconds"] / self.world, self.step, self.train.batch_size, totals, totals["reward calls"],
                            params=self.params or 0)

    def finish(self, seconds: float) -> dict[str, Any]:
        from rlhfzoo.evaluation import final_evaluation

        acc = self.accelerator
        acc.wait_for_everyone()
        summary: dict[str, Any] = {"finished": True, "step": self.step, "train_seconds": seconds}
        if self.budget_record is not None:
            summary["budget"] = self.budget_record
        if self.train.eval_target is not None:
            summary["eval_target"] = {**self.train.eval_target, "reached_at_step": self.target_step}
        counters = counts_across_processes(self.policy.counters, device=acc.device)  # every process's budget
        if self.params:
            counters["flops"] = budget.flops(counters, self.params)
        if acc.is_main_process:
            if self.train.eval_prompts:
                with self.evaluating():
                    summary["eval"] = final_evaluation(
                        self.objective, self.policy, self.task, self.reward, self.reference_for_eval(), self.train.eval_prompts,
                        seed=self.train.seed, output_dir=str(self.out),
                    )
            summary["peak_rss_mb"] = peak_rss_mb()
            summary["counters"] = counters
            summary["reward_source"] = self.reward.metrics() if self.reward is not None else {}
            self.check_weights(f"before saving the final policy at step {self.step}")
            tmp = self.out / ".policy.tmp"
            with run_dir.disk_errors(self.out, "writing the final policy", cleanup=tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                self.policy.save(str(tmp))
                shutil.rmtree(self.out / "policy", ignore_errors=True)
                os.replace(tmp, self.out / "policy")
            run_dir.write_atomic(self.out / "summary.json", json.dumps(summary, indent=1))
        acc.wait_for_everyone()
        return summary
