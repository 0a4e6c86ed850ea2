"""The checks of `rlhfzoo bench --checks` that train models (the others: `rlhfzoo.bench_checks`).

    ptx alignment tax  Ouyang et al. 2022 (Sec. 4.2): PPO with `ptx_coef: 0` and > 0 at PPO's bench
                       budget, same seeds; the tax is the rise of the held-out demonstrations' mean
                       per-token NLL over the SFT policy's, compared by a paired t interval over seeds,
                       the gold reward on held-out prompts beside it
    reward collapse    Song et al. 2023: reward models trained on K-wise rankings with one
                       prompt-agnostic utility; the per-prompt reward spread of prompts whose
                       responses differ little against prompts whose responses differ much (their
                       gold spreads), measured on the ranked training prompts and held-out ones

Each returns `bench_checks.record(...)`. The statistics (`paired_interval`, `spread_groups`,
`spread_figures`, `population_std`) are pure and hand-checkable; the trainings run through the real
`Trainer`'s steps in this process, writing no run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rlhfzoo import stages
from rlhfzoo.bench_checks import FixedPairs, Log, record
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Policy, Task
from rlhfzoo.registry import DEFAULTS

LEVEL = 0.95  # the paired intervals' confidence level
PTX_PAPER = "Ouyang et al. 2022, arXiv:2203.02155 (Sec. 4.2)"
PTX_CLAIM = ("Mixing pretraining gradients into PPO (PPO-ptx) reduces the performance regression on the pretraining "
             "distribution (the alignment tax) at little cost in reward.")
# gamma of PPO-ptx. InstructGPT's 27.8 weighs a per-sequence log-likelihood against a per-sequence reward; here the
# ptx NLL is a token mean against PPO's token mean of whitened advantages (order 1), so gamma ~ 1 weighs them alike.
# A pilot at the bench budget on seed 100 (outside the check's seeds): tax 0.71 nats/token for PPO, 0.24 / 0.11 /
# 0.04 at gamma 0.1 / 0.3 / 1 (1: seeds 0-2), keeping 67 / 36 / 21 % of PPO's gold gain over SFT: 0.1, the one that
# keeps most of the reward, is the setting the claim ("at little cost in reward") is about.
PTX_COEF = 0.1
COLLAPSE_PAPER = "Song et al. 2023, arXiv:2305.17608"
COLLAPSE_CLAIM = ("A reward model trained on rankings with one prompt-agnostic utility ends with the same reward "
                  "distribution for every prompt, however much the prompt's responses really differ; a prompt-aware "
                  "utility keeps them apart.")
COLLAPSE_UTILITIES = ("none", "log-sigmoid")  # InstructGPT's loss, and Song et al.'s bounded one; both prompt-agnostic
CONTROL = "regression"  # the control: a regression RM on the same prompts' gold rewards (told the magnitudes)
COLLAPSED = 0.5  # collapse: the RM keeps at most half of the gold's log spread ratio between the two prompt groups


# ------------------------------------------------------------------------------------ statistics (pure)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Paired t interval of the mean of d_i = a_i - b_i (one pair per seed): mean +- t_{n-1} s / sqrt(n),
    s the sample standard deviation of the d_i; the interval is [nan, nan] with fewer than two pairs."""
    from scipy import stats

    if len(a) != len(b) or not len(a):
        raise ValueError(f"a paired interval needs the same positive number of values on both sides, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"differences": d.tolist(), "mean": mean, "interval": [float("nan"), float("nan")], "level": level}
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return {"differences": d.tolist(), "mean": mean, "interval": [mean - half, mean + half], "level": level}


def population_std(values: Sequence[float]) -> float:
    """Standard deviation of a prompt's rewards, dividing by their number."""
    return float(np.std(np.asarray(values, dtype=np.float64)))


def spread_groups(spreads: Sequence[float], share: float = 0.25) -> tuple[list[int], list[int]]:
    """Indices of the prompts with the smallest and the largest `spreads` (the lowest and highest
    `share` of them, at least one each; ties by position), each list in ascending order of spread."""
    n = len(spreads)
    k = max(1, int(share * n))
    if n < 2 * k:
        raise ValueError(f"{n} prompts cannot make two disjoint groups of {k}")
    order = sorted(range(n), key=lambda i: (spreads[i], i))
    return order[:k], order[n - k:]


def spread_figures(model: Sequence[float], gold: Sequence[float], low: Sequence[int], high: Sequence[int]) -> dict[str, float]:
    """The mean per-prompt spreads of the two groups under the model and under gold, their ratios
    high / low, and the collapse index 1 - log(model ratio) / log(gold ratio): 0 when the model's
    spreads differ between the groups as much as gold's, 1 when they are equal (collapse), < 0 when they
    differ more; nan when gold's do not differ."""
    def mean(values: Sequence[float], rows: Sequence[int]) -> float:
        return float(np.mean([values[i] for i in rows]))

    out = {"model_low": mean(model, low), "model_high": mean(model, high), "gold_low": mean(gold, low), "gold_high": mean(gold, high)}
    out["model_ratio"] = out["model_high"] / out["model_low"] if out["model_low"] > 0 else float("inf")
    out["gold_ratio"] = out["gold_high"] / out["gold_low"] if out["gold_low"] > 0 else float("inf")
    finite = all(math.isfinite(out[k]) and out[k] > 0 for k in ("model_ratio", "gold_ratio")) and out["gold_ratio"] != 1
    out["collapse_index"] = 1 - math.log(out["model_ratio"]) / math.log(out["gold_ratio"]) if finite else float("nan")
    return out


# ------------------------------------------------------------------------------------ training


def train_config(task: Task, algorithm: dict[str, Any], train: dict[str, Any], seed: int, output_dir: Path, reward: bool):
    """A resolved run config of `algorithm` from the task's SFT policy (the bench's default policy),
    `train` with `seed`, no evaluation, and the task's default reward where `reward`."""
    from rlhfzoo.config import load_config

    data = {
        "task": {"name": task.name, **task.config.model_dump(mode="json", exclude_defaults=True)},
        "policy": {"name": DEFAULTS["policy"]}, "algorithm": algorithm,
        "train": {**train, "seed": seed, "eval_prompts": 0, "progress": False},
        "output_dir": str(output_dir),  # nothing is written: the steps are run here, not by `fit`
    }
    default = task.default_reward()
    if reward and default:
        data["reward"] = default
    return load_config(data=data)


def run_steps(trainer: Any) -> float:
    """All of `trainer`'s steps (`train.steps`), as `Trainer.fit` takes them, without its files; the seconds."""
    start = time.time()
    trainer.policy.model.train()
    for step in range(trainer.train.steps):
        trainer.train_step(step)
        trainer.step = step + 1
    trainer.policy.model.eval()
    return time.time() - start


@torch.no_grad()
def demonstration_nll(policy: Policy, demonstrations: Sequence[Any], collator: Any, batch_size: int = 64) -> float:
    """Mean negative log-likelihood per response token of `demonstrations` under `policy` (one token
    mean over all of them), as the SFT loss measures it."""
    total, tokens = 0.0, 0.0
    device = next(policy.module.parameters()).device
    was = policy.model.training
    policy.model.eval()
    try:
        for k in range(0, len(demonstrations), batch_size):
            seq = collator(list(enumerate(demonstrations[k : k + batch_size]))).sequences
            mask = seq.response_mask[:, 1:].float()
            logprobs = policy.logprobs(seq.input_ids.to(device), seq.attention_mask.to(device)).float().cpu()
            total -= float((logprobs * mask).sum())
            tokens += float(mask.sum())
    finally:
        policy.model.train(was)
    return total / max(tokens, 1.0)


# ------------------------------------------------------------------------------------ PPO-ptx


def ptx_alignment_tax(
    task: Task, out_dir: Path, seeds: Sequence[int] = (0, 1, 2), ptx_coef: float = PTX_COEF, steps: int | None = None,
    eval_prompts: int = 200, log: Log | None = None,
) -> dict[str, Any]:
    """PPO (`ppo-clip`, its bench protocol's budget and options, `steps` replacing the budget's where
    given) with `ptx_coef: 0` and `ptx_coef` on the same `seeds`, from the task's SFT policy against its
    default reward. Per run: the alignment tax (mean per-token NLL of the task's held-out
    demonstrations minus the SFT policy's) and the mean gold reward of one sample for each of the first
    `eval_prompts` held-out prompts. Reproduced when PPO-ptx's tax is smaller than PPO's with the paired t
    interval of the difference over seeds excluding 0; the reward cost is reported beside it."""
    from rlhfzoo.bench_plan import DEFAULT_TRAIN, protocol
    from rlhfzoo.evaluation import evaluate
    from rlhfzoo.trainer import Trainer

    if not task.has_gold_reward or not task.default_reward():
        raise UserError(f"task {task.name!r} has no gold reward or default reward source; the PPO-ptx check needs both")
    demos = task.examples("demonstrations", split="test")
    if not demos or not task.examples("demonstrations", split="train"):
        raise UserError(f"task {task.name!r} has no train and held-out demonstrations; the PPO-ptx check needs both")
    bench = protocol("objective", "ppo-clip")
    train = {**DEFAULT_TRAIN, **bench.train, **({"steps": steps} if steps else {})}
    if log:
        log(f"[rlhfzoo] check PPO-ptx alignment tax: ptx_coef 0 and {ptx_coef}, seeds {list(seeds)}, {train['steps']} iterations each")
    start = time.time()
    runs: dict[str, list[dict[str, float]]] = {"ppo": [], "ppo-ptx": []}
    sft = sft_nll = None
    ptx_batch_size = None
    for seed in seeds:
        for label, coef in (("ppo", 0.0), ("ppo-ptx", ptx_coef)):
            algorithm = {"name": "ppo-clip", **bench.options, "ptx_coef": coef}
            trainer = Trainer(train_config(task, algorithm, train, seed, out_dir / label, reward=True), log=lambda *_: None, task=task)
            if sft is None:  # the initial policy, the same for every run: its NLL once
                sft = trainer.cfg.policy.create(task=task)
                sft_nll = demonstration_nll(sft, demos, trainer.collator)
            ptx_batch_size = trainer.objective.config.ptx_batch_size
            seconds = run_steps(trainer)
            nll = demonstration_nll(trainer.policy, demos, trainer.collator)
            figures = evaluate(trainer.policy, task, None, sft, n_prompts=eval_prompts, seed=seed)
            runs[label].append({"seed": seed, "nll": nll, "tax": nll - sft_nll, "gold": figures["gold"], "kl": figures["kl"],
                                "train_seconds": seconds})
    gold_sft = evaluate(sft, task, None, None, n_prompts=eval_prompts, seed=0)["gold"]
    plain, ptx = runs["ppo"], runs["ppo-ptx"]
    tax = paired_interval([r["tax"] for r in plain], [r["tax"] for r in ptx])  # > 0: ptx pays less tax
    cost = paired_interval([r["gold"] for r in plain], [r["gold"] for r in ptx])  # > 0: ptx loses reward

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    gain = mean(plain, "gold") - gold_sft  # PPO's gold gain over the SFT policy, and the share of it PPO-ptx keeps
    kept = (mean(ptx, "gold") - gold_sft) / gain if gain > 0 else float("nan")
    measured = {
        "seeds": list(seeds), "ptx_coef": ptx_coef, "ptx_batch_size": ptx_batch_size,
        "train": train, "options": dict(bench.options), "eval_prompts": eval_prompts, "held_out_demonstrations": len(demos),
        "sft": {"nll": sft_nll, "gold": gold_sft}, "ppo": plain, "ppo-ptx": ptx,
        "tax_reduction": tax, "gold_cost": cost, "gold_gain_kept": kept,
        "statistic": f"paired t over seeds, {int(100 * LEVEL)} % interval", "seconds": time.time() - start,
    }
    low, high = tax["interval"]
    reproduced = bool(low > 0)
    note = (
        f"Alignment tax (held-out demonstration NLL over the SFT policy's {sft_nll:.3f} nats/token): PPO "
        f"{mean(plain, 'tax'):+.4f}, PPO-ptx (gamma {ptx_coef:g}) {mean(ptx, 'tax'):+.4f}; PPO's minus PPO-ptx's "
        f"{tax['mean']:+.4f} [{low:+.4f}, {high:+.4f}] over {len(seeds)} seeds (criterion: above 0). Gold on "
        f"{eval_prompts} held-out prompts: SFT {gold_sft:.3f}, PPO {mean(plain, 'gold'):.3f}, PPO-ptx {mean(ptx, 'gold'):.3f}, "
        f"a cost of {cost['mean']:+.3f} [{cost['interval'][0]:+.3f}, {cost['interval'][1]:+.3f}]: "
        + (f"PPO-ptx keeps {100 * kept:.0f} % of PPO's gold gain over SFT" if gain > 0 else "PPO gained no gold over SFT")
        + f" (KL {mean(ptx, 'kl'):.2f} against PPO's {mean(plain, 'kl'):.2f} nats), "
        "to be read beside the tax: the claim's 'little cost in reward' holds only where that share is high. The "
        "'pretraining distribution' here is the SFT demonstrations' language (the task has no separate pretraining corpus)."
    )
    return record("ptx alignment tax", PTX_PAPER, PTX_CLAIM, measured, reproduced, note)


# ------------------------------------------------------------------------------------ reward collapse


def ranked_prompts(rankings: Sequence[Any]) -> tuple[list[Any], list[list[str]]]:
    """The prompts of K-wise rankings expanded to pairs sharing `group`, and each one's ranked responses
    (in the order they first appear)."""
    groups: dict[Any, tuple[Any, dict[str, None]]] = {}
    for pair in rankings:
        prompt, responses = groups.setdefault(pair.group, (pair.prompt, {}))
        responses.setdefault(pair.chosen)
        responses.setdefault(pair.rejected)
    return [p for p, _ in groups.values()], [list(rs) for _, rs in groups.values()]


def loss_scale(rewards: torch.Tensor, utility: str) -> torch.Tensor:
    """The rewards as the loss compares them: raw for `none`, sigmoid(r) in [0, 1] for Song et al.'s utilities."""
    return rewards if utility == "none" else torch.sigmoid(rewards)


def prompt_spreads(score: Any, prompts: Sequence[Any], responses: Sequence[Sequence[str]], utility: str) -> list[float]:
    """Per prompt, the population std of its responses' rewards (`score(prompts, responses)`), on the
    loss's scale (`loss_scale`)."""
    flat = loss_scale(score([p for p, rs in zip(prompts, responses) for _ in rs], [r for rs in responses for r in rs]), utility).tolist()
    out, k = [], 0
    for rs in responses:
        out.append(population_std(flat[k : k + len(rs)]))
        k += len(rs)
    return out


def reward_collapse(
    task: Task, out_dir: Path, seeds: Sequence[int] = (0, 1, 2), utilities: Sequence[str] = COLLAPSE_UTILITIES, prompts: int = 32,
    steps: int = 80, batch_size: int = 32, lr: float = 1e-3, log: Log | None = None,
) -> dict[str, Any]:
    """Reward models (`bradley-terry` on rankings, from the SFT policy) trained with each prompt-agnostic
    utility in `utilities` and seed on the K-wise rankings of the first `prompts` ranked train prompts,
    `steps` x `batch_size` pairs (several epochs: towards the interpolating regime where Song et al.
    predict collapse), and as the control a `reward-regression` model on the gold rewards of the same
    prompts' samples (told the magnitudes: what an RM of this size and budget keeps of the spreads). The
    prompts are split into the quarters whose ranked responses' gold rewards spread least and most
    (`spread_groups`); `spread_figures` compares each model's per-prompt spreads between them, on those
    prompts and on the held-out prompts' distinct SFT samples. Collapse of a utility: on the ranked
    prompts its collapse index's seed mean >= `COLLAPSED` and above the control's, the paired t interval
    over seeds excluding 0. Song et al.'s remedy, a utility chosen per prompt, is not run: `bradley-terry`
    takes one utility per run and the task labels no prompt type; so `reproduced` is False when no
    utility collapses, else None (half of the claim)."""
    from rlhfzoo.plugins.reward_heads import RewardModel
    from rlhfzoo.trainer import Trainer

    if not task.provides("rankings") or not task.provides("rewarded") or not task.has_gold_reward:
        raise UserError(f"task {task.name!r} lacks K-wise rankings, rated examples or a gold reward; the reward-collapse check needs all three")
    for name in task.stages_for("rankings"):  # the SFT samples the rankings are labelled from
        stages.build(name, task, log=log)
    rankings = task.examples("rankings", split="train")
    keep = set(list(dict.fromkeys(p.group for p in rankings))[:prompts])
    pairs = [p for p in rankings if p.group in keep]
    train_prompts, train_responses = ranked_prompts(pairs)
    rated = [e for e in task.examples("rewarded", split="train") if e.prompt in set(train_prompts)]
    test_prompts, test_samples = task.samples("test")
    test = [(p, list(dict.fromkeys(rs))) for p, rs in zip(test_prompts, test_samples) if len(set(rs)) >= 2]
    sets = {"ranked": (train_prompts, train_responses), "held_out": ([p for p, _ in test], [rs for _, rs in test])}
    gold = {k: [population_std(task.gold_reward([p] * len(rs), rs).tolist()) for p, rs in zip(*v)] for k, v in sets.items()}
    groups = {k: spread_groups(g) for k, g in gold.items()}
    if log:
        log(f"[rlhfzoo] check reward collapse: {len(train_prompts)} ranked prompts ({len(pairs)} pairs), utilities "
            f"{', '.join(utilities)} and a regression control, seeds {list(seeds)}, {steps} steps of {batch_size} each")
    start = time.time()
    train = {"steps": steps, "batch_size": batch_size, "lr": lr}
    models = {u: ({"name": "bradley-terry", "examples": "rankings", "ranking_weight": False, "utility": u}, pairs) for u in utilities}
    models[CONTROL] = ({"name": "reward-regression"}, rated)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for label, (algorithm, data) in models.items():
        scale = algorithm.get("utility", "none")
        for seed in seeds:
            cfg = train_config(task, algorithm, train, seed, out_dir / f"rm-{label}", reward=False)
            entry = cfg.policy.entry
            policy = entry.cls(entry.cls.with_value_head(cfg.policy.config), task=task)  # the SFT stage of the real task
            trainer = Trainer(cfg, log=lambda *_: None, task=FixedPairs(task, data), policy=policy)
            seconds = run_steps(trainer)
            scorer = RewardModel.from_policy(trainer.policy)
            chosen = scorer.score([p.prompt for p in pairs], [p.chosen for p in pairs])
            rejected = scorer.score([p.prompt for p in pairs], [p.rejected for p in pairs])
            row: dict[str, Any] = {"seed": seed, "train_pair_accuracy": float((chosen > rejected).float().mean()), "train_seconds": seconds}
            for k, (ps, rs) in sets.items():
                row[k] = spread_figures(prompt_spreads(scorer.score, ps, rs, scale), gold[k], *groups[k])
            runs[label].append(row)
    control = [r["ranked"]["collapse_index"] for r in runs[CONTROL]]
    summary: dict[str, Any] = {}
    for label, rows in runs.items():
        summary[label] = {k: {"collapse_index": float(np.mean([r[k]["collapse_index"] for r in rows])),
                              "model_ratio": float(np.mean([r[k]["model_ratio"] for r in rows]))} for k in sets}
        summary[label]["train_pair_accuracy"] = float(np.mean([r["train_pair_accuracy"] for r in rows]))
        if label != CONTROL:
            summary[label]["over_control"] = paired_interval([r["ranked"]["collapse_index"] for r in rows], control)
    gold_ratio = {k: spread_figures(gold[k], gold[k], *groups[k])["gold_ratio"] for k in sets}
    measured = {
        "seeds": list(seeds), "utilities": list(utilities), "control": CONTROL, "prompts": len(train_prompts), "pairs": len(pairs),
        "rated_examples": len(rated), "held_out_prompts": len(test), "train": train, "group_share": 0.25, "gold_ratio": gold_ratio,
        "summary": summary, "runs": runs, "seconds": time.time() - start,
    }
    collapsed = [u for u in utilities if summary[u]["ranked"]["collapse_index"] >= COLLAPSED and summary[u]["over_control"]["interval"][0] > 0]

    def figures(label: str) -> str:
        s = summary[label]
        return (f"{label}: RM spread ratio {s['ranked']['model_ratio']:.2f} ranked / {s['held_out']['model_ratio']:.2f} held-out, "
                f"collapse index {s['ranked']['collapse_index']:.2f} / {s['held_out']['collapse_index']:.2f}, train pair accuracy "
                f"{s['train_pair_accuracy']:.2f}" + ("" if label == CONTROL else
                f", index over the control {s['over_control']['mean']:+.2f} [{s['over_control']['interval'][0]:+.2f}, "
                f"{s['over_control']['interval'][1]:+.2f}] (above it on {sum(d > 0 for d in s['over_control']['differences'])} of "
                f"{len(seeds)} seeds)"))

    note = (
        f"Gold spread ratio of the most- to the least-spread quarter of prompts: {gold_ratio['ranked']:.2f} (ranked train "
        f"prompts), {gold_ratio['held_out']:.2f} (held-out). {'; '.join(figures(m) for m in models)}. Collapse (on the ranked "
        f"prompts index >= {COLLAPSED}, i.e. at most half of gold's log ratio kept, and above the control's, paired t over "
        f"seeds): {', '.join(collapsed) or 'none'}. Song et al.'s remedy (a utility per prompt type) is not run: `bradley-terry` "
        "takes one utility per run and the task labels no prompt type"
        + (", so the claim is half measured." if collapsed else "; with no collapse established beyond the control's, the claim is not "
           "reproduced at this scale.")
    )
    return record("reward collapse", COLLAPSE_PAPER, COLLAPSE_CLAIM, measured, None if collapsed else False, note)
