#!/usr/bin/env python
"""rlhfzoo against TRL on the same workload, side by side: seconds per optimizer step, tokens per
second and peak memory, as ratios measured in one run.

Run from the repository root (TRL is the optional extra `peers`: `pip install -e '.[peers]'`)::

    .venv/bin/python benchmarks/peers.py dpo --size tiny       # GPT-2 2 x 128, vocabulary 303
    .venv/bin/python benchmarks/peers.py dpo --size vocab32k   # GPT-2 4 x 256, vocabulary 32000
    .venv/bin/python benchmarks/peers.py dpo --size vocab128k  # ... vocabulary 128000
    .venv/bin/python benchmarks/peers.py dpo --size len512     # ... vocabulary 32000, 512-token sequences
    .venv/bin/python benchmarks/peers.py grpo --size tiny      # GRPO iterations against GRPOTrainer
    .venv/bin/python benchmarks/peers.py kto --size tiny       # also simpo, orpo, reward (reward-model training)
    .venv/bin/python benchmarks/peers.py dpo --quick           # 2 repeats of few steps, printed only

Writes ``benchmarks/results/peers-<algorithm>-<size>.md`` (and ``.json``), not with ``--quick``.

The workload: a randomly initialised GPT-2 saved once (with a word-level tokenizer: one token per
word, so every sequence has exactly the lengths asked for) and read by every run; rows of random
words in TRL's standard formats (prompt/chosen/rejected for DPO, SimPO, ORPO and the reward model;
the same pairs unpaired into prompt/completion/label rows for KTO; prompt-only for GRPO/RLOO), the
same rows for every run; one CPU thread per run, each run in its own process (its peak RSS is its
own), the runs interleaved (`--repeats` rounds of every contender) so a change in the machine's
load hits all of them alike.

Seconds per step is the median over the steps after the first `--warmup` of the time between
the ends of consecutive optimizer steps: for TRL from a `TrainerCallback`, for rlhfzoo from the
`elapsed` field of `metrics.jsonl` (logged every step). Start-up, reference caching (rlhfzoo's
`reference: cached` computes the reference log-probs of every row before the first step) and the
final save are outside it and reported apart as the run's wall time. Dropout is off in both (TRL's
`disable_dropout`, rlhfzoo's default). Both train in float32 without gradient checkpointing, which
are rlhfzoo's defaults; TRL's own on a CPU are bf16 autocast and gradient checkpointing, set off
here (`bf16=False, gradient_checkpointing=False`): with them, on a CPU without bf16 matrix units,
its tiny-model DPO step measured 5-7 s instead of 0.3-0.6 s.

The contenders: TRL 1.16's trainer (`trl`; the workloads and the trainers' settings are in
`peers_workloads.py`), rlhfzoo with its defaults (`rlhfzoo`), and where a reference model is
involved rlhfzoo with `reference: model` (`rlhfzoo-reference-model`: the reference run every
step, as TRL's default does) and, for KTO, TRL with `precompute_ref_log_probs=True`
(`trl-precompute`: as rlhfzoo's default `reference: cached`). Every worker counts the tokens of
each forward pass of the GPT-2 trunk, so the report shows that both sides did the same work (and
that the loss moved).

On the CPU rlhfzoo sets glibc's malloc to keep freed memory for the next step (`train.cpu_allocator:
keep-freed`, rlhfzoo.cpu_memory), which TRL does not. Two more contenders show that gain apart:
`trl-keep-freed` (TRL with the same thresholds, through glibc's `MALLOC_MMAP_THRESHOLD_` and
`MALLOC_TRIM_THRESHOLD_` environment variables, which a TRL user can set by hand) and
`rlhfzoo-system` (rlhfzoo with `cpu_allocator: system`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rlhfzoo.cpu_memory import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402
from peers_workloads import (  # noqa: E402
    BETA, ONLINE, ORPO_LAMBDA, PAIRED, SIMPO, SIZES, build, count_tokens, rows, run_generate, run_rlhfzoo, run_trl,
)

CONTENDERS = {
    "dpo": ("trl", "rlhfzoo", "rlhfzoo-reference-model"),
    "kto": ("trl", "trl-precompute", "rlhfzoo", "rlhfzoo-reference-model"),
    "simpo": ("trl", "rlhfzoo"),
    "orpo": ("trl", "rlhfzoo"),
    "reward": ("trl", "rlhfzoo"),
    "grpo": ("trl", "rlhfzoo"),
    "rloo": ("trl", "rlhfzoo"),
}
# Every workload also runs TRL under the malloc thresholds rlhfzoo sets on the CPU (`train.cpu_allocator`),
# set through glibc's environment, and rlhfzoo without them: the two effects apart.
ALLOCATOR_CONTENDERS = ("trl-keep-freed", "rlhfzoo-system")
KEEP_FREED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def step_seconds(ends: list[float], warmup: int) -> float:
    """Median time between consecutive step ends, after `warmup` steps."""
    gaps = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    return statistics.median(gaps)


# ------------------------------------------------------------------------------ one run, in its own process


def worker(args) -> dict:
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401 - imported by every contender: part of the baseline
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    if args.worker.startswith("trl"):
        import trl  # noqa: F401
    elif args.worker.startswith("rlhfzoo"):
        import rlhfzoo.trainer  # noqa: F401
    data = json.loads(Path(args.data).read_text())
    counts = count_tokens()
    baseline = rss_mb()
    out = tempfile.mkdtemp(prefix=f"peers-{args.worker}-")
    start = time.perf_counter()
    if args.worker.startswith("trl"):
        ends, losses = run_trl(args.algorithm, args.worker, args.model, data, args.steps, args.size, out)
    elif args.worker == "generate":
        ends, losses = run_generate(args.model, data, args.steps)
    else:
        ends, losses = run_rlhfzoo(args.algorithm, args.worker, args.model, data, args.steps, args.size, out)
    run_seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)  # the run's checkpoints and final weights: not needed
    return {
        "contender": args.worker,
        "seconds_per_step": step_seconds(ends, args.warmup),
        "steps_timed": len(ends) - 1 - args.warmup,
        "run_seconds": run_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline,
        "losses": losses,
        "grad_tokens_per_step": counts["grad_tokens"] / args.steps,
        "grad_positions_per_step": counts["grad_positions"] / args.steps,
        **{k: v for k, v in counts.items() if k.startswith("nograd")},
    }


# ------------------------------------------------------------------------------ the comparison


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "cpu"
    import torch
    import transformers

    try:
        import trl

        peer = f"trl {trl.__version__}"
    except ImportError:
        peer = "trl not installed"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, {peer}, python {platform.python_version()}"


def tokens_per_step(algorithm: str, size: str) -> int:
    """Tokens through the policy per step: both sides of every pair (DPO: prompt + response + EOS,
    as TRL's DPO sequences; the others with the BOS both libraries put first), KTO's unpaired rows
    (the same sequences), or the samples' new tokens at most (online; random weights rarely end a
    response early)."""
    _, _, _, per_step, n_prompt, n_response, _ = SIZES[size]
    if algorithm == "dpo":
        return per_step * 2 * (n_prompt + n_response + 1)
    if algorithm in PAIRED or algorithm == "kto":
        return per_step * 2 * (1 + n_prompt + n_response + 1)
    return ONLINE["prompts"] * ONLINE["group"] * ONLINE["new_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algorithm", choices=sorted(CONTENDERS))
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the size's)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every contender, interleaved")
    parser.add_argument("--only", help="comma-separated contenders (default: all)")
    parser.add_argument("--quick", action="store_true", help="6 steps, 1 warm-up, printed only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 6, 1
    args.steps = args.steps or SIZES[args.size][6]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    contenders = list(CONTENDERS[args.algorithm]) + list(ALLOCATOR_CONTENDERS) + (["generate"] if args.algorithm in ("grpo", "rloo") else [])
    if args.only:
        contenders = [c for c in contenders if c in args.only.split(",")]
    if any(c.startswith("trl") for c in contenders):
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("TRL is not installed: pip install -e '.[peers]' (or leave it out with --only)")

    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        built = build(Path(tmp) / "model", args.size)
        data = Path(tmp) / "rows.json"
        data.write_text(json.dumps(rows(built["words"], args.algorithm, args.size, args.steps)))
        for round_ in range(args.repeats):
            for c in contenders:
                cmd = [sys.executable, __file__, args.algorithm, "--size", args.size, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--worker", c, "--model", str(Path(tmp) / "model"), "--data", str(data)]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       **(KEEP_FREED_ENV if c == "trl-keep-freed" else {})}
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
                if done.returncode:
                    sys.exit(f"the {c} worker failed:\n{done.stderr[-4000:]}")
                results[c].append(json.loads(done.stdout.strip().splitlines()[-1]))
                shown = {k: v for k, v in results[c][-1].items() if k != "losses"}
                print(f"round {round_ + 1}: {json.dumps(shown)}", flush=True)
    report(args, contenders, results, built["params"], load_before)


def workload(algorithm: str, size: str) -> str:
    """The report's one-line description of the workload of `algorithm`."""
    _, _, _, per_step, n_prompt, n_response, _ = SIZES[size]
    pairs = f"{per_step} pairs per step of {n_prompt}-word prompts and {n_response}-word responses"
    return {
        "dpo": f"{pairs}, beta 0.1, lr 1e-4, AdamW",
        "kto": f"{2 * per_step} unpaired rows per step (the chosen and rejected responses of {pairs}, labelled desirable and "
        f"undesirable), beta {BETA}, z0 from the mismatched pairs of each step's rows, lr 1e-4, AdamW",
        "simpo": f"{pairs}, beta {SIMPO['beta']}, gamma {SIMPO['gamma']} (TRL: CPOTrainer, loss_type simpo, cpo_alpha 0), lr 1e-4, AdamW",
        "orpo": f"{pairs}, lambda {ORPO_LAMBDA} (TRL's beta), lr 1e-4, AdamW",
        "reward": f"{pairs}, Bradley-Terry reward model (a bias-free scalar head on the last token), lr 1e-4, AdamW",
    }.get(algorithm, f"{ONLINE['prompts']} prompts of {n_prompt} words x {ONLINE['group']} samples of up to {ONLINE['new_tokens']} "
          "new tokens per step, beta (KL coefficient) 0.04, lr 1e-4; reward: a cheap function of the words")


def report(args, contenders, results, params, load_before) -> None:
    layers, hidden, vocab, *_ = SIZES[args.size]
    tokens = tokens_per_step(args.algorithm, args.size)
    base = "trl" if "trl" in contenders else contenders[0]
    med = {c: {k: statistics.median(r[k] for r in results[c]) for k in ("seconds_per_step", "peak_rss_mb", "baseline_rss_mb", "run_seconds")}
           for c in contenders}
    argv = " ".join(a for a in sys.argv[1:])
    offline = args.algorithm in PAIRED or args.algorithm == "kto"
    lines = [
        f"# rlhfzoo vs TRL: {args.algorithm}, size `{args.size}`",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- load average before / after: {[round(x, 2) for x in load_before]} / {[round(x, 2) for x in os.getloadavg()]}",
        f"- command: `.venv/bin/python benchmarks/peers.py {argv}`",
        f"- model: GPT-2 {layers} layers x {hidden}, vocabulary {vocab}, {params / 1e6:.2f} M parameters, float32, random weights",
        f"- workload: {workload(args.algorithm, args.size)}; {args.steps} steps per run, median step time after {args.warmup} "
        f"warm-up steps; {args.repeats} interleaved rounds, one CPU thread and one process per run",
        "",
        f"| contender | seconds per step | {'tokens' if offline else 'new tokens (at most)'} per second "
        f"| speed vs {base} | peak RSS (MiB) | memory vs {base} | peak RSS above imports (MiB) | above imports vs {base} "
        "| run wall (s) | per round (s/step) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        m, b = med[c], med[base]
        above, above_b = m["peak_rss_mb"] - m["baseline_rss_mb"], b["peak_rss_mb"] - b["baseline_rss_mb"]
        rounds = ", ".join(f"{r['seconds_per_step']:.3f}" for r in results[c])
        lines.append(
            f"| {c} | {m['seconds_per_step']:.3f} | {tokens / m['seconds_per_step']:.0f} | {b['seconds_per_step'] / m['seconds_per_step']:.2f}x "
            f"| {m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] / b['peak_rss_mb']:.2f}x | {above:.0f} | {above / above_b:.2f}x "
            f"| {m['run_seconds']:.1f} | {rounds} |"
        )
    lines += ["", "Speed vs the baseline: its seconds per step over this one's (above 1: faster). Medians over the rounds.", "",
              "The work done, counted in every forward pass of the GPT-2 trunk (first round): tokens (padding left out) and "
              "padded positions of the passes with gradients per step; passes without gradients in the whole run (reference, "
              "KL estimate, precomputed reference, sampling); the loss logged at the first and last step.", "",
              "| contender | tokens with grad per step | positions with grad per step | passes without grad | tokens without grad "
              "| loss first -> last |", "|---|---|---|---|---|---|"]
    for c in contenders:
        r = results[c][0]
        loss = f"{r['losses'][0]:.6f} -> {r['losses'][-1]:.6f}" if r["losses"] else "-"
        lines.append(f"| {c} | {r['grad_tokens_per_step']:.0f} | {r['grad_positions_per_step']:.0f} | {r['nograd_forwards']} "
                     f"| {r['nograd_tokens']} | {loss} |")
    text = "\n".join(lines + [""])
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"peers-{args.algorithm}-{args.size}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"argv": sys.argv[1:], "results": results, "medians": med}, indent=1) + "\n")
        print(f"written {stem}.md")


if __name__ == "__main__":
    main()
