"""Training runs for test_distributed.py, each in fresh processes: under torchrun (2 CPU processes,
gloo) or alone. `python distributed_worker.py OUT SCENARIO...` runs the scenarios one after the other
in the same processes; each rank writes what it ended with under OUT/<scenario>/.

    sft    SFT of a tiny Llama, with `eval_every` and the end-of-run evaluation: step 1's gradient
           (before clipping), the final weights
    ilql   ILQL (its loss runs on the bare module, outside the DDP wrapper): the final weights
    kto    KTO, 2 micro-batches per process, policy and reference moved apart (z0 above 0): step
           1's gradient (before clipping) and z0 (`begin_step`'s, over every process's micro-batches)
    ppo    PPO-clip with the adaptive KL controller, `target_kl` and reward normalisation: the
           objective's state, the optimizer steps taken, the final weights
    ppo-penalty  PPO-penalty: its beta, the KL it adapts beta from, the steps taken, the final weights
    rs     rejection sampling keeping the top half of every process's scores: the responses each
           rank kept, the steps taken, the final weights
    grpo, online-dpo  GRPO with dynamic sampling, online DPO dropping tied pairs, under a reward that
           ties half the time: what each rank kept per iteration, the steps taken, the final weights
    bf16   (one process; accelerate fixes the mixed precision per process) PPO-clip and DPO under
           bf16 autocast on CPU: step 1's max |log pi/pi_old| and KL to the reference, DPO's first margin
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_grad_accum import SMALL, RandomSamplesSentiment, nudge, reference_further_away  # noqa: E402

from rlhfzoo.config import load_config  # noqa: E402
from rlhfzoo.interfaces import RewardSource  # noqa: E402
from rlhfzoo.plugins.sentiment import SentimentTask  # noqa: E402
from rlhfzoo.testing import TINY_POLICY  # noqa: E402
from rlhfzoo.trainer import Trainer  # noqa: E402

LLAMA = {**TINY_POLICY, "arch": "llama"}


class LetterReward(RewardSource):
    """The share of letters `e` in prompt + response: scores that vary from any text (an untrained
    policy's gold reward is -1 everywhere), so the online statistics have something to differ on."""

    name = "test-letters"

    def score(self, prompts, responses):
        return torch.tensor([10 * (p + r).count("e") / max(len(p + r), 1) for p, r in zip(prompts, responses)])


class ParityReward(RewardSource):
    """1 for a response of an even number of characters, else 0: about half the groups of two samples
    tie, so dynamic sampling (GRPO) and tie dropping (online DPO) keep different numbers per rank."""

    name = "test-parity"

    def score(self, prompts, responses):
        return torch.tensor([float(len(r) % 2 == 0) for r in responses])


def trainer(out: Path, algorithm: dict, reward: bool | RewardSource = False, **train) -> Trainer:
    data = {
        "task": {"name": "sentiment", **SMALL},
        "policy": LLAMA,
        "algorithm": algorithm,
        "train": {"steps": 2, "batch_size": 8, "lr": 3e-3, "eval_prompts": 0, "progress": False, **train},
        "output_dir": str(out),
    }
    if reward:
        data["reward"] = {"name": "gold"}
    task = RandomSamplesSentiment(SentimentTask.Config(**SMALL))
    source = reward if isinstance(reward, RewardSource) else LetterReward() if reward else None
    return Trainer(load_config(data=data), log=lambda *_: None, task=task, reward=source)


def count_steps(t: Trainer) -> list[int]:
    """The number of optimizer steps taken, kept up to date in the returned list."""
    steps, real = [0], t.optimizer.step

    def step(*args, **kwargs):
        steps[0] += 1
        return real(*args, **kwargs)

    t.optimizer.step = step
    return steps


def save(t: Trainer, out: Path, **extra) -> None:
    state = {k: v.detach().cpu() for k, v in t.policy.module.state_dict().items()}
    torch.save(state, out / f"params-rank{t.rank}.pt")
    (out / f"result-rank{t.rank}.json").write_text(json.dumps({"world": t.world, **extra}))


def first_gradient(t: Trainer) -> list[torch.Tensor]:
    """Step 1's gradient, recorded when the optimizer first steps (in the returned list)."""
    grads, real = [], t.optimizer.step

    def step(*args, **kwargs):
        if not grads:
            grads.append(torch.cat([p.grad.detach().flatten().cpu() for p in t.policy.parameters()]))
        return real(*args, **kwargs)

    t.optimizer.step = step
    return grads


def sft(out: Path) -> None:
    t = trainer(out, {"name": "sft"}, eval_every=1, eval_prompts=4, max_grad_norm=None)
    grads = first_gradient(t)
    t.fit(overwrite=True)
    torch.save(grads[0], out / f"grad-rank{t.rank}.pt")
    save(t, out, counters=dict(t.policy.counters))


def kto(out: Path) -> None:
    t = trainer(out, {"name": "kto", "beta": 0.5}, steps=1, grad_accum=2, max_grad_norm=None)
    reference_further_away(t)  # z0 above 0; then the same moves on both ranks (seeded) as in the test's one-process runs
    nudge(t)
    grads, z0, begin = first_gradient(t), [], t.objective.begin_step

    def recording(batches, policy, reference):
        begin(batches, policy, reference)
        z0.append([b.extra["kl_reference_point"].item() for b in batches])

    t.objective.begin_step = recording
    t.fit(overwrite=True)
    torch.save(grads[0], out / f"grad-rank{t.rank}.pt")
    (out / f"result-rank{t.rank}.json").write_text(json.dumps({"world": t.world, "z0": z0[0]}))


def ilql(out: Path) -> None:
    t = trainer(out, {"name": "ilql", "awac_weight": 0.5})
    t.fit(overwrite=True)
    save(t, out)


def ppo(out: Path) -> None:
    algorithm = {"name": "ppo-clip", "minibatch_size": 2, "epochs": 2, "target_kl": 0.02, "kl_horizon": 100, "normalize_rewards": True}
    t = trainer(out, algorithm, reward=True, lr=1e-2)
    steps = count_steps(t)
    t.fit(overwrite=True)
    save(t, out, steps=steps[0], objective=t.objective.state_dict(), early_stopped=t.objective.early_stopped)


def ppo_penalty(out: Path) -> None:
    # Micro-batches of 1: two per step, the first without the gradient all-reduce (`no_sync`).
    t = trainer(out, {"name": "ppo-penalty", "minibatch_size": 2, "micro_batch_size": 1, "epochs": 1}, reward=True, lr=1e-2)
    steps = count_steps(t)
    t.fit(overwrite=True)
    save(t, out, steps=steps[0], beta=t.objective.beta, measured_kl=t.objective.measured_kl)


def rejection_sampling(out: Path) -> None:
    algorithm = {"name": "rejection-sampling", "n_samples": 2, "keep_percentile": 50, "minibatch_size": 1}
    t = trainer(out, algorithm, reward=True, steps=3)
    steps, kept, after = count_steps(t), [], t.objective.after_iteration

    def recording(metrics):
        kept.append(t.objective.last_metrics["kept"])
        return after(metrics)

    t.objective.after_iteration = recording
    t.fit(overwrite=True)
    save(t, out, steps=steps[0], kept=kept)


def kept_per_rank(out: Path, algorithm: dict) -> None:
    """An online objective that keeps some of each rank's samples: what each rank kept per iteration,
    the optimizer steps taken (minibatches of 1: as many as the rank that kept the most), the weights."""
    t = trainer(out, algorithm, reward=ParityReward(), steps=3)
    steps, kept, make = count_steps(t), [], t.objective.make_experience

    def recording(*args):
        experience = make(*args)
        kept.append(len(experience))
        return experience

    t.objective.make_experience = recording
    t.fit(overwrite=True)
    save(t, out, steps=steps[0], kept=kept)


def grpo(out: Path) -> None:
    kept_per_rank(out, {"name": "grpo", "group_size": 2, "dynamic_sampling": True, "minibatch_size": 1, "beta": 0.1})


def online_dpo(out: Path) -> None:
    kept_per_rank(out, {"name": "online-dpo", "minibatch_size": 1})


def bf16(out: Path) -> None:
    """Under bf16 autocast, step 1 of PPO (policy = rollout policy = reference) and of DPO."""
    t = trainer(out / "ppo", {"name": "ppo-clip", "minibatch_size": 4, "epochs": 1}, reward=True, steps=1, mixed_precision="bf16")
    forward, ratios = t.objective.forward, []

    def recording(batch, policy, entropy=True):
        result = forward(batch, policy, entropy)
        if not ratios:
            mask = batch.extra["mask"].bool()
            ratios.append((result["logprobs"].float() - batch.extra["old_logprobs"])[mask].abs().max().item())
        return result

    t.objective.forward = recording
    t.fit(overwrite=True)
    ppo_kl = json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[0])["kl"]
    t = trainer(out / "dpo", {"name": "dpo"}, steps=1, mixed_precision="bf16")
    t.fit(overwrite=True)
    dpo = json.loads((out / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    result = {"max_abs_log_ratio": ratios[0], "ppo_kl": ppo_kl, "dpo_reward_margin": dpo["reward_margin"], "dpo_kl": dpo["kl"]}
    (out / "result.json").write_text(json.dumps(result))


SCENARIOS = {
    "sft": sft, "ilql": ilql, "kto": kto, "ppo": ppo, "ppo-penalty": ppo_penalty, "rs": rejection_sampling, "grpo": grpo,
    "online-dpo": online_dpo, "bf16": bf16,
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    for name in sys.argv[2:]:
        (root / name).mkdir(parents=True, exist_ok=True)
        SCENARIOS[name](root / name)
