"""`rlhfzoo bench --checks`: claims of the literature, reproduced as checks the bench can run.

Each check returns one record, {"check", "paper", "claim", "measured", "reproduced", "note"}:
`measured` the figures (JSON-able), `reproduced` True/False, or None where it was not run (the note
says what it would need), and the note one or two honest sentences on what the figures show.

    best-of-n KL       Beirami et al. 2024: log n - (n-1)/n is an upper bound on best-of-n's KL,
                       exact only without ties; measured exactly on the SFT policy's samples
    dpo vs ipo         Azar et al. 2023: on deterministic preferences DPO's margin grows without
                       bound, IPO's settles at 1/(2 tau); both trained through the real trainer
    overoptimisation   Gao et al. 2022: proxy rises with KL, gold is concave in sqrt(KL); read off
                       a bench run with `--sweep kl`
    reward collapse    Song et al. 2023: RMs on K-wise rankings with prompt-agnostic utilities; do the
                       per-prompt reward spreads stop following the gold spreads? (`bench_checks_training`)
    ptx alignment tax  Ouyang et al. 2022: PPO with and without the pretraining mix; the held-out
                       demonstrations' NLL rise and the gold reward (`bench_checks_training`)

`run_checks(task_name, out_dir, bench_analysis)` runs them all and writes `checks.json` and
`checks.md` (`checks_markdown`) into `out_dir`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfzoo import stages
from rlhfzoo.bench_plan import BASELINE
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Policy, RewardSource, Task
from rlhfzoo.registry import DEFAULTS, registry

Log = Callable[[str], None]
BON_NS = (2, 4, 16, 64)
BON_PROMPTS = 16  # held-out prompts of the best-of-n check
BON_SAMPLES = 256  # base samples per prompt: ties that matter at n <= 64 (probability >~ 1/64) show up
BOUND_TOLERANCE = 1e-6  # float error only: the plug-in is the KL of a discrete distribution, within the bound
IPO_BAND = 0.25  # IPO's final margin within 25 % of 1/(2 tau)
DPO_GROWTH = 0.05  # DPO's margin still rising: >= 5 % over the last quarter of the steps
# The preference check's policy: a tiny GPT-2 from scratch on the task's tokenizer (cheap on one CPU thread).
TINY_POLICY = {"name": DEFAULTS["policy"], "init": "scratch", "n_layer": 1, "n_embd": 32, "n_head": 2}


def record(check: str, paper: str, claim: str, measured: dict[str, Any], reproduced: bool | None, note: str) -> dict[str, Any]:
    """One check's result, as every check returns it (`reproduced` None: not run, the note says why)."""
    return {"check": check, "paper": paper, "claim": claim, "measured": measured, "reproduced": reproduced, "note": note}


# ------------------------------------------------------------------------------------ best-of-n's KL

BON_PAPER = "Beirami et al. 2024, arXiv:2401.01879 (the formula: Stiennon et al. 2020; Gao et al. 2022)"


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n-1)/n: best-of-n's KL from its base when no response has appreciable probability."""
    return math.log(n) - (n - 1) / n


def empirical_best_of_n_kl(rewards: Sequence[float], n: int) -> float:
    """KL(best-of-n || base) of one prompt, the base's reward levels estimated from its samples
    (`rewards`: one per sample; repeated responses carry the same reward, hence share a level).

    With p(r) the share of samples at level r, F-(r) = P(R < r), F+(r) = P(R <= r), best-of-n
    (ties broken uniformly at random) picks level r with q(r) = F+(r)^n - F-(r)^n, and within a
    level a response distributed as the base's, so KL = sum_r q(r) log(q(r) / p(r)) (Beirami et
    al. 2024). This is exactly best-of-n's KL on the empirical distribution, hence <= the bound."""
    if not len(rewards):
        raise ValueError("no samples to estimate the reward levels from")
    counts = sorted(Counter(float(r) for r in rewards).items())
    m = len(rewards)
    kl, below = 0.0, 0.0
    for _, c in counts:
        p = c / m
        at_most = below + p
        q = at_most**n - below**n
        if q > 0:
            kl += q * math.log(q / p)
        below = at_most
    return max(kl, 0.0)


def best_of_n_kl(
    task: Task, policy: Policy, reward: RewardSource, ns: Sequence[int] = BON_NS, prompts: Sequence[Any] | None = None,
    samples_per_prompt: int = BON_SAMPLES, seed: int = 0, log: Log | None = None,
) -> dict[str, Any]:
    """Best-of-n's exact KL from `policy` (selection by `reward`) beside log n - (n-1)/n, for each n
    in `ns`: `samples_per_prompt` samples of each prompt (default: the first 16 held-out prompts)
    give each prompt's reward levels (`empirical_best_of_n_kl`), the KL is averaged over prompts."""
    from rlhfzoo.evaluation import sample

    prompts = list(task.eval_prompts()[:BON_PROMPTS] if prompts is None else prompts)
    m = samples_per_prompt
    if log:
        log(f"[rlhfzoo] check best-of-n KL: {len(prompts)} prompts x {m} samples")
    start = time.time()
    rollouts = sample(policy, [p for p in prompts for _ in range(m)], batch_size=256, seed=seed)
    responses = [r for ro in rollouts for r in ro.responses]
    per_prompt = [responses[i * m : (i + 1) * m] for i in range(len(prompts))]
    distinct = [list(dict.fromkeys(rs)) for rs in per_prompt]  # each distinct response scored once
    scores = reward.score([p for p, ds in zip(prompts, distinct) for _ in ds], [d for ds in distinct for d in ds]).tolist()
    kls: dict[int, list[float]] = {n: [] for n in ns}
    offset = 0
    for rs, ds in zip(per_prompt, distinct):
        level = dict(zip(ds, scores[offset : offset + len(ds)]))
        offset += len(ds)
        for n in ns:
            kls[n].append(empirical_best_of_n_kl([level[r] for r in rs], n))
    figures = {}
    for n in ns:
        kl, bound = sum(kls[n]) / len(kls[n]), best_of_n_kl_bound(n)
        distinct_floor = empirical_best_of_n_kl(range(m), n)  # the same estimator on m distinct samples
        figures[str(n)] = {"kl": kl, "formula": bound, "all_distinct_estimate": distinct_floor, "below_formula": 1 - kl / bound}
    measured = {
        "n": figures,
        "prompts": len(prompts),
        "samples_per_prompt": m,
        "distinct_share": sum(len(ds) for ds in distinct) / (m * len(prompts)),
        "top_response_share": sum(max(Counter(rs).values()) / m for rs in per_prompt) / len(prompts),
        "reward": reward.name,
        "seconds": time.time() - start,
    }
    reproduced = all(f["kl"] <= f["formula"] + BOUND_TOLERANCE for f in figures.values())
    largest = max(ns)
    gap = figures[str(largest)]["below_formula"]
    note = (
        f"The measured KL is at most the formula for every n (n={largest}: {figures[str(largest)]['kl']:.3f} against "
        f"{figures[str(largest)]['formula']:.3f}, {100 * gap:.1f} % below); {100 * measured['distinct_share']:.1f} % of the "
        f"samples are distinct responses (the most frequent one {100 * measured['top_response_share']:.1f} % of a prompt's "
        f"samples on average), so ties are {'rare and the formula nearly exact' if gap < 0.05 else 'frequent enough to make the formula overstate the KL'} "
        "at this scale. The estimate is best-of-n's exact KL on the empirical distribution, so the bound holds for any sample "
        "(Beirami et al.): the informative figure is the gap."
    )
    return record(
        "best-of-n KL", BON_PAPER,
        "KL(best-of-n || base) <= log n - (n-1)/n, with equality only when no response has appreciable probability; the exact "
        "value is sum_r q(r) log(q(r)/p(r)) over the base's reward levels.",
        measured, reproduced, note,
    )


# ------------------------------------------------------------------------------------ DPO vs IPO


class FixedPairs(Task):
    """A task's tokenizer and model sizes with a fixed list of preference pairs as its data: the
    same pairs every step, the chosen side always preferred (deterministic preferences)."""

    name = "fixed-pairs"

    def __init__(self, base: Task, pairs: Sequence[Any]):
        super().__init__()
        self.base, self.pairs = base, list(pairs)

    def examples(self, kind: str, split: str = "train") -> list[Any]:
        return list(self.pairs)

    def tokenizer(self) -> Any:
        return self.base.tokenizer()

    def default_model_config(self) -> dict[str, Any]:
        return self.base.default_model_config()


@torch.no_grad()
def side_logprobs(policy: Policy, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [B] of the chosen and rejected sides of a collated pair batch."""
    return policy.sequence_logprobs(batch.sequences).float(), policy.sequence_logprobs(batch.rejected).float()


def train_margins(task: Task, pairs: Sequence[Any], algorithm: dict[str, Any], steps: int, lr: float, checkpoints: int,
                  seed: int, output_dir: Path) -> dict[str, list[float]]:
    """Train a tiny scratch policy on `pairs` (all of them every step) with `algorithm` through the
    trainer, and read the mean margin h = log-ratio(chosen) - log-ratio(rejected) (summed log-probs,
    against the initial policy) and the mean rejected log-ratio at `checkpoints` evenly spaced steps."""
    from rlhfzoo.config import load_config
    from rlhfzoo.trainer import Trainer

    cfg = load_config(data={
        "task": {"name": task.name, **task.config.model_dump(mode="json", exclude_defaults=True)}, "policy": dict(TINY_POLICY), "algorithm": algorithm,
        "train": {"steps": steps, "batch_size": len(pairs), "lr": lr, "seed": seed, "eval_prompts": 0, "progress": False},
        "output_dir": str(output_dir),  # nothing is written: the steps are run here, not by `fit`
    })
    trainer = Trainer(cfg, log=lambda *_: None, task=FixedPairs(task, pairs))
    policy = trainer.policy
    batch = trainer.collator(list(enumerate(pairs)))
    ref_chosen, ref_rejected = side_logprobs(policy, batch)  # the reference: the policy before any step
    out: dict[str, list[float]] = {"step": [], "margin": [], "rejected_logratio": []}
    every = max(1, steps // checkpoints)
    policy.model.train()
    for step in range(steps):
        trainer.train_step(step)
        trainer.step = step + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            chosen, rejected = side_logprobs(policy, batch)
            out["step"].append(step + 1)
            out["margin"].append(((chosen - ref_chosen) - (rejected - ref_rejected)).mean().item())
            out["rejected_logratio"].append((rejected - ref_rejected).mean().item())
    return out


def dpo_vs_ipo_deterministic(
    task: Task, out_dir: Path, n_pairs: int = 8, steps: int = 120, lr: float = 3e-3, tau: float = 0.1, checkpoints: int = 8,
    seed: int = 0, log: Log | None = None,
) -> dict[str, Any]:
    """DPO (beta = tau) and IPO (summed log-probs, the literal Eq. 17) on the same `n_pairs` of the
    task's preference pairs, the same tiny policy, steps and learning rate: IPO's mean margin should
    settle at 1/(2 tau), DPO's keep growing past it (Azar et al. 2023, Sec. 4.2 and 5). `out_dir`: the
    runs' `output_dir`, where nothing is written (the check runs the trainer's steps itself)."""
    for name in task.stages_for("pairs"):  # e.g. the SFT samples the task's pairs are labelled from
        stages.build(name, task, log=log)
    pairs = [p for p in task.examples("pairs", split="train") if p.chosen != p.rejected][:n_pairs]
    if len(pairs) < n_pairs:
        raise UserError(f"task {task.name!r} has {len(pairs)} preference pairs with two different sides; the DPO/IPO check needs {n_pairs}.")
    if log:
        log(f"[rlhfzoo] check DPO vs IPO: {n_pairs} pairs, {steps} steps each")
    start = time.time()
    dpo = train_margins(task, pairs, {"name": "dpo", "beta": tau}, steps, lr, checkpoints, seed, out_dir / "dpo")
    ipo = train_margins(task, pairs, {"name": "ipo", "tau": tau, "average_logprobs": False}, steps, lr, checkpoints, seed, out_dir / "ipo")
    target = 1 / (2 * tau)
    quarter = next(i for i, s in enumerate(dpo["step"]) if s >= 0.75 * steps)  # the checkpoint at 3/4 of the steps

    def growth(curve: dict[str, list[float]]) -> float:
        return curve["margin"][-1] / max(abs(curve["margin"][quarter]), 1e-12) - 1

    measured = {
        "pairs": n_pairs, "steps": steps, "lr": lr, "beta": tau, "tau": tau, "target": target, "logprobs": "summed",
        "dpo": {**dpo, "growth_last_quarter": growth(dpo)}, "ipo": {**ipo, "growth_last_quarter": growth(ipo)},
        "seconds": time.time() - start,
    }
    h_dpo, h_ipo = dpo["margin"][-1], ipo["margin"][-1]
    ipo_settles = abs(h_ipo - target) <= IPO_BAND * target
    dpo_grows = h_dpo > (1 + IPO_BAND) * target and h_dpo > h_ipo and growth(dpo) >= DPO_GROWTH
    note = (
        f"Final mean margin h: IPO {h_ipo:.2f} against 1/(2 tau) = {target:.2f}, DPO {h_dpo:.1f} (+{100 * growth(dpo):.0f} % over "
        f"the last quarter, rejected log-ratio {dpo['rejected_logratio'][-1]:.0f} nats against IPO's {ipo['rejected_logratio'][-1]:.1f}). "
        f"Criterion: IPO's final h within {100 * IPO_BAND:.0f} % of 1/(2 tau), and DPO's above that band, above IPO's and "
        f"still rising by >= {100 * DPO_GROWTH:.0f} % over the last quarter of the steps."
    )
    return record(
        "dpo vs ipo", "Azar et al. 2023, arXiv:2310.12036 (Sec. 4.2, 5)",
        "With deterministic preferences DPO's optimum has pi(rejected) = 0 whatever beta, so its margin h grows without bound; "
        "IPO's loss (h - 1/(2 tau))^2 holds h at 1/(2 tau).",
        measured, ipo_settles and dpo_grows, note,
    )


# ------------------------------------------------------------------------------------ overoptimisation (Gao et al.)

GAO_PAPER = "Gao, Schulman & Hilton 2022, arXiv:2210.10760"
GAO_CLAIM = ("Optimising a proxy reward model, the proxy keeps rising with KL while the gold reward, as a function of "
             "d = sqrt(KL), is concave: it rises, flattens and falls (BoN: d(a - b d); RL: d(a - b log d)).")


def mean_of(row: dict[str, Any], key: str) -> float | None:
    """A leaderboard row's mean of `key` ({"mean": ...} or a plain number); None where missing or not finite."""
    value = row.get(key)
    value = value.get("mean") if isinstance(value, dict) else value
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def curve_shape(points: list[dict[str, float | None]]) -> dict[str, Any]:
    """Gao et al.'s shape on points {"kl", "gold", "proxy"} (proxy may be None): ordered by KL, whether
    the proxy never falls, whether the slopes of gold against sqrt(KL) never rise (concave), and
    whether gold peaked before the largest KL. Points at the same KL are averaged first."""
    merged: dict[float, list[dict]] = {}
    for p in points:
        merged.setdefault(round(math.sqrt(max(p["kl"], 0.0)), 9), []).append(p)
    ds = sorted(merged)
    gold = [sum(p["gold"] for p in merged[d]) / len(merged[d]) for d in ds]
    proxies = [[p["proxy"] for p in merged[d]] for d in ds]
    proxy = [sum(x) / len(x) if all(v is not None for v in x) else None for x in proxies]
    slopes = [(gold[i + 1] - gold[i]) / (ds[i + 1] - ds[i]) for i in range(len(ds) - 1)]
    out: dict[str, Any] = {
        "sqrt_kl": ds, "gold": gold, "proxy": proxy, "gold_slopes": slopes,
        "gold_concave": all(b <= a + 1e-12 for a, b in zip(slopes, slopes[1:])),
        "proxy_rising": None if any(v is None for v in proxy) else all(b >= a for a, b in zip(proxy, proxy[1:])),
    }
    out["gold_peaked"] = max(range(len(gold)), key=gold.__getitem__) < len(gold) - 1  # over-optimised: gold fell at the end
    out["holds"] = out["gold_concave"] and out["proxy_rising"] is not False
    return out


def gao_overoptimisation(bench_analysis: dict[str, Any] | None, min_points: int = 3) -> dict[str, Any]:
    """Gao et al.'s shape per algorithm with >= `min_points` swept rows (`rlhfzoo bench --sweep kl`)
    in `bench_analysis` (what `bench_stats.analyse` returns), the SFT baseline added as the point at
    KL 0 where the bench has it. The verdict is over the algorithms that optimise the proxy (every
    row scored by the reward model: online methods, best-of-n), the claim's scope; the others (e.g.
    offline DPO, trained on labelled pairs) are reported beside it. None when nothing in scope was swept."""
    rows = (bench_analysis or {}).get("rows", [])
    origin = next((r for r in rows if r.get("algorithm") == BASELINE), None)
    curves: dict[str, list[dict]] = {}
    for row in rows:
        gold, kl = mean_of(row, "gold"), mean_of(row, "kl")
        if row is origin or gold is None or kl is None:
            continue
        point = {"kl": kl, "gold": gold, "proxy": mean_of(row, "proxy"), "row": row.get("algorithm")}
        curves.setdefault(row.get("name", row.get("algorithm")), []).append(point)
    curves = {name: pts for name, pts in curves.items() if len(pts) >= min_points}
    start = None
    if origin is not None and mean_of(origin, "gold") is not None:
        start = {"kl": mean_of(origin, "kl") or 0.0, "gold": mean_of(origin, "gold"), "proxy": mean_of(origin, "proxy")}
    shapes = {}
    for name, pts in curves.items():
        in_scope = all(p["proxy"] is not None for p in pts)
        with_origin = list(pts)
        if start:  # the origin's proxy only beside rows scored by the reward model
            with_origin.append({**start, "proxy": start["proxy"] if in_scope else None})
        shape = curve_shape(with_origin)
        shapes[name] = {"rows": [p["row"] for p in sorted(pts, key=lambda p: p["kl"])], "optimises_proxy": in_scope and shape["proxy_rising"] is not None, **shape}
    scope = [n for n, s in shapes.items() if s["optimises_proxy"]]
    others = [n for n in shapes if n not in scope]
    measured = {"origin": BASELINE if start else None, "algorithms": shapes} if shapes else {}
    if not scope:
        why = f"the swept algorithms ({', '.join(others)}) have no proxy figures" if others else "nothing was swept"
        return record("overoptimisation", GAO_PAPER, GAO_CLAIM, measured, None,
                      f"Not run: {why}; it needs a bench with `--sweep kl` over >= {min_points} KL values of an algorithm that "
                      "optimises the reward model (online methods, best-of-n).")
    failing = [n for n in scope if not shapes[n]["holds"]]
    peaked = [n for n in scope if shapes[n]["gold_peaked"]]
    note = (
        f"{len(scope) - len(failing)} of {len(scope)} swept algorithms optimising the reward model show the shape"
        + (f" (not: {', '.join(failing)})" if failing else "")
        + f"; gold turned down within the swept KL for {', '.join(peaked) if peaked else 'none'}"
        + (f"; outside the claim (no proxy figures): {', '.join(others)}" if others else "")
        + f". Points: the rows' seed means{', plus the SFT baseline at KL 0' if start else ''}; with few points and seed "
        "noise one kink decides the verdict: read the slopes."
    )
    return record("overoptimisation", GAO_PAPER, GAO_CLAIM, measured, not failing, note)


# ------------------------------------------------------------------------------------ all of them


def base_models(task_name: str, log: Log | None) -> tuple[Task, Policy, RewardSource | None]:
    """The task, its SFT policy and its default reward source, built from the stage cache as the bench
    builds its rows (`bench_plan.plan`: the default policy, the task's `default_reward`)."""
    from rlhfzoo.config import resolve

    task = registry.create("task", task_name, {})
    reward = task.default_reward()
    cfg = resolve({"task": {"name": task_name}, "policy": {"name": DEFAULTS["policy"]}, **({"reward": reward} if reward else {})},
                  require=("task",))
    stages.build_for(cfg, log=log, task=task)
    return task, cfg.policy.create(task=task), cfg.reward.create(task=task) if cfg.reward else None


def run_checks(task_name: str, out_dir: Path, bench_analysis: dict[str, Any] | None, log: Log = print) -> list[dict[str, Any]]:
    """Every check on `task_name` (and `bench_analysis`, for Gao et al.'s), written to
    `out_dir/checks.json` and `out_dir/checks.md`. A check that cannot run on the task (a
    `UserError`: no reward source, no preference pairs, ...) is recorded as not run, with why."""
    from rlhfzoo import bench_checks_training as training  # it imports this module

    out_dir = Path(out_dir)

    def attempt(check: str, paper: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return run()
        except UserError as e:
            return record(check, paper, "", {}, None, f"Not run on {task_name!r}: {e}")

    def best_of_n() -> dict[str, Any]:
        task, policy, reward = base_models(task_name, log)
        if reward is None:
            raise UserError("the task names no default reward source to select the best of n samples by")
        return best_of_n_kl(task, policy, reward, log=log)

    def preferences() -> dict[str, Any]:
        return dpo_vs_ipo_deterministic(registry.create("task", task_name, {}), out_dir / "checks", log=log)

    def collapse() -> dict[str, Any]:
        return training.reward_collapse(registry.create("task", task_name, {}), out_dir / "checks", log=log)

    def alignment_tax() -> dict[str, Any]:
        return training.ptx_alignment_tax(registry.create("task", task_name, {}), out_dir / "checks", log=log)

    checks = [
        attempt("best-of-n KL", BON_PAPER, best_of_n),
        attempt("dpo vs ipo", "Azar et al. 2023, arXiv:2310.12036", preferences),
        gao_overoptimisation(bench_analysis),
        attempt("reward collapse", training.COLLAPSE_PAPER, collapse),
        attempt("ptx alignment tax", training.PTX_PAPER, alignment_tax),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "checks.json").write_text(json.dumps(checks, indent=1))
    (out_dir / "checks.md").write_text(checks_markdown(checks))
    return checks


def rounded(value: Any, digits: int = 4) -> Any:
    """`value` with every float to `digits` significant digits, for display."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def checks_markdown(checks: list[dict[str, Any]]) -> str:
    """The checks as markdown: a table (check, paper, reproduced), then per check its claim, its
    measured figures and its note."""
    verdict = {True: "yes", False: "**no**", None: "not run"}
    lines = ["| check | paper | reproduced |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['paper']} | {verdict[c['reproduced']]} |" for c in checks]
    for c in checks:
        lines += ["", f"### {c['check']}", ""]
        if c["claim"]:
            lines += [f"Claim: {c['claim']}", ""]
        lines += [c["note"] if c["reproduced"] is None else f"Reproduced: {verdict[c['reproduced']]}. {c['note']}"]
        if c["measured"]:
            lines += [""] + [f"- {key}: `{json.dumps(rounded(value))}`" for key, value in c["measured"].items()]
    return "\n".join(lines) + "\n"
