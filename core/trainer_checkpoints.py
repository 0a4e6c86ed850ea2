"""The trainer's checkpoints: what `Trainer` writes every `train.save_every` steps (and when
`stop_after` ends an invocation) and restores on `--resume` -- the policy's weights, optimizer,
scheduler and objective states on the main process, each process's RNG states and budget
counters -- written to a temporary directory and renamed into place, so a killed run leaves
either a whole checkpoint or none. The formats are `rlhfzoo.checkpoint`'s; nothing is unpickled."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from rlhfzoo import artifacts, checkpoint, run_dir
from rlhfzoo.training_errors import TrainingError


class Checkpoints:
    """Checkpointing of a `Trainer` (a base class of it: it reads the trainer's accelerator,
    output directory, step, policy, optimizer, scheduler, objective and reward)."""

    def _process_state(self) -> dict[str, Any]:
        """What each process restores on resume: its RNG states and its budget counters."""
        calls = self.reward.calls if self.reward is not None else 0
        return {"rng": checkpoint.rng_state(), "counters": dict(self.policy.counters), "reward_calls": calls}

    def _restore_process_state(self, state: dict[str, Any]) -> None:
        checkpoint.set_rng_state(state["rng"])
        self.policy.counters.update({k: int(v) for k, v in state["counters"].items()})
        if self.reward is not None:
            self.reward.calls = int(state["reward_calls"])

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        root = self.out / "checkpoints"
        final, tmp = root / f"step-{self.step:06d}", root / f".tmp-step-{self.step:06d}"
        self.check_weights(f"before saving checkpoint {final.name} at step {self.step}")
        doing = f"writing checkpoint {final.name}"
        if acc.is_main_process:
            with run_dir.disk_errors(self.out, doing):
                checkpoint.remove_partial(root)  # this one's and any left by a killed run
                tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with run_dir.disk_errors(self.out, doing, cleanup=tmp):
            checkpoint.save_state(self._process_state(), tmp / checkpoint.process_stem(self.rank), "process state")
            if acc.is_main_process:
                self.policy.save_weights(str(tmp / "model.safetensors"))
                checkpoint.save_state(self.optimizer.state_dict(), tmp / "optimizer", "optimizer.state_dict()")
                checkpoint.save_state(self.scheduler.state_dict(), tmp / "scheduler", "scheduler.state_dict()")
                checkpoint.save_state(self.objective.state_dict(), tmp / "objective", "objective.state_dict()")
                meta = {"format": checkpoint.FORMAT, "step": self.step, "world": self.world}
                (tmp / "state.json").write_text(json.dumps(meta))
        acc.wait_for_everyone()
        if acc.is_main_process:
            with run_dir.disk_errors(self.out, doing, cleanup=tmp):
                artifacts.write_manifest(tmp, {"step": self.step})
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            ckpts = sorted(p for p in root.iterdir() if checkpoint.STEP_DIR.fullmatch(p.name))
            for old in ckpts[: -self.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything from a checkpoint of checkpoint.FORMAT (anything else is refused unread)."""
        meta = checkpoint.check_format(path, self.rank)
        if meta["world"] != self.world:
            raise TrainingError(f"checkpoint {path} was written by {meta['world']} processes, this run has {self.world}")
        try:
            self.policy.load_weights(str(path / "model.safetensors"))
            self.optimizer.load_state_dict(checkpoint.load_state(path / "optimizer"))
            self.scheduler.load_state_dict(checkpoint.load_state(path / "scheduler"))
            self.objective.load_state_dict(checkpoint.load_state(path / "objective"))
            self._restore_process_state(checkpoint.load_state(path / checkpoint.process_stem(self.rank)))
        except TrainingError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise TrainingError(
                f"checkpoint {path} does not fit this run ({type(e).__name__}: {e}); start over with --overwrite"
            ) from e
        self.step = int(meta["step"])
