#!/usr/bin/env python
"""Peak memory of LoRA against full fine-tuning: a few DPO steps on a small Llama, each in its own
process so that the peaks are separate.

Run from the repository root::

    .venv/bin/python benchmarks/lora_memory.py              # 6 layers x 512, vocabulary 32000, 3 steps
    .venv/bin/python benchmarks/lora_memory.py --quick      # 4 layers x 256, 2 steps, printed only

Writes ``benchmarks/results/lora-memory.md`` (not with ``--quick``).

Both runs train the same randomly initialised Llama (saved once to a temporary directory, the
`policy.init` of both) with `algorithm: dpo` through `rlhfzoo.train` for the same steps on the
same synthetic pairs; one with `policy.lora: {r: 16, lora_alpha: 32}` (all linear layers), one
without. Each worker reports its peak RSS (`ru_maxrss`), its RSS after the imports and the data,
with everything the run imports, before the model is built (the part of the peak that is not the
model's and its training state is about that), the
trainable and total parameters, the seconds per step, and the size of a checkpoint's weights
and of the saved `policy/`. Full fine-tuning holds the weights, their gradients, AdamW's two
moments and, while DPO caches the reference log-probs, a reference copy of the weights; LoRA
holds the weights once and the rest only for the adapter.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORDS = ["cat", "dog", "owl", "fox", "eel", "bee", "yak", "emu", "ant", "bat", "elk", "gnu", "hen", "jay", "koi", "ram"]
LORA = {"r": 16, "lora_alpha": 32}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def pairs() -> list[dict[str, str]]:
    return [
        {"prompt": f"The {a} met the {b} and", "chosen": f" greeted the {b} kindly.", "rejected": f" shouted at the {b}!"}
        for a in WORDS
        for b in WORDS[:4]
    ]


def build_model(directory: Path, layers: int, hidden: int, vocab: int) -> int:
    """A random Llama of this size with a BPE tokenizer of the pairs, saved to `directory`; its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfzoo.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([t for r in pairs() for t in r.values()], vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32 + 32,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def worker(mode: str, model: str, steps: int, threads: int) -> dict:
    """One run, in this process: what `main` reads from its last output line."""
    import accelerate  # noqa: F401 - what the run imports, in the baseline
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import rlhfzoo
    import rlhfzoo.trainer  # noqa: F401

    data = pairs()
    baseline = rss_mb()
    policy = {"init": model, "max_new_tokens": 8, **({"lora": LORA} if mode == "lora" else {})}
    out = Path(tempfile.mkdtemp(prefix=f"lora-memory-{mode}-"))
    start = time.time()
    result = rlhfzoo.train(
        {"algorithm": {"name": "dpo"}, "policy": policy,
         "train": {"steps": steps, "batch_size": 8, "lr": 1e-4, "eval_prompts": 0, "progress": False, "save_every": steps - 1,
                   "num_threads": threads}},
        train_dataset=data, output_dir=out,
    )
    seconds = time.time() - start
    params = list(result.policy.module.parameters())
    checkpoint = next((out / "checkpoints").glob("step-*/model.safetensors"))
    return {
        "mode": mode,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "seconds_per_step": result.summary["train_seconds"] / steps,
        "run_seconds": seconds,
        "checkpoint_weights_mb": checkpoint.stat().st_size / 2**20,
        "policy_dir_mb": sum(f.stat().st_size for f in (out / "policy").rglob("*") if f.is_file()) / 2**20,
        "first_loss": json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"],
    }


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft
    import torch
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 layers x 256, 2 steps")
    parser.add_argument("--worker", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.steps, args.threads)))
        return
    if args.quick:
        args.layers, args.hidden, args.steps = 4, 256, 2
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a checkpoint is written after steps - 1)")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lora-memory-model-") as directory:
        n_params = build_model(Path(directory), args.layers, args.hidden, args.vocab)
        rows = []
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, "--worker", mode, "--model", directory, "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if done.returncode:
                sys.exit(f"the {mode} worker failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    full, lora = rows
    argv = " ".join(sys.argv[1:])
    lines = [
        "# LoRA vs full fine-tuning: peak memory of DPO",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- load average before / after: {[round(x, 2) for x in load_before]} / {[round(x, 2) for x in os.getloadavg()]}",
        f"- command: `.venv/bin/python benchmarks/lora_memory.py{(' ' + argv) if argv else ''}`",
        f"- model: Llama, {args.layers} layers x hidden {args.hidden}, vocabulary {args.vocab} (untied head), "
        f"{n_params / 1e6:.1f} M parameters, float32, random weights, saved once and the `policy.init` of both runs",
        f"- run: `algorithm: dpo`, {args.steps} steps of batch 8 (pairs of ~12-token sequences), AdamW, "
        f"{args.threads} threads, each run in its own process; LoRA: `policy.lora: {json.dumps(LORA)}` (all linear layers)",
        "",
        "| | full fine-tuning | LoRA | LoRA / full |",
        "|---|---|---|---|",
    ]
    for key, label, fmt in (
        ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}"),
        ("baseline_rss_mb", "RSS after the imports, before the model (MiB)", "{:.0f}"),
        ("trainable_params", "trainable parameters", "{:,}"),
        ("total_params", "parameters in the module", "{:,}"),
        ("seconds_per_step", "seconds per step", "{:.2f}"),
        ("checkpoint_weights_mb", "checkpoint weights (MiB)", "{:.1f}"),
        ("policy_dir_mb", "saved `policy/` (MiB)", "{:.1f}"),
        ("first_loss", "first-step DPO loss (log 2 = 0.6931)", "{:.4f}"),
    ):
        ratio = f"{lora[key] / full[key]:.3g}" if key != "first_loss" else "-"
        lines.append(f"| {label} | {fmt.format(full[key])} | {fmt.format(lora[key])} | {ratio} |")
    above = (full["peak_rss_mb"] - full["baseline_rss_mb"], lora["peak_rss_mb"] - lora["baseline_rss_mb"])
    lines += [
        "",
        f"Peak above the imports: full {above[0]:.0f} MiB, LoRA {above[1]:.0f} MiB ({above[1] / above[0]:.2f}x); "
        f"the float32 weights alone are {n_params * 4 / 2**20:.0f} MiB. Full fine-tuning adds their gradients and AdamW's "
        "two moments (3x the weights) and, while DPO caches the reference log-probs, a reference copy; LoRA's reference "
        "is the same weights with the adapter off, and only the adapter has gradients and optimizer state.",
        "",
        "The seconds per step are those of a machine shared with other jobs (load averages above): read them as rough.",
        "",
    ]
    if not args.quick:  # a smoke run leaves the recorded results alone
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "lora-memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
