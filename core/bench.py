"""`rlhfzoo bench`: algorithms head to head, on equal footing.

    rlhfzoo bench --task sentiment --algorithms dpo,ppo-clip,best-of-n --seeds 3 --out runs/bench

Every algorithm starts from the task's cached SFT policy (and, where it needs one, the task's
cached reward model), and runs as its plugin's bench protocol says (`BenchProtocol`: the
training budget, recorded in optimizer steps, tokens and reward calls; options; sampled or scorer
evaluation; pair-accuracy keys; KL knob; sampled or closed-form KL), evaluated on the same
held-out prompts with the same sampling seed. Names go through the registry, so an installed
third-party objective joins the table by being named. Inference-time policies (e.g. `best-of-n`)
are benchmarked without training; the starting policy itself (`sft-baseline`) is the baseline
every row is compared with.

Without `--algorithms`, every built-in contender runs -- except on a task without a gold reward
(e.g. `hh-rlhf`, human labels only), where sampled responses cannot be scored: there the
defaults are the built-in offline contenders that report a held-out pair accuracy on a data
kind the task provides (DPO-style objectives and reward models), and rows are compared by their
accuracy on the task's held-out preference pairs ("pair acc.": the implicit reward log
pi/pi_ref of DPO/IPO-style objectives, the reward model's score for reward models).

Everything a user can get wrong is reported before any run starts (`bench_plan`: counts, names,
`--config`, every problem of every run's config, `--sweep`, run directories inside `--out`).
Then every cached stage the runs read (the task's SFT policy, its reward model, ...: `rlhfzoo.stages`)
is built once, in the bench itself, with its progress bar, so every row starts from the same ones.
Each run executes in its own process (`python -m rlhfzoo.bench --worker SPEC`), so a crash is
contained (its row is marked failed), its peak memory is its own, and Ctrl-C leaves every
finished run intact; a worker dies with the bench, and owns its run directory alone while it
runs (`bench_runs`). A run is finished when its directory holds `result.json`; a second
invocation reuses finished runs made from the same spec (a changed config reruns; `--force` reruns all).

Runs go `--jobs` at a time on this machine, or to a Ray cluster (`--launcher ray`); `--budget
AXIS=AMOUNT` holds every row that can spend on the axis to one budget (`rlhfzoo.budget`);
`--tune N` gives every algorithm N trials chosen on validation prompts before its final runs.

The modules: `bench_plan` (the runs and their checks), `bench_runs` and `bench_launch` (running
them), `bench_tune` (--tune), `bench_stats`, `bench_bootstrap` and `bench_frontier` (the
leaderboard's figures: bootstrap intervals, pairwise verdicts, the matched-KL frontier),
`bench_report` (markdown and plots); this one holds the worker's job and the command line.

Outputs in --out: leaderboard.json, leaderboard.md, frontier.png (gold vs KL), improvement.png
(probability of improvement between rows), curves.png (gold and proxy reward during training
against wall-clock; reward models apart), runs/<algorithm>/seed-<s>/{config.yaml, result.json,
responses.json, log.txt, spec.json, .lock}, and with --tune tune/runs/<algorithm trial k>/...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rlhfzoo import stages
from rlhfzoo.bench_plan import (  # noqa: F401  (BenchError, RunSpec, BASELINE and the planning helpers: the bench's public names)
    BASELINE,
    BenchError,
    RunSpec,
    builtin_algorithms,
    default_algorithms,
    load_run_config,
    parse_sweep,
    plan,
    protocol,
    resolve_names,
    stages_needed,
)
from rlhfzoo.bench_checks import run_checks
from rlhfzoo.bench_launch import RunsInterrupted, bar_progress, run_all
from rlhfzoo.bench_plan import BUDGET_STEP_CAP, parse_budget, validate_configs
from rlhfzoo.bench_report import machine, markdown, plot_curves, plot_frontier, plot_improvement  # noqa: F401  (the outputs)
from rlhfzoo.bench_runs import RunLock, die_with_parent, execute, read_spec, same_spec  # noqa: F401
from rlhfzoo.bench_stats import aggregate, analyse, bradley_terry, mean_ci, win_rate  # noqa: F401
from rlhfzoo.bench_tune import apply_choice, check_tune, choose, trial_specs
from rlhfzoo.budget import held_to
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import BenchProtocol
from rlhfzoo.registry import DEFAULTS, registry

# ------------------------------------------------------------------------------------ one run (worker process)


def run_worker(spec_path: str, lock_fd: int | None, parent_pid: int | None) -> int:
    """The worker process: stop when the bench that started it is gone, own the run directory
    (the lock the bench handed over, or a fresh one when started by hand), then do the run."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    spec = read_spec(spec_path)
    with RunLock(spec.directory, fd=lock_fd):
        return worker(spec)


def worker(spec: RunSpec) -> int:
    """Train (or build) one policy, evaluate it as its bench protocol says, write result.json last."""
    from rlhfzoo.trainer import Trainer, peak_rss_mb

    d = Path(spec.directory)
    start = time.time()
    result: dict[str, Any] = {"label": spec.label, "name": spec.name, "seed": spec.seed, "kind": spec.kind}
    cfg = load_run_config(spec)
    stages.build_for(cfg, log=print)  # built by the bench already: found in the cache
    (d / "config.yaml").write_text(cfg.to_yaml())
    if spec.kind == "objective":
        bench = protocol("objective", spec.name)
        trainer = Trainer(cfg, log=lambda *_: None)
        summary = trainer.fit(overwrite=True)
        policy, task, reward = trainer.objective.inference_policy(trainer.policy), trainer.task, trainer.reward
        reference = None
        if bench.evaluation == "sampled":  # KL from the policy training started from
            reference = trainer.reference_for_eval() or cfg.policy.create(task=task).frozen_copy()
        result["budget"] = {
            "optimizer_steps": summary.get("step", cfg.train.steps),  # a budget may end the run before the cap
            "batch_size": cfg.train.batch_size,
            **summary.get("counters", {}),
            "reward_calls": summary.get("reward_source", {}).get("reward_calls", 0.0),
        }
        result["train_seconds"] = summary["train_seconds"]
        if summary.get("budget"):  # train.budget (--budget): what the run spent of it
            result["budget_run"] = summary["budget"]
        result["objective_eval"] = summary.get("eval", {})
        accuracy = bench.pair_accuracy_of(result["objective_eval"])
        if accuracy is not None:
            result["pair_accuracy"] = list(accuracy)  # (accuracy, pairs) on the task's held-out pairs
    else:
        bench = protocol("policy", spec.name) if spec.label != BASELINE else BenchProtocol()
        task = cfg.task.create()
        policy = cfg.policy.create(task=task)
        reward = cfg.reward.create(task=task) if cfg.reward else None
        # KL from the policy every trained row starts from (the bench's `policy` section, by default
        # the task's SFT policy): the row's own policy, or the base an inference-time method samples from.
        reference = policy.kl_reference().frozen_copy()
        result["train_seconds"] = 0.0
    result.update(evaluate_row(spec, bench, policy, task, reward, cfg, reference))
    counters = result["budget"]
    result["train_tokens_per_second"] = counters.get("train_tokens", 0) / max(result["train_seconds"], 1e-9) if result["train_seconds"] else 0.0
    result["wall_seconds"] = time.time() - start
    result["peak_rss_mb"] = peak_rss_mb()
    result["status"] = "ok"
    tmp = d / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, d / "result.json")
    return 0


def evaluate_row(spec: RunSpec, bench: BenchProtocol, policy, task, reward, cfg, reference) -> dict[str, Any]:
    """Sample the row's policy on the held-out prompts (unless its output is a scorer) and write the
    per-prompt gold, proxy and KL to responses.json; an inference-time row's budget is this evaluation."""
    from rlhfzoo.evaluation import response_kls, sample

    out: dict[str, Any] = {}
    eval_start = time.time()
    rollouts: list = []
    record: dict[str, Any] = {"prompts": [], "responses": []}
    if bench.evaluation == "sampled":
        prompts = task.eval_prompts()[spec.eval_offset : spec.eval_offset + spec.eval_prompts]
        rollouts = sample(policy, prompts, seed=10_000 + spec.seed)
        responses = [r for ro in rollouts for r in ro.responses]
        record = {"prompts": prompts, "responses": responses}
        if task.has_gold_reward:
            record["gold"] = task.gold_reward(prompts, responses).tolist()
        if reward is not None and not cfg.reward.entry.cls.is_gold:
            record["proxy"] = reward.score(prompts, responses).tolist()
        if bench.kl == "analytic":
            record["kl"] = [float(policy.analytic_kl())] * len(responses)
        else:
            record["kl"] = response_kls(policy, reference, rollouts).tolist()
    if spec.kind == "policy":  # inference-time methods: their budget is the evaluation itself
        counters = dict(policy.counters)
        out["budget"] = {"optimizer_steps": 0, "batch_size": 0, "reward_calls": counters.get("reward_calls", 0), **counters}
    out["eval_seconds"] = time.time() - eval_start
    tokens = sum(int(ro.response_mask.sum()) for ro in rollouts)
    out["generate_tokens_per_second"] = tokens / max(out["eval_seconds"], 1e-9)
    (Path(spec.directory) / "responses.json").write_text(json.dumps(record))
    return out


# ------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfzoo bench", description="Run algorithms head to head on equal footing.")
    p.add_argument("--task", default=DEFAULTS["task"], help=f"registered task (default: {DEFAULTS['task']})")
    p.add_argument(
        "--algorithms",
        default=None,
        help="comma-separated objective or policy names (default: all built-ins; on a task without a gold reward, "
        "e.g. hh-rlhf: the built-in offline objectives whose data the task provides, plus bradley-terry)",
    )
    p.add_argument("--seeds", type=int, default=5, help="seeds per algorithm (default: 5)")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.add_argument("--config", help="YAML with task/policy/reward/train sections shared by every run")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override applied to every run (repeatable)")
    p.add_argument("--reward", help="reward source the algorithms train against (default: the task's reward model)")
    p.add_argument("--sweep", help="e.g. algorithm.beta=0.05,0.1,0.5: one row per value, for the frontier plot; `kl`: every algorithm over its own KL knob (`rlhfzoo show NAME`)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts per evaluation (default: 200)")
    p.add_argument("--quick", action="store_true",
                   help="one seed, 100 eval prompts and, unless --jobs says otherwise, 2 runs at a time: the README's main job")
    p.add_argument("--force", action="store_true", help="rerun finished runs instead of reusing them")
    p.add_argument(
        "--jobs", type=int,
        help="runs at the same time (default: 1; with --quick, 2 where there are 2 cores); each gets max(1, cores // JOBS) CPU threads through its environment, "
        "not its config, so a run's results do not depend on --jobs beyond float nondeterminism",
    )
    p.add_argument(
        "--launcher", choices=("local", "ray"), default="local",
        help="where runs execute (default: local): `ray` sends each run as a Ray task to the cluster at RAY_ADDRESS, "
        "else to a Ray instance on this machine; --out and RLHFZOO_CACHE must then be on a filesystem every node "
        "mounts at the same path. Needs pip install 'rlhfzoo[ray]'",
    )
    p.add_argument("--budget", metavar="AXIS=AMOUNT",
                   help="hold every row to one budget: seconds, train_tokens, generated_tokens, reward_calls, examples or flops "
                   f"(rlhfzoo.budget); a row's steps become a cap ({BUDGET_STEP_CAP}x its protocol's), and a row that cannot "
                   "spend on the axis runs its protocol's budget and says so")
    p.add_argument("--tune", type=int, metavar="N",
                   help="N hyperparameter trials per algorithm from its search space, chosen on validation prompts "
                   "(held-out, after the test ones), then run with the bench's seeds (rlhfzoo.bench_tune)")
    p.add_argument("--checks", action="store_true",
                   help="also run the literature checks (rlhfzoo.bench_checks: best-of-n's KL bound, DPO vs IPO on deterministic "
                   "preferences, over-optimisation along --sweep kl, ...) on the task, into checks.md / checks.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the worker process: its spec.json
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the run directory's lock, inherited from the bench
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # the bench: stop when it is gone
    return p


def run_phase(specs: list[RunSpec], args, desc: str) -> list[dict[str, Any]] | None:
    """Run `specs` (`--jobs` at a time, on `--launcher`) behind a progress bar; their results in
    spec order, or None when interrupted (every finished run kept)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), desc=desc, unit="run")
    try:
        results = run_all(specs, args.force, args.jobs, args.launcher, progress=bar_progress(bar))
    except RunsInterrupted as e:
        bar.close()
        print(f"\ninterrupted: {e.finished} of {len(specs)} runs finished and kept; run the same command again to resume", file=sys.stderr)
        return None
    bar.close()
    return results


def budget_cells(specs: list[RunSpec], results: list[dict[str, Any]], axis: str) -> dict[str, str]:
    """Per row, what it spent of `--budget`'s axis (mean over seeds; "step cap" where the cap ended
    a run first), or why the row is not held to it."""
    runs: dict[str, list[tuple[RunSpec, dict]]] = {}
    for spec, res in zip(specs, results):
        runs.setdefault(spec.label, []).append((spec, res))
    cells = {}
    for label, rs in runs.items():
        spec = rs[0][0]
        if spec.kind != "objective":
            cells[label] = "not held: evaluated as is" if label == BASELINE else "not held: inference-time, spends at evaluation"
            continue
        entry = registry.get("objective", spec.name).cls
        why = held_to(axis, entry.online, entry.needs_reward)
        spent = [r["budget_run"] for _, r in rs if r.get("budget_run")]
        if why:
            cells[label] = f"not held: {why}"
        elif spent:
            used = sum(x["used"] for x in spent) / len(spent)
            cells[label] = f"{used:.4g} / {spent[0]['limit']:g}" + ("" if all(x["reached"] for x in spent) else " (step cap)")
    return cells


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.lock_fd, args.parent_pid)
    if args.quick:
        args.seeds, args.eval_prompts = 1, min(args.eval_prompts, 100)
    if args.jobs is None:  # tiny rows gain little from a second thread, much from a second run
        args.jobs = min(2, os.cpu_count() or 1) if args.quick else 1
    out = Path(args.out)
    specs = plan(args)  # every name resolved and every config validated before anything runs
    task = load_run_config(specs[0]).task.create()
    trials: list[RunSpec] = []
    if args.tune is not None:
        check_tune(args, len(task.eval_prompts()))
        trials = trial_specs(specs, args.tune, out, task.has_gold_reward)
        validate_configs(trials, "--tune")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create --out {out}: {e.strerror or e}. Choose a directory you can write to.") from None
    for stage_task, name in stages_needed(specs):  # before any run: every row starts from the same cached stages
        stages.build(name, stage_task, log=print, progress=True)
    meta = {
        "task": specs[0].config["task"]["name"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": "rlhfzoo bench " + " ".join(argv if argv is not None else sys.argv[2:]),
        "seeds": args.seeds,
        "eval_prompts": args.eval_prompts,
    }
    tuning = None
    if trials:  # --tune: the trials first, then every algorithm's chosen setting with the bench's seeds
        trial_results = run_phase(trials, args, "tune")
        if trial_results is None:
            return 130
        tuning = choose(trials, trial_results)
        specs = apply_choice(specs, tuning)
    results = run_phase(specs, args, "bench")
    if results is None:
        return 130
    analysis = analyse(specs, results)
    if tuning:
        analysis["tuning"] = tuning
    if args.checks:  # the literature's claims, measured here (checks.md, checks.json)
        analysis["checks"] = run_checks(meta["task"], out, analysis, log=print)
    budget = parse_budget(args.budget)
    if budget:
        meta["budget"] = {"axis": budget[0], "limit": budget[1], "step_cap": BUDGET_STEP_CAP}
        cells = budget_cells(specs, results, budget[0])
        for row in analysis["rows"]:
            row["budget_held"] = cells.get(row["algorithm"], "–")
    rows = analysis["rows"]
    (out / "leaderboard.json").write_text(json.dumps({"meta": meta, **analysis}, indent=1, default=float))
    md = markdown(rows, meta, analysis)
    (out / "leaderboard.md").write_text(md)
    plot_frontier(rows, out / "frontier.png", analysis["frontier"])
    plot_improvement(rows, analysis["pairwise"], out / "improvement.png")
    plot_curves(specs, results, rows, out / "curves.png")
    print(md)
    print(f"outputs in {out}: leaderboard.json, leaderboard.md, frontier.png, improvement.png, curves.png")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":  # a worker, or `python -m rlhfzoo.bench`: user errors as `rlhfzoo` reports them
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
