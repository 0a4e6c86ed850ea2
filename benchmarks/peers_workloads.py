"""The workloads of `benchmarks/peers.py` and one run of each library on them: the random GPT-2
and its word-level tokenizer, the rows, the settings both libraries share, and the functions that
train through TRL 1.16, through rlhfzoo and through plain `model.generate` (each in a worker
process of peers.py), returning the ends of the optimizer steps and the losses logged.

Where TRL 1.16 keeps each trainer: `DPOTrainer`, `GRPOTrainer`, `RLOOTrainer`, `KTOTrainer` and
`RewardTrainer` in `trl`; `CPOTrainer` (SimPO is CPO with `loss_type="simpo"`, `cpo_alpha=0`) and
`ORPOTrainer` in `trl.experimental.cpo` / `trl.experimental.orpo`.
"""
from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

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
# The offline objectives' settings, the same on both sides (the papers' values; rlhfzoo name -> value).
BETA = 0.1  # DPO, KTO
SIMPO = {"beta": 2.0, "gamma": 1.0}  # TRL: beta, simpo_gamma (the margin in the logit, as rlhfzoo's gamma)
ORPO_LAMBDA = 0.1  # rlhfzoo: lam; TRL: beta
PAIRED = ("dpo", "simpo", "orpo", "reward")  # trained on prompt/chosen/rejected rows
# Where TRL does not put the tokenizer's BOS before the prompt (rlhfzoo always does; TRL's CPO and
# ORPO do), the rows given to TRL carry it as text, so both libraries train on the same tokens.
# DPO is left as it was recorded (without: TRL's sequences are one token shorter).
TRL_BOS_IN_TEXT = ("kto", "reward")
SPECIALS = ["<pad>", "<bos>", "<eos>"]


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
    """The dataset of a run: every row seen once (offline), or the prompts of every iteration (online).
    KTO's rows are the DPO pairs unpaired (TRL's unpaired format): each pair's chosen response a
    desirable row, its rejected one an undesirable row, so a step of KTO trains on the same
    sequences as a step of DPO."""
    _, _, _, per_step, n_prompt, n_response, _ = SIZES[size]
    rng = random.Random(0)

    def text(n: int, lead: str = "") -> str:
        return lead + " ".join(rng.choice(words) for _ in range(n))

    if algorithm in PAIRED or algorithm == "kto":
        pairs = [{"prompt": text(n_prompt), "chosen": text(n_response, " "), "rejected": text(n_response, " ")}
                 for _ in range(per_step * steps)]
        if algorithm != "kto":
            return pairs
        return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"} for p in pairs for side in ("chosen", "rejected")]
    return [{"prompt": text(n_prompt)} for _ in range(ONLINE["prompts"] * steps)]


def rows_per_step(algorithm: str, size: str) -> int:
    """Rows per optimizer step, as both libraries count them: pairs, KTO's unpaired rows (twice the pairs), or prompts."""
    per_step = SIZES[size][3]
    return 2 * per_step if algorithm == "kto" else per_step if algorithm in PAIRED else ONLINE["prompts"]


def reward_first_word(prompts, completions, **_):
    """The online workload's reward: how many of the completion's words are `w0`..`w9` (cheap, deterministic)."""
    return [float(sum(w[1:].isdigit() and int(w[1:]) < 10 for w in c.split())) for c in completions]


def count_tokens() -> dict:
    """Count the tokens of every forward pass of a GPT-2 trunk (`GPT2Model`, under both the LM and
    the sequence-classification head), apart with and without gradients: non-padding tokens (the
    input ids under a cache, whose mask is longer) and padded positions. Returns the counters."""
    from transformers.models.gpt2 import modeling_gpt2

    counts = {f"{g}_{k}": 0 for g in ("grad", "nograd") for k in ("forwards", "tokens", "positions")}
    forward = modeling_gpt2.GPT2Model.forward

    @functools.wraps(forward)
    def counted(self, *args, **kwargs):
        import torch

        ids = args[0] if args else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if ids is not None:
            g = "grad" if torch.is_grad_enabled() else "nograd"
            counts[f"{g}_forwards"] += 1
            counts[f"{g}_positions"] += ids.numel()
            counts[f"{g}_tokens"] += int(mask.sum()) if mask is not None and mask.shape == ids.shape else ids.numel()
        return forward(self, *args, **kwargs)

    modeling_gpt2.GPT2Model.forward = counted
    return counts


# ------------------------------------------------------------------------------ one run of each library


def run_trl(algorithm: str, mode: str, model_dir: str, data: list[dict], steps: int, size: str, out: str) -> tuple[list[float], list[float]]:
    """Train through TRL's trainer of `algorithm`; (ends of the steps, losses logged). `mode`
    `trl-precompute`: KTO with `precompute_ref_log_probs=True` (the reference's log-probs of every
    row computed before the first step, as rlhfzoo's `reference: cached`)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    class Ends(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    batch = rows_per_step(algorithm, size)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if algorithm == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if algorithm in TRL_BOS_IN_TEXT:
        data = [{**r, "prompt": f"{tok.bos_token} {r['prompt']}"} for r in data]
    common = dict(output_dir=out, max_steps=steps, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=True, dataloader_num_workers=0, disable_dropout=True, gradient_checkpointing=False, bf16=False, lr_scheduler_type="constant", seed=0)
    offline = dict(per_device_train_batch_size=batch, max_length=CONTEXT, **common)
    ends = Ends()
    kwargs = dict(model=model, train_dataset=datasets.Dataset.from_list(data), processing_class=tok, callbacks=[ends])
    if algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(args=DPOConfig(beta=BETA, **offline), **kwargs)
    elif algorithm == "kto":
        from trl import KTOConfig, KTOTrainer

        trainer = KTOTrainer(args=KTOConfig(beta=BETA, precompute_ref_log_probs=mode == "trl-precompute", **offline), **kwargs)
    elif algorithm == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=SIMPO["beta"], simpo_gamma=SIMPO["gamma"], **offline)
        trainer = CPOTrainer(args=args, **kwargs)
    elif algorithm == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(args=ORPOConfig(beta=ORPO_LAMBDA, **offline), **kwargs)
    elif algorithm == "reward":
        from trl import RewardConfig, RewardTrainer

        trainer = RewardTrainer(args=RewardConfig(**offline), **kwargs)
    else:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        Config, Trainer = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
        online = dict(per_device_train_batch_size=ONLINE["prompts"] * ONLINE["group"], num_generations=ONLINE["group"],
                      max_completion_length=ONLINE["new_tokens"], temperature=1.0, top_k=0, top_p=1.0, beta=0.04)
        trainer = Trainer(reward_funcs=reward_first_word, args=Config(**online, **common), **kwargs)
    trainer.train()
    return ends.ends, ends.losses


def run_rlhfzoo(algorithm: str, mode: str, model_dir: str, data: list[dict], steps: int, size: str, out: str) -> tuple[list[float], list[float]]:
    """Train through `rlhfzoo.train`; (ends of the steps from `metrics.jsonl`'s `elapsed`, losses).
    `mode` `rlhfzoo-reference-model`: DPO / KTO with `reference: model` (the reference run every step);
    `rlhfzoo-system`: glibc's malloc left as it is (`train.cpu_allocator: system`)."""
    import rlhfzoo

    policy = {"init": model_dir, "max_length": CONTEXT, "max_new_tokens": ONLINE["new_tokens"]}
    train = {"steps": steps, "lr": 1e-4, "lr_schedule": "constant", "eval_prompts": 0, "progress": False, "log_every": 1,
             "num_threads": 1, "batch_size": rows_per_step(algorithm, size),
             "cpu_allocator": "system" if mode == "rlhfzoo-system" else "keep-freed"}
    reference = "model" if mode == "rlhfzoo-reference-model" else "cached"
    reward = None
    if algorithm in ("dpo", "kto"):
        spec = {"name": algorithm, "beta": BETA, "reference": reference}
    elif algorithm == "simpo":
        spec = {"name": "simpo", **SIMPO}
    elif algorithm == "orpo":
        spec = {"name": "orpo", "lam": ORPO_LAMBDA}
    elif algorithm == "reward":
        spec = {"name": "bradley-terry", "examples": "pairs"}
    else:
        spec = {"name": algorithm, "group_size": ONLINE["group"], **({"beta": 0.04} if algorithm == "grpo" else {"kl_coef": 0.04})}
        reward = lambda prompts, responses: reward_first_word(prompts, responses)  # noqa: E731
    task = {"test_fraction": 0.0}  # every row trained on, as TRL does (rlhfzoo holds out 10 % by default)
    rlhfzoo.train({"task": task, "algorithm": spec, "policy": policy, "train": train}, train_dataset=data, reward=reward, output_dir=out)
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [m["elapsed"] for m in metrics], [m["loss"] for m in metrics if "loss" in m]


def run_generate(model_dir: str, data: list[dict], steps: int) -> tuple[list[float], list[float]]:
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
    return ends, []
