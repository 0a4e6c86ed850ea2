"""`rlhfzoo bench`: algorithms head to head, on equal footing.

    rlhfzoo bench --task sentiment --algorithms dpo,ppo-clip,best-of-n --seeds 3 --out runs/bench

Every algorithm starts from the task's cached SFT policy (and, where it needs one, the task's
cached reward model), gets the training budget its objective recommends (`train_defaults`,
recorded in optimizer steps, tokens and reward calls), and is evaluated on the same held-out
prompts with the same sampling seed. Names go through the registry, so an installed
third-party objective joins the table by being named. Policies (e.g. `best-of-n`) are
benchmarked without training; `sft` is the baseline every row is compared with.

Without `--algorithms`, every built-in contender runs -- except on a task without a gold reward
(e.g. `hh-rlhf`, human labels only), where sampled responses cannot be scored: there the
defaults are the built-in offline objectives whose data kind the task provides, plus the reward
model (`bradley-terry`), and rows are compared by their accuracy on the task's held-out
preference pairs ("pair acc.": the implicit reward log pi/pi_ref of DPO/IPO-style objectives,
the reward model's score for reward models).

Each run executes in its own process (`python -m rlhfzoo.bench --worker SPEC`), so a crash is
contained (its row is marked failed), its peak memory is its own, and Ctrl-C leaves every
finished run intact. A run is finished when its directory holds `result.json`; a second
invocation reuses finished runs made from the same spec (a changed config reruns; `--force` reruns all).

Outputs in --out: leaderboard.json, leaderboard.md, frontier.png (gold vs KL), curves.png (gold
and proxy reward during training), runs/<algorithm>/seed-<s>/{config.yaml, result.json,
responses.json, log.txt}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfzoo.config import apply_overrides, read_yaml
from rlhfzoo.errors import UserError
from rlhfzoo.registry import UnknownNameError, registry

BASELINE = "sft-baseline"
DEFAULT_TRAIN = {"steps": 50, "batch_size": 16, "lr": 1e-4}


# ------------------------------------------------------------------------------------ planning


@dataclass
class RunSpec:
    label: str  # row name: the algorithm, plus the swept value if any
    name: str  # registered name
    kind: str  # "objective" (trained) or "policy" (evaluated as is)
    seed: int
    config: dict[str, Any]  # the run config (objective) or {"task", "policy", "reward"} (policy)
    directory: str
    eval_prompts: int
    variant: dict[str, Any] = field(default_factory=dict)


def resolve_names(names: list[str]) -> list[tuple[str, str]]:
    """(kind, canonical name) for every algorithm; all unknown names reported at once."""
    resolved, unknown = [], []
    for name in names:
        found = [e for e in registry.find(name) if e.kind in ("objective", "policy")]
        if not found:
            unknown.append(name)
        else:
            entry = next((e for e in found if e.kind == "objective"), found[0])
            resolved.append((entry.kind, entry.name))
    if unknown:
        choices = registry.names("objective") + [n for n in registry.names("policy") if n != "hf"]
        messages = [str(UnknownNameError("objective", n, choices)).split("\n")[0] for n in unknown]
        raise UnknownNameError("objective", unknown[0], choices) if len(unknown) == 1 else BenchError(
            "\n".join(messages) + f"\nAlgorithms available: {', '.join(choices)}. Nothing was run."
        )
    return resolved


class BenchError(UserError):
    pass


def default_reward(task_name: str) -> dict[str, Any]:
    """The proxy reward online algorithms train against: the task's cached reward model."""
    try:
        registry.get("reward_source", "reward-model")
        return {"name": "reward-model", "path": "auto"}
    except UnknownNameError:
        return {"name": "gold"}


def plan(args) -> list[RunSpec]:
    base = read_yaml(args.config) if args.config else {}
    base = apply_overrides(base, args.set or [])
    task = base.get("task") or {"name": args.task}
    if isinstance(task, str):
        task = {"name": task}
    if args.task and not args.config:
        task = {**task, "name": args.task}
    policy = base.get("policy") or {"name": "hf", "init": "sft"}
    reward = base.get("reward") or (default_reward(task["name"]) if not args.reward else {"name": args.reward})
    train_base = base.get("train", {})
    algorithms = args.algorithms if args.algorithms is not None else ",".join(default_algorithms(task))
    names = resolve_names([n.strip() for n in algorithms.split(",") if n.strip()])
    sweep_key, sweep_values = parse_sweep(args.sweep)
    out = Path(args.out)
    specs: list[RunSpec] = []
    for seed in range(args.seeds):
        d = out / "runs" / BASELINE / f"seed-{seed}"
        specs.append(RunSpec(BASELINE, "hf", "policy", seed, {"task": task, "policy": policy, "reward": reward}, str(d), args.eval_prompts))
    for kind, name in names:
        entry = registry.get(kind, name)
        variants: list[dict[str, Any]] = [{}]
        if sweep_key and kind == "objective" and sweep_key.split(".")[-1] in entry.cls.Config.model_fields:
            variants = [{sweep_key: v} for v in sweep_values]
        for variant in variants:
            label = name + "".join(f" {k.split('.')[-1]}={v}" for k, v in variant.items())
            slug = label.replace(" ", "_").replace("=", "-")
            for seed in range(args.seeds):
                d = out / "runs" / slug / f"seed-{seed}"
                if kind == "policy":
                    pol = {"name": name, "base": policy, "reward": reward}
                    cfg = {"task": task, "policy": pol, "reward": reward}
                else:
                    train = {**DEFAULT_TRAIN, **entry.cls.train_defaults, **train_base}
                    train.update(seed=seed, eval_prompts=args.eval_prompts, progress=False)
                    train.setdefault("eval_every", max(1, train["steps"] // 4))
                    algorithm = {"name": name, **entry.cls.algorithm_defaults}
                    cfg = {"task": task, "policy": policy, "algorithm": algorithm, "train": train, "output_dir": str(d / "train")}
                    if entry.cls.online or entry.cls.needs_reward:
                        cfg["reward"] = reward
                    cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in variant.items()])
                specs.append(RunSpec(label, name, kind, seed, cfg, str(d), args.eval_prompts, variant))
    return specs


def parse_sweep(text: str | None) -> tuple[str | None, list[Any]]:
    if not text:
        return None, []
    key, sep, values = text.partition("=")
    if not sep or not key.startswith("algorithm."):
        raise BenchError(f"--sweep must look like algorithm.beta=0.05,0.1,0.5, got {text!r}")
    return key, [yaml.safe_load(v) for v in values.split(",")]


# ------------------------------------------------------------------------------------ one run (worker process)


def worker(spec_path: str) -> int:
    """Train (or build) one policy, evaluate it, write result.json last."""
    import torch

    from rlhfzoo.config import load_config
    from rlhfzoo.evaluation import sample, sequence_kl
    from rlhfzoo.trainer import Trainer, peak_rss_mb

    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    d = Path(spec.directory)
    start = time.time()
    result: dict[str, Any] = {"label": spec.label, "name": spec.name, "seed": spec.seed, "kind": spec.kind}
    if spec.kind == "objective":
        cfg = load_config(data=spec.config)
        (d / "config.yaml").write_text(cfg.to_yaml())
        trainer = Trainer(cfg, log=lambda *_: None)
        summary = trainer.fit(overwrite=True)
        policy, task, reward = trainer.objective.inference_policy(trainer.policy), trainer.task, trainer.reward
        reference = (trainer._reference_for_eval() or cfg.policy.create(task=task).frozen_copy()) if trainer.objective.trains_policy else None
        result["budget"] = {
            "optimizer_steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size,
            **summary.get("counters", {}),
            "reward_calls": summary.get("reward_source", {}).get("reward_calls", 0.0),
        }
        result["train_seconds"] = summary["train_seconds"]
        result["objective_eval"] = summary.get("eval", {})
    else:
        data = dict(spec.config)
        data["algorithm"] = {"name": "sft"}
        cfg = load_config(data=data)
        (d / "config.yaml").write_text(cfg.to_yaml())
        task = cfg.task.create()
        policy = cfg.policy.create(task=task)
        reward = cfg.reward.create(task=task) if cfg.reward else None
        # KL from the policy every trained row starts from (the bench's `policy` section, by default
        # the task's SFT policy): the row's own policy, or the base it samples from (best-of-n).
        reference = getattr(policy, "base", policy).frozen_copy()
        result["train_seconds"] = 0.0

    eval_start = time.time()
    rollouts: list = []
    record: dict[str, Any] = {"prompts": [], "responses": []}
    if spec.kind == "policy" or trainer.objective.trains_policy:  # reward models: only their `objective_eval`
        prompts = task.eval_prompts()[: spec.eval_prompts]
        rollouts = sample(policy, prompts, seed=10_000 + spec.seed)
        responses = [r for ro in rollouts for r in ro.responses]
        record = {"prompts": prompts, "responses": responses}
        if task.has_gold_reward:
            record["gold"] = task.gold_reward(prompts, responses).tolist()
        if reward is not None and cfg.reward is not None and cfg.reward.entry.name != "gold":
            record["proxy"] = reward.score(prompts, responses).tolist()
        analytic = getattr(policy, "analytic_kl", None)
        if callable(analytic):
            record["kl"] = [float(analytic())] * len(responses)
        else:
            record["kl"] = torch.cat([sequence_kl(policy, reference, ro) for ro in rollouts]).tolist()
    if spec.kind == "policy":  # inference-time methods: their budget is the evaluation itself
        reward_calls = getattr(policy, "counters", {}).get("reward_calls", 0)
        result["budget"] = {"optimizer_steps": 0, "batch_size": 0, "reward_calls": reward_calls, **getattr(policy, "counters", {})}
    result["eval_seconds"] = time.time() - eval_start
    tokens = sum(int(ro.response_mask.sum()) for ro in rollouts)
    result["generate_tokens_per_second"] = tokens / max(result["eval_seconds"], 1e-9)
    counters = result["budget"]
    result["train_tokens_per_second"] = counters.get("train_tokens", 0) / max(result["train_seconds"], 1e-9) if result["train_seconds"] else 0.0
    result["wall_seconds"] = time.time() - start
    result["peak_rss_mb"] = peak_rss_mb()
    result["status"] = "ok"
    (d / "responses.json").write_text(json.dumps(record))
    tmp = d / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, d / "result.json")
    return 0


# ------------------------------------------------------------------------------------ running


def same_spec(path: Path, spec: RunSpec) -> bool:
    """Whether a finished run was made from this very spec (a changed config or budget reruns it)."""
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(asdict(spec)))
    except (OSError, ValueError):
        return False


def execute(spec: RunSpec, force: bool) -> dict[str, Any]:
    d = Path(spec.directory)
    done = d / "result.json"
    if done.exists() and not force and same_spec(d / "spec.json", spec):
        result = json.loads(done.read_text())
        if result.get("status") == "ok":
            result["reused"] = True
            return result
    d.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    spec_path = d / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    with open(d / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "rlhfzoo.bench", "--worker", str(spec_path)], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode == 0 and done.exists():
        return json.loads(done.read_text())
    if proc.returncode in (-2, 130):  # Ctrl-C reached the worker too
        raise KeyboardInterrupt
    tail = (d / "log.txt").read_text(errors="replace").strip().splitlines()[-15:]
    error = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "no output")
    failed = {"label": spec.label, "name": spec.name, "seed": spec.seed, "kind": spec.kind, "status": "failed", "error": error.strip(), "log": str(d / "log.txt")}
    (d / "failed.json").write_text(json.dumps(failed, indent=1))
    return failed


# ------------------------------------------------------------------------------------ aggregation


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard error and 95 % half-width across seeds (t distribution)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(n, 2.0)
    return m, sd / math.sqrt(n), t * sd / math.sqrt(n)


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a's response beats b's (ties count half)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / max(1, len(a))


def bradley_terry(wins: dict[tuple[str, str], float], players: list[str], iters: int = 200) -> dict[str, float]:
    """Bradley-Terry strengths from pairwise win shares (minorisation-maximisation, Hunter 2004),
    reported on the Elo scale: 1000 + 400 log10(p_i / geometric mean)."""
    p = {x: 1.0 for x in players}
    for _ in range(iters):
        new = {}
        for i in players:
            w = sum(wins.get((i, j), 0.0) for j in players if j != i)
            denom = sum(1.0 / (p[i] + p[j]) for j in players if j != i and (i, j) in wins)
            new[i] = max(w, 1e-3) / denom if denom else p[i]
        g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        p = {k: v / g for k, v in new.items()}
    return {k: 1000 + 400 * math.log10(v) for k, v in p.items()}


def aggregate(specs: list[RunSpec], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_label: dict[str, list[tuple[RunSpec, dict]]] = {}
    for spec, res in zip(specs, results):
        by_label.setdefault(spec.label, []).append((spec, res))
    records = {}
    for spec, res in zip(specs, results):
        f = Path(spec.directory) / "responses.json"
        if res.get("status") == "ok" and f.exists():
            records[(spec.label, spec.seed)] = json.loads(f.read_text())
    labels = list(by_label)
    # Pairwise gold win shares between all rows, matched by seed and prompt.
    wins: dict[tuple[str, str], float] = {}
    for a in labels:
        for b in labels:
            if a == b:
                continue
            shares = [
                win_rate(records[(a, s)]["gold"], records[(b, s)]["gold"])
                for (la, s) in records
                if la == a and (b, s) in records and "gold" in records[(a, s)] and "gold" in records[(b, s)]
            ]
            if shares:
                wins[(a, b)] = sum(shares) / len(shares)
    elo = bradley_terry(wins, [x for x in labels if any(k[0] == x for k in wins)]) if wins else {}
    rows = []
    for label, runs in by_label.items():
        ok = [(s, r) for s, r in runs if r.get("status") == "ok"]
        row: dict[str, Any] = {"algorithm": label, "name": runs[0][0].name, "kind": runs[0][0].kind, "seeds": len(runs), "seeds_ok": len(ok)}
        row["status"] = "ok" if len(ok) == len(runs) else "failed" if not ok else "partial"
        errors = [r.get("error") for _, r in runs if r.get("status") != "ok"]
        if errors:
            row["errors"] = errors
        def per_seed(key: str) -> list[float]:
            vals = []
            for s, _ in ok:
                rec = records.get((label, s.seed), {})
                if key in rec and rec[key]:
                    vals.append(sum(rec[key]) / len(rec[key]))
            return vals
        for key in ("gold", "proxy", "kl"):
            vals = per_seed(key)
            if vals:
                m, se, ci = mean_ci(vals)
                within = [_se(records[(label, s.seed)][key]) for s, _ in ok if key in records.get((label, s.seed), {})]
                row[key] = {"mean": m, "seed_se": se, "ci95": ci, "per_seed": vals, "prompt_se": sum(within) / len(within)}
        accuracies = [(acc, n) for acc, n in (pair_accuracy(r.get("objective_eval") or {}) for _, r in ok) if acc is not None]
        if accuracies:
            m, se, ci = mean_ci([a for a, _ in accuracies])
            within = [math.sqrt(a * (1 - a) / n) if n else float("nan") for a, n in accuracies]  # binomial SE over pairs
            per_seed = [a for a, _ in accuracies]
            row["pair_accuracy"] = {"mean": m, "seed_se": se, "ci95": ci, "per_seed": per_seed, "pair_se": sum(within) / len(within)}
        if label != BASELINE and (label, BASELINE) in wins:
            row["win_rate_vs_sft"] = wins[(label, BASELINE)]
        row["elo"] = elo.get(label)
        for key in ("train_seconds", "wall_seconds", "peak_rss_mb", "train_tokens_per_second", "generate_tokens_per_second"):
            vals = [r[key] for _, r in ok if key in r]
            if vals:
                row[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        budgets = [r.get("budget", {}) for _, r in ok]
        if budgets:
            row["budget"] = {k: sum(b.get(k, 0) for b in budgets) / len(budgets) for k in budgets[0]}
        objective_evals = [r.get("objective_eval") for _, r in ok if r.get("objective_eval")]
        if objective_evals:
            row["objective_eval"] = objective_evals[0] if len(objective_evals) == 1 else objective_evals
        rows.append(row)
    if any(r.get("gold") for r in rows):
        rows.sort(key=lambda r: -(r.get("gold", {}).get("mean", -1e9) if r.get("gold") else (r.get("elo") or -1e9)))
    else:  # no gold reward (e.g. hh-rlhf): held-out pair accuracy, then Elo; rows without either last
        rows.sort(key=lambda r: (-(r["pair_accuracy"]["mean"] if r.get("pair_accuracy") else -1e9), -(r.get("elo") or -1e9)))
    return rows


PAIR_ACCURACY_KEYS = ("implicit_reward_accuracy", "accuracy")  # policy objectives; reward models (evaluate_reward_model)


def pair_accuracy(objective_eval: dict[str, Any]) -> tuple[float | None, float]:
    """(accuracy on the task's held-out preference pairs, number of pairs) from a run's
    `objective_eval`: the implicit reward's for policy objectives, the score's for reward models."""
    for key, n_key in zip(PAIR_ACCURACY_KEYS, ("implicit_reward_pairs", "n_pairs")):
        value = objective_eval.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value), float(objective_eval.get(n_key, 0))
    return None, 0.0


def _se(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


# ------------------------------------------------------------------------------------ outputs


def fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    m, ci = stat["mean"], stat.get("ci95", float("nan"))
    spread = ci if not math.isnan(ci) else 1.96 * stat.get("prompt_se", stat.get("pair_se", float("nan")))
    return f"{m:.{digits}f} ± {spread:.{digits}f}" if not math.isnan(spread) else f"{m:.{digits}f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# rlhfzoo bench — task `{meta['task']}`",
        "",
        f"{meta['date']}, {meta['machine']}; command: `{meta['command']}`",
        "",
        "Gold, proxy and KL: mean over seeds ± 95 % CI (one seed: ± 1.96 prompt-level SE). Win rate: share of held-out "
        "prompts whose gold reward beats the SFT policy's response (ties half). Elo: Bradley–Terry fit of all pairwise gold win rates. "
        "Pair acc.: share of the task's held-out preference pairs ordered as labelled (ties half) by the implicit reward "
        "log pi/pi_ref (preference objectives) or the reward model's score, mean over seeds ± 95 % CI (one seed: ± 1.96 pair-level SE).",
        "",
        "| algorithm | gold | proxy | KL | pair acc. | win vs SFT | Elo | optimizer steps | generated tokens | RM calls | train s | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r.get("budget", {})
        wr = f"{r['win_rate_vs_sft']:.2f}" if "win_rate_vs_sft" in r else "–"
        elo = f"{r['elo']:.0f}" if r.get("elo") is not None else "–"
        ts = f"{r['train_seconds']['mean']:.0f}" if "train_seconds" in r else "–"
        mem = f"{r['peak_rss_mb']['mean']:.0f}" if "peak_rss_mb" in r else "–"
        lines.append(
            f"| {r['algorithm']} | {fmt(r.get('gold'))} | {fmt(r.get('proxy'))} | {fmt(r.get('kl'), 2)} | {fmt(r.get('pair_accuracy'))} | {wr} | {elo} | "
            f"{b.get('optimizer_steps', 0):.0f} | {b.get('generated_tokens', 0):.0f} | {b.get('reward_calls', 0):.0f} | {ts} | {mem} | {r['status']} |"
        )
    failed = [r for r in rows if r.get("errors")]
    if failed:
        lines += ["", "Failures:"] + [f"- {r['algorithm']}: {e}" for r in failed for e in r["errors"]]
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("gold") and r.get("kl"):
            groups.setdefault(r["name"] if r["kind"] == "objective" else r["algorithm"], []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["kl"]["mean"])
        xs = [r["kl"]["mean"] for r in rs]
        ys = [r["gold"]["mean"] for r in rs]
        err = [r["gold"].get("ci95") if not math.isnan(r["gold"].get("ci95", float("nan"))) else 1.96 * r["gold"]["prompt_se"] for r in rs]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, linestyle="-" if len(rs) > 1 else "none")
    ax.set_xlabel("KL(policy || SFT reference), nats per response")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("Gold reward against KL (over-optimisation frontier)")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    else:  # e.g. hh-rlhf: human labels, no gold reward to plot
        ax.text(0.5, 0.5, "no gold reward on this task", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(specs: list[RunSpec], results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    for spec, res in zip(specs, results):
        f = Path(spec.directory) / "train" / "metrics.jsonl"
        if spec.kind != "objective" or res.get("status") != "ok" or not f.exists():
            continue
        for line in f.read_text().splitlines():
            row = json.loads(line)
            for key in ("gold", "proxy"):
                if f"eval/{key}" in row:
                    curves.setdefault(spec.label, {}).setdefault(key, {}).setdefault(row["step"], []).append(row[f"eval/{key}"])
        final = res.get("objective_eval", {})
        for key in ("gold", "proxy"):
            if key in final:
                steps = res.get("budget", {}).get("optimizer_steps", 0)
                curves.setdefault(spec.label, {}).setdefault(key, {}).setdefault(int(steps), []).append(final[key])
    for ax, key in zip(axes, ("gold", "proxy")):
        for label, c in curves.items():
            if key in c:
                steps = sorted(c[key])
                ax.plot(steps, [sum(c[key][s]) / len(c[key][s]) for s in steps], marker=".", label=label)
        ax.set_xlabel("optimizer step (online: iteration)")
        ax.set_ylabel(f"held-out {key} reward")
        ax.set_title(f"{key} reward during training")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


# ------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfzoo bench", description="Run algorithms head to head on equal footing.")
    p.add_argument("--task", default="sentiment", help="registered task (default: sentiment)")
    p.add_argument(
        "--algorithms",
        default=None,
        help="comma-separated objective or policy names (default: all built-ins; on a task without a gold reward, "
        "e.g. hh-rlhf: the built-in offline objectives whose data the task provides, plus bradley-terry)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per algorithm (default: 3)")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.add_argument("--config", help="YAML with task/policy/reward/train sections shared by every run")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override applied to every run (repeatable)")
    p.add_argument("--reward", help="reward source the algorithms train against (default: the task's reward model)")
    p.add_argument("--sweep", help="e.g. algorithm.beta=0.05,0.1,0.5: one row per value, for the frontier plot")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts per evaluation (default: 200)")
    p.add_argument("--quick", action="store_true", help="one seed and 100 eval prompts: the README's main job and CI")
    p.add_argument("--force", action="store_true", help="rerun finished runs instead of reusing them")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def builtin_algorithms() -> list[str]:
    """Every built-in objective and policy that declares itself a benchmark contender."""
    return [
        e.name
        for kind in ("objective", "policy")
        for e in registry.entries(kind)
        if e.package == "rlhfzoo" and getattr(e.cls, "benchmark", False)
    ]


def default_algorithms(task: dict[str, Any]) -> list[str]:
    """What runs without `--algorithms`: every built-in contender; on a task without a gold reward
    (its sampled responses cannot be scored), the built-in offline objectives whose data kind the
    task provides, plus the reward model (`bradley-terry`), all compared by held-out pair accuracy."""
    instance = registry.create("task", task["name"], {k: v for k, v in task.items() if k != "name"})
    if instance.has_gold_reward:
        return builtin_algorithms()

    def provides(kind: str) -> bool:
        try:
            return bool(instance.examples(kind, split="train"))
        except (ValueError, KeyError, NotImplementedError):
            return False

    offline = [
        e.name
        for e in registry.entries("objective")
        if e.package == "rlhfzoo" and e.cls.benchmark and not e.cls.online and provides(e.cls.data_kind)
    ]
    return offline + [n for n in ("bradley-terry",) if n not in offline]


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.seeds, args.eval_prompts = 1, min(args.eval_prompts, 100)
    out = Path(args.out)
    specs = plan(args)  # every name resolved and every config built before anything runs
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": specs[0].config["task"]["name"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": "rlhfzoo bench " + " ".join(argv if argv is not None else sys.argv[2:]),
        "seeds": args.seeds,
        "eval_prompts": args.eval_prompts,
    }
    results: list[dict[str, Any]] = []
    bar = tqdm(specs, desc="bench", unit="run")
    try:
        for spec in bar:
            bar.set_postfix_str(f"{spec.label} seed {spec.seed}")
            results.append(execute(spec, args.force))
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {len(results)} of {len(specs)} runs finished and kept; run the same command again to resume", file=sys.stderr)
        return 130
    bar.close()
    rows = aggregate(specs, results)
    (out / "leaderboard.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    md = markdown(rows, meta)
    (out / "leaderboard.md").write_text(md)
    plot_frontier(rows, out / "frontier.png")
    plot_curves(specs, results, out / "curves.png")
    print(md)
    print(f"outputs in {out}: leaderboard.json, leaderboard.md, frontier.png, curves.png")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
