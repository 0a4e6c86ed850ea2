#!/usr/bin/env python
"""rlhfzoo against TRL on the same workload, side by side: seconds per optimizer step, tokens per
second and peak memory, as ratios measured in one run.

Run from the repository root (TRL is the optional extra `peers`: `pip install -e '.[peers]'`)::

    .venv/bin/python benchmarks/peers.py dpo --size tiny       # GPT-2 2 x 128, vocabulary 303
    .venv/bin/python benchmarks/peers.py dpo --size vocab32k   # GPT-2 4 x 256, vocabulary 32000
    .venv/bin/python benchmarks/peers.py dpo --size vocab128k  # ... vocabulary 128000
    .venv/bin/python benchmarks/peers.py dpo --size len512     # ... vocabulary 32000, 512-token sequences
    .venv/bin/python benchmarks/peers.py grpo --size tiny      # GRPO iterations against GRPOTrainer
    .venv/bin/python benchmarks/peers.py dpo --quick           # 2 repeats of few steps, printed only

Writes ``benchmarks/results/peers-<algorithm>-<size>.md`` (and ``.json``), not with ``--quick``.

The workload: a randomly initialised GPT-2 saved once (with a word-level tokenizer: one token per
word, so every sequence has exactly the lengths asked for) and read by every run; rows of random
words in TRL's standard formats (prompt/chosen/rejected for DPO, prompt-only for GRPO/RLOO), the
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
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# name: (layers, hidden, vocabulary, rows per step, prompt words, response words, steps)
SIZES = {
    "tiny": (2, 128, 303, 64, 8, 16, 30),
    "vocab32k": (4, 256, 32000, 16, 16, 48, 10),
    "vocab128k": (4, 256, 128000, 16, 16, 48, 6),  # the vocabulary x4
    "len512": (4, 256, 32000, 4, 64, 448, 6),  # sequences x8 (512 tokens), a quarter of the pairs
}
CONTEXT = 1024  # positions of every model; max_length of both libraries
# GRPO/RLOO: (prompts per step, group size, new tokens); the model of the size above.
ONLINE = {"prompts": 8, "group": 8, "new_tokens": 16}
CONTENDERS = {
    "dpo": ("trl", "rlhfzoo", "rlhfzoo-reference-model"),
    "grpo": ("trl", "rlhfzoo"),
    "rloo": ("trl", "rlhfzoo"),
}
SPECIALS = ["<pad>", "<bos>", "<eos>"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


# ------------------------------------------------------------------------------ the workload


def build(directory: Path, size: str) -> dict:
    """A random GPT-2 of `size` and its word-level tokenizer, saved to `directory`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    layers, hidden, vocab, *_ = SIZES[size]
    words = [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=CONTEXT, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64),
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return {"words": words, "params": sum(p.numel() for p in model.parameters())}


def rows(words: list[str], algorithm: str, size: str, steps: int) -> list[dict]:
    """The dataset of a run: every row seen once (DPO), or the prompts of every iteration (online)."""
    _, _, _, per_step, n_prompt, n_response, _ = SIZES[size]
    rng = random.Random(0)

    def text(n: int, lead: str = "") -> str:
        return lead + " ".join(rng.choice(words) for _ in range(n))

    if algorithm == "dpo":
        return [{"prompt": text(n_prompt), "chosen": text(n_response, " "), "rejected": text(n_response, " ")}
                for _ in range(per_step * steps)]
    return [{"prompt": text(n_prompt)} for _ in range(ONLINE["prompts"] * steps)]


def reward_first_word(prompts, completions, **_):
    """The online workload's reward: how many of the completion's words are `w0`..`w9` (cheap, deterministic)."""
    return [float(sum(w[1:].isdigit() and int(w[1:]) < 10 for w in c.split())) for c in completions]


# ------------------------------------------------------------------------------ one run, in its own process


def step_seconds(ends: list[float], warmup: int) -> float:
    """Median time between consecutive step ends, after `warmup` steps."""
    gaps = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    return statistics.median(gaps)


def run_trl(algorithm: str, model_dir: str, data: list[dict], steps: int, size: str, out: str) -> list[float]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class Ends(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    per_step = SIZES[size][3]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=out, max_steps=steps, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=True, dataloader_num_workers=0, disable_dropout=True, gradient_checkpointing=False, bf16=False, lr_scheduler_type="constant", seed=0)
    ends = Ends()
    if algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(per_device_train_batch_size=per_step, beta=0.1, max_length=CONTEXT, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data), processing_class=tok,
                             callbacks=[ends])
    else:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        Config, Trainer = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
        online = dict(per_device_train_batch_size=ONLINE["prompts"] * ONLINE["group"], num_generations=ONLINE["group"],
                      max_completion_length=ONLINE["new_tokens"], temperature=1.0, top_k=0, top_p=1.0, beta=0.04)
        args = Config(**online, **common)
        trainer = Trainer(model=model, reward_funcs=reward_first_word, args=args,
                          train_dataset=datasets.Dataset.from_list(data), processing_class=tok, callbacks=[ends])
    trainer.train()
    return ends.ends


def run_rlhfzoo(algorithm: str, mode: str, model_dir: str, data: list[dict], steps: int, size: str, out: str) -> list[float]:
    import rlhfzoo

    per_step = SIZES[size][3]
    policy = {"init": model_dir, "max_length": CONTEXT, "max_new_tokens": ONLINE["new_tokens"]}
    train = {"steps": steps, "lr": 1e-4, "lr_schedule": "constant", "eval_prompts": 0, "progress": False, "log_every": 1,
             "num_threads": 1}
    if algorithm == "dpo":
        spec = {"name": "dpo", "beta": 0.1, "reference": "model" if mode == "rlhfzoo-reference-model" else "cached"}
        train["batch_size"] = per_step
        reward = None
    else:
        spec = {"name": algorithm, "group_size": ONLINE["group"], **({"beta": 0.04} if algorithm == "grpo" else {"kl_coef": 0.04})}
        train["batch_size"] = ONLINE["prompts"]
        reward = lambda prompts, responses: reward_first_word(prompts, responses)  # noqa: E731
    rlhfzoo.train({"algorithm": spec, "policy": policy, "train": train}, train_dataset=data, reward=reward, output_dir=out)
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [m["elapsed"] for m in metrics]


def run_generate(model_dir: str, data: list[dict], steps: int) -> list[float]:
    """The floor of an online iteration on this machine: plain `model.generate` (KV cache) of every
    sample of an iteration at once, nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    ends = [time.perf_counter()]
    n = ONLINE["prompts"]
    for k in range(steps):
        prompts = [r["prompt"] for r in data[k * n : (k + 1) * n] for _ in range(ONLINE["group"])]
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            model.generate(**enc, do_sample=True, max_new_tokens=ONLINE["new_tokens"], top_k=0, pad_token_id=tok.pad_token_id)
        ends.append(time.perf_counter())
    return ends


def worker(args) -> dict:
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401 - imported by every contender: part of the baseline
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    if args.worker == "trl":
        import trl  # noqa: F401
    elif args.worker.startswith("rlhfzoo"):
        import rlhfzoo.trainer  # noqa: F401
    data = json.loads(Path(args.data).read_text())
    baseline = rss_mb()
    out = tempfile.mkdtemp(prefix=f"peers-{args.worker}-")
    start = time.perf_counter()
    if args.worker == "trl":
        ends = run_trl(args.algorithm, args.model, data, args.steps, args.size, out)
    elif args.worker == "generate":
        ends = run_generate(args.model, data, args.steps)
    else:
        ends = run_rlhfzoo(args.algorithm, args.worker, args.model, data, args.steps, args.size, out)
    return {
        "contender": args.worker,
        "seconds_per_step": step_seconds(ends, args.warmup),
        "steps_timed": len(ends) - 1 - args.warmup,
        "run_seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline,
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
    """Tokens through the policy per step: both sides of every pair (prompt + response + EOS), or
    the samples' new tokens at most (online; random weights rarely end a response early)."""
    _, _, _, per_step, n_prompt, n_response, _ = SIZES[size]
    if algorithm == "dpo":
        return per_step * 2 * (n_prompt + n_response + 1)
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
    contenders = list(CONTENDERS[args.algorithm]) + ([] if args.algorithm == "dpo" else ["generate"])
    if args.only:
        contenders = [c for c in contenders if c in args.only.split(",")]
    if "trl" in contenders:
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
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
                if done.returncode:
                    sys.exit(f"the {c} worker failed:\n{done.stderr[-4000:]}")
                results[c].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1}: {json.dumps(results[c][-1])}", flush=True)
    report(args, contenders, results, built["params"], load_before)


def report(args, contenders, results, params, load_before) -> None:
    layers, hidden, vocab, per_step, n_prompt, n_response, _ = SIZES[args.size]
    tokens = tokens_per_step(args.algorithm, args.size)
    base = "trl" if "trl" in contenders else contenders[0]
    med = {c: {k: statistics.median(r[k] for r in results[c]) for k in ("seconds_per_step", "peak_rss_mb", "baseline_rss_mb", "run_seconds")}
           for c in contenders}
    argv = " ".join(a for a in sys.argv[1:])
    if args.algorithm == "dpo":
        work = f"{per_step} pairs per step of {n_prompt}-word prompts and {n_response}-word responses, beta 0.1, lr 1e-4, AdamW"
    else:
        work = (f"{ONLINE['prompts']} prompts of {n_prompt} words x {ONLINE['group']} samples of up to {ONLINE['new_tokens']} "
                "new tokens per step, beta (KL coefficient) 0.04, lr 1e-4; reward: a cheap function of the words")
    lines = [
        f"# rlhfzoo vs TRL: {args.algorithm}, size `{args.size}`",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- load average before / after: {[round(x, 2) for x in load_before]} / {[round(x, 2) for x in os.getloadavg()]}",
        f"- command: `.venv/bin/python benchmarks/peers.py {argv}`",
        f"- model: GPT-2 {layers} layers x {hidden}, vocabulary {vocab}, {params / 1e6:.2f} M parameters, float32, random weights",
        f"- workload: {work}; {args.steps} steps per run, median step time after {args.warmup} warm-up steps; "
        f"{args.repeats} interleaved rounds, one CPU thread and one process per run",
        "",
        f"| contender | seconds per step | {'tokens' if args.algorithm == 'dpo' else 'new tokens (at most)'} per second "
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
    lines += ["", "Speed vs the baseline: its seconds per step over this one's (above 1: faster). Medians over the rounds.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"peers-{args.algorithm}-{args.size}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"argv": sys.argv[1:], "results": results, "medians": med}, indent=1) + "\n")
        print(f"written {stem}.md")


if __name__ == "__main__":
    main()
