"""The `sentiment` task: a synthetic movie-review language with a known gold reward.

The setting of Gao, Schulman & Hilton 2022 ("Scaling laws for reward model overoptimization",
arXiv:2210.10760): every algorithm is trained on labels derived from a gold reward and is scored
on that gold reward, so over-optimisation of a learned proxy is visible. The language, its gold
reward and its generator are `rlhfzoo.plugins.review_language`.

Derived data (from SFT samples, see `SentimentTask.examples`): an annotator perceives
u = gold + label_noise * Gumbel noise; pairs, K-wise rankings (Plackett-Luce) and KTO labels are
read off u, so P(a > b) = sigmoid((gold_a - gold_b) / label_noise) (Bradley-Terry). Margins come
from |gold_a - gold_b|; offline-RL rewards are the gold itself; judge critiques end in a rating
"[[k]]" with k = min(10, 1 + floor(5 * (gold + 1))).

The SFT samples are two stages of `rlhfzoo.plugins.sft_samples` (`sft-samples` for the train
prompts, `sft-samples-test` for the held-out ones): `samples_per_prompt` responses of the task's
SFT policy to each prompt. `stages_for` names them for every derived kind, so they are built before
the task is asked for such examples; `examples` only reads them.
"""

from __future__ import annotations

import math
import random
from itertools import combinations
from typing import Any, Sequence

import torch
from pydantic import Field, model_validator

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import Demonstration, PluginConfig, PreferencePair, RewardedExample, UnpairedExample
from rlhfzoo.plugins.review_language import (  # noqa: F401  (continue_review: the language's, re-exported with the task)
    SPECIAL_TOKENS,
    VOCAB,
    continue_review,
    gold_breakdown,
    gold_scores,
    make_demonstrations,
    make_prompts,
)
from rlhfzoo.plugins.sft_samples import SampleLabelledTask

KINDS = ("demonstrations", "pairs", "unpaired", "rewarded", "prompts", "rankings", "critiques")
DERIVED_KINDS = ("pairs", "unpaired", "rewarded", "rankings", "critiques")  # labelled from SFT samples


# ------------------------------------------------------------------------------ labels from samples
def _perceived(gold: float, noise: float, rng: random.Random) -> float:
    """gold + noise * Gumbel(0, 1): differences are logistic, so choices follow Bradley-Terry."""
    return gold - noise * math.log(-math.log(rng.random() or 1e-300))


def _distinct(prompts: Sequence[str], samples: Sequence[Sequence[str]], max_words: int):
    if len(prompts) != len(samples):
        raise ValueError(f"got {len(prompts)} prompts but {len(samples)} lists of samples")
    for p, rs in zip(prompts, samples):
        rs = list(dict.fromkeys(rs))
        yield p, rs, gold_scores([p] * len(rs), rs, max_words)


def margin_label(gap: float, significant: float = 0.5, slight: float = 0.2) -> float:
    """Llama-2-style preference strength from |gold gap|: significantly (1.0), slightly (0.5), negligibly (0.0) better."""
    return 1.0 if gap >= significant else 0.5 if gap >= slight else 0.0


def preference_pairs(prompts, samples, noise: float, seed: int | str = 0, max_words: int = 24,
                     significant: float = 0.5, slight: float = 0.2) -> list[PreferencePair]:
    """Disjoint pairs of each prompt's distinct samples, labelled by a Bradley-Terry draw, with margins."""
    rng, out = random.Random(f"pairs-{seed}"), []
    for p, rs, g in _distinct(prompts, samples, max_words):
        for a in range(0, len(rs) - 1, 2):
            i, j = (a, a + 1) if _perceived(g[a], noise, rng) >= _perceived(g[a + 1], noise, rng) else (a + 1, a)
            out.append(PreferencePair(p, rs[i], rs[j], margin=margin_label(abs(g[i] - g[j]), significant, slight)))
    return out


def ranking_pairs(prompts, samples, noise: float, seed: int | str = 0, k_min: int = 4, k_max: int = 9,
                  max_words: int = 24) -> list[PreferencePair]:
    """InstructGPT-style: K of each prompt's samples ranked by perceived gold (Plackett-Luce),
    expanded to K-choose-2 pairs sharing `group` (one group per prompt with >= 2 distinct samples)."""
    rng, out, group = random.Random(f"rankings-{seed}"), [], 0
    for p, rs, g in _distinct(prompts, samples, max_words):
        k = min(rng.randint(k_min, k_max), len(rs))
        if k < 2:
            continue
        u = [_perceived(x, noise, rng) for x in g[:k]]
        order = sorted(range(k), key=lambda i: -u[i])  # best first
        out += [PreferencePair(p, rs[i], rs[j], group=group) for i, j in combinations(order, 2)]
        group += 1
    return out


def unpaired_examples(prompts, samples, noise: float, seed: int | str = 0, quantile: float = 0.5,
                      max_words: int = 24) -> list[UnpairedExample]:
    """KTO labels: desirable when the perceived gold is above the `quantile` of all perceived golds."""
    rng = random.Random(f"unpaired-{seed}")
    rows = [(p, r, _perceived(x, noise, rng))
            for p, rs, g in _distinct(prompts, samples, max_words) for r, x in zip(rs, g)]
    if not rows:
        return []
    cut = sorted(u for _, _, u in rows)[min(len(rows) - 1, int(quantile * len(rows)))]
    return [UnpairedExample(p, r, u >= cut) for p, r, u in rows]


def rewarded_examples(prompts, samples, max_words: int = 24) -> list[RewardedExample]:
    return [RewardedExample(p, r, x) for p, rs, g in _distinct(prompts, samples, max_words) for r, x in zip(rs, g)]


def rating(gold: float) -> int:
    """Judge rating 1..10 of a gold reward: ten bins of width 0.2 over [-1, 1]."""
    return max(1, min(10, 1 + math.floor(5 * (gold + 1))))


def judge_prompt(prompt: str, response: str) -> str:
    return " ".join(x for x in ("judge :", prompt, response, "verdict :") if x.strip())


def critique(prompt: str, response: str, max_words: int = 24) -> str:
    """A short verdict in the task's words ending in the rating, e.g. "fluent , positive [[8]]"."""
    br = gold_breakdown(prompt, response, max_words)
    if br.empty:
        return f"empty [[{rating(br.gold)}]]"
    flaws = {"broken": br.broken > 0, "repetitive": br.repetition > 0, "too long": br.excess_words > 0}
    verdict = " and ".join(w for w, bad in flaws.items() if bad) or "fluent"
    if br.broken < 1:  # some sentence parsed: say how it reads
        s = br.sentiment
        verdict += " , " + ("strongly positive" if s >= 0.5 else "positive" if s >= 0.15 else "neutral" if s > -0.15
                            else "negative" if s > -0.5 else "strongly negative")
    return f"{verdict} [[{rating(br.gold)}]]"


def critique_examples(prompts, samples, max_words: int = 24) -> list[Demonstration]:
    return [Demonstration(judge_prompt(p, r), critique(p, r, max_words))
            for p, rs, _ in _distinct(prompts, samples, max_words) for r in rs]


# ------------------------------------------------------------------------------ the task
class SentimentTask(SampleLabelledTask):
    """Synthetic movie reviews with a programmatic gold reward; all preference data derived from it."""

    name = "sentiment"
    kinds, derived_kinds = KINDS, DERIVED_KINDS
    summary = (
        "Synthetic movie-review language with a known gold reward: gold = clip(S - 2b - 2r - 0.25*excess, -1, 1), "
        "S = mean word sentiment of the response's grammatical sentences, b = share of unparseable sentences, "
        "r = share of repeated content words, excess = words over max_response_words; empty = -1"
    )
    paper = "Gao, Schulman & Hilton 2022, Scaling Laws for Reward Model Overoptimization, arXiv:2210.10760"
    status = "stable"

    class Config(PluginConfig):
        seed: int = Field(0, description="Seed of the generated language data and of the label noise.")
        n_demonstrations: int = Field(16000, ge=1, description="SFT demonstrations in the train split.")
        n_test_demonstrations: int = Field(400, ge=1, description="SFT demonstrations in the test split.")
        n_prompts: int = Field(
            512, ge=1, description="Train prompts (online RL, and the prompts SFT samples are drawn for)."
        )
        n_test_prompts: int = Field(
            200, ge=1, description="Held-out prompts (evaluation); no prompt is in both splits."
        )
        samples_per_prompt: int = Field(
            10, ge=2, description="SFT samples per prompt from which labelled data is derived."
        )
        label_noise: float = Field(
            0.4, ge=0, description="Bradley-Terry temperature of the simulated annotator: P(a > b) = "
            "sigmoid((gold_a - gold_b) / label_noise); 0 labels by the gold ordering exactly.")
        significant_gap: float = Field(
            0.5, ge=0, description="Gold gap from which a pair is 'significantly better' (margin 1.0)."
        )
        slight_gap: float = Field(
            0.2, ge=0, description="Gold gap from which a pair is 'slightly better' (margin 0.5; below: 0.0)."
        )
        k_min: int = Field(4, ge=2, description="Fewest responses in a K-wise ranking.")
        k_max: int = Field(
            9, ge=2, description="Most responses in a K-wise ranking (at most samples_per_prompt are used)."
        )
        desirable_quantile: float = Field(
            0.5, ge=0, lt=1, description="KTO: a response is desirable when its perceived gold is above this quantile."
        )
        max_response_words: int = Field(
            24, ge=4, description="Longest response (in words) before the gold reward's length penalty."
        )

        @model_validator(mode="after")
        def _check(self):
            if self.k_min > self.k_max:
                raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
            if self.slight_gap > self.significant_gap:
                raise ValueError(
                    f"slight_gap ({self.slight_gap}) must not exceed significant_gap ({self.significant_gap})"
                )
            return self

    def _build(self, kind: str, split: str) -> list[Any]:
        c, test = self.config, split == "test"
        if kind == "prompts":
            return make_prompts(c.n_test_prompts if test else c.n_prompts, c.seed, split)
        if kind == "demonstrations":
            n = c.n_test_demonstrations if test else c.n_demonstrations
            return make_demonstrations(n, c.seed, split, c.max_response_words)
        prompts, samples = self.samples(split)
        seed, noise, words = f"{c.seed}-{split}", c.label_noise, c.max_response_words
        if kind == "pairs":
            return preference_pairs(prompts, samples, noise, seed, words, c.significant_gap, c.slight_gap)
        if kind == "rankings":
            return ranking_pairs(prompts, samples, noise, seed, c.k_min, c.k_max, words)
        if kind == "unpaired":
            return unpaired_examples(prompts, samples, noise, seed, c.desirable_quantile, words)
        if kind == "rewarded":
            return rewarded_examples(prompts, samples, words)
        return critique_examples(prompts, samples, words)


    def judge_prompt(self, prompt: str, response: str) -> str:
        """The judge's prompt in the task's words (what its critiques are written for)."""
        return judge_prompt(prompt, response)

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor(gold_scores(prompts, responses, self.config.max_response_words), dtype=torch.float32)

    def response_metrics(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        rows = [gold_breakdown(p, r, self.config.max_response_words) for p, r in zip(prompts, responses)]
        n = max(1, len(rows))
        return {
            "grammatical_rate": sum(not b.empty and b.broken == 0 for b in rows) / n,
            "sentiment": sum(b.sentiment for b in rows) / n,
            "repetition": sum(b.repetition for b in rows) / n,
            "too_long_rate": sum(b.excess_words > 0 for b in rows) / n,
        }

    def tokenizer(self, padding_side: str = "right") -> Any:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *VOCAB])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
            padding_side=padding_side, clean_up_tokenization_spaces=False,
        )

    def default_reward(self) -> dict[str, Any]:
        """Online algorithms train against the task's cached reward model (the `reward-model` stage)."""
        return {"name": "reward-model", "path": "auto"}

    def default_model_config(self) -> dict[str, Any]:
        # Reviews are <= ~35 tokens, judge prompt + critique <= ~60 with 32 generated tokens.
        return {"arch": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 96}

    def sft_recipe(self) -> dict[str, Any]:
        # 2 epochs of 16000 demonstrations, cosine-decayed learning rate: ~1 min on 2 CPU cores.
        # Measured (2026-11-22, 800 held-out samples per seed): grammatical rate 0.92-0.95 against
        # 0.89-0.91 for 400 steps on 4000; more steps help further (the errors are long-range
        # agreement slips, e.g. "was good and quite poorly filmed") but cost proportionally more.
        return {"steps": 1000, "batch_size": 32, "lr": 4e-3, "warmup_steps": 20, "lr_schedule": "cosine"}

    def sft_task_options(self) -> dict[str, Any]:
        # SFT reads only the demonstrations: label options must not retrain it.
        c = self.config
        return {"seed": c.seed, "n_demonstrations": c.n_demonstrations, "n_test_demonstrations": c.n_test_demonstrations,
                "max_response_words": c.max_response_words}


@hookimpl
def register_tasks(register):
    register(SentimentTask)
