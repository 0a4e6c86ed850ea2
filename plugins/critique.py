"""LLM-as-a-judge reward (`critique`): a judge model writes a short critique ending in a rating
`[[N]]`, N in 1..10 (MT-Bench single-answer grading, Zheng et al. 2023, arXiv:2306.05685), and

    reward = (N - 5.5) / 4.5          in [-1, 1]

Output without a parseable rating (or a request that failed after its retries) gets
`fallback_reward` and is counted in `metrics()` (`judge_unparseable`, `judge_failed`,
`judge_fallbacks`, `judge_fallback_rate`, which end up in summary.json); with `on_failure: raise`
it is an error instead. Never a silent zero, and never a run trained on fallbacks: when more than
`max_failure_rate` of one `score` call's responses (one iteration's batch) fall back, the judge is
broken and training stops with a `JudgeError` saying how many failed and why.

Pairwise mode, `compare(prompts, a, b)`: "which is better, A or B" (MT-Bench pairwise,
verdict `[[A]]`, `[[B]]` or `[[C]]` for a tie), judged in both orders to cancel position bias;
a pair whose two orders disagree counts as a tie, and how often that happens is reported
(`compare_disagreement_rate`).

Backends:
* `policy`: any registered policy generates the critique, e.g. a local `transformers` model
  (`judge: {name: hf, init: <dir>}`); `init: auto` is the task's `judge` stage, trained by the
  `sft` objective on the task's critique data (`configs/critique_judge.yaml` does the same by hand)
  and built, like every stage, before the reward source is constructed.
* `http`: an OpenAI-compatible chat-completions endpoint (`url`), the key read from the
  environment variable named by `api_key_env` (never logged, never sent anywhere but `url`:
  redirects are refused), with a timeout per request, retries with exponential back-off, and at
  most `concurrency` requests in flight.
Both live in `_judge_backends`.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, model_validator

from rlhfzoo import hookimpl, stages
from rlhfzoo.interfaces import PluginConfig, RewardSource
from rlhfzoo.plugins._judge_backends import HTTPJudge, JudgeBackend, JudgeError, PolicyJudge
from rlhfzoo.sections import PolicySection
from rlhfzoo.stages import TrainingStage

SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question below. Consider helpfulness, relevance, accuracy, depth and harmlessness. Begin with a short "
    "explanation, then rate the response on a scale of 1 to 10 in exactly this format: \"[[rating]]\", e.g. \"[[5]]\"."
)
SINGLE_TEMPLATE = (
    "[Question]\n{prompt}\n\n[The Start of Assistant's Answer]\n{response}\n[The End of Assistant's Answer]"
)
PAIR_SYSTEM = (
    "Please act as an impartial judge and compare the two responses of AI assistants to the user question below. "
    "Do not let the order of the responses, their length or the assistants' names influence you. Begin with a short "
    "explanation, then give your verdict in exactly this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if "
    "assistant B is better, \"[[C]]\" for a tie."
)
PAIR_TEMPLATE = (
    "[User Question]\n{prompt}\n\n[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]"
    "\n\n[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]"
)

# ------------------------------------------------------------------------------ parsing

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str | None, low: float = 1.0, high: float = 10.0) -> float | None:
    """The last `[[N]]` of a critique, N in [low, high]; None when there is none (or it is out of range)."""
    if not isinstance(text, str):
        return None
    found = _RATING.findall(text)
    if not found:
        return None
    n = float(found[-1])
    return n if low <= n <= high else None


def rating_to_reward(n: float, low: float = 1.0, high: float = 10.0) -> float:
    """Map a rating in [low, high] linearly to [-1, 1]: (N - 5.5) / 4.5 for 1..10."""
    mid, half = (low + high) / 2, (high - low) / 2
    return (n - mid) / half


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'C' (tie) from the last `[[A]]` / `[[B]]` / `[[C]]`; None when absent."""
    if not isinstance(text, str):
        return None
    found = _VERDICT.findall(text)
    return found[-1] if found else None


# ------------------------------------------------------------------------------ the judge stage

# Train settings of the task's default judge: SFT on its critiques, from its SFT policy (a task
# may override them with `judge_recipe()`). It must learn word sentiment and grammaticality from a
# few verdict tokens per example, and that comes late and needs a moderate lr. On sentiment,
# Spearman correlation with the gold reward over 300 held-out responses:
#   lr 1e-3:  800 steps 0.12, 1200 0.69, 1600 0.75 (seed 1: 0.75), 2000 0.87 (seed 1: 0.88), 2400 0.84
#   lr 2e-3:  800 steps 0.43, 1600 0.44 (too high: it settles on the majority verdicts)
# (all cosine-decayed); at a constant lr 1e-3 the verdicts come by 1000 steps: 0.80-0.81, in half the time.
JUDGE_RECIPE: dict[str, Any] = {"steps": 1000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "lr_schedule": "constant"}


def judge_run_data(task: Any) -> dict[str, Any]:
    """The run config (as a mapping) of the task's judge stage."""
    recipe = getattr(task, "judge_recipe", None)
    return {
        "task": {"name": task.name, **task.config.model_dump(mode="json")},
        "policy": {"name": "hf", "init": "sft"},
        "algorithm": {"name": "sft", "examples": "critiques"},
        "train": {**JUDGE_RECIPE, **(recipe() if callable(recipe) else {}), "progress": False, "eval_prompts": 0},
    }


class JudgeStage(TrainingStage):
    name = "judge"
    summary = "The task's critique judge (`critique` with `judge.init: auto`): sft on its critiques, from its SFT policy."
    paper = "Zheng et al. 2023, arXiv:2306.05685"
    requires = ("sft",)
    trains = "the critique judge"

    def run_data(self, task) -> dict[str, Any]:
        return judge_run_data(task)


def task_judge_prompt(task: Any) -> Callable[[str, str], str] | None:
    """The task's own judge-prompt format: a `judge_prompt(prompt, response)` method, or a function of
    that name in the task's module (as `sentiment` has); None when the task has none."""
    fn = getattr(task, "judge_prompt", None)
    if callable(fn):
        return fn
    fn = getattr(sys.modules.get(type(task).__module__), "judge_prompt", None) if task is not None else None
    return fn if callable(fn) else None


# ------------------------------------------------------------------------------ the reward source


class CritiqueConfig(PluginConfig):
    backend: Literal["policy", "http"] = Field("policy", description="`policy`: a registered policy writes the critique; `http`: an OpenAI-compatible endpoint.")
    judge: PolicySection = Field(
        default_factory=lambda: {"name": "hf", "init": "auto", "top_k": 1, "max_new_tokens": 16}, validate_default=True,
        description="policy backend: the judge's policy section (`name` + that policy's options). `init: auto`: the "
        "task's `judge` stage (sft on the task's critiques; `rlhfzoo stage judge` builds it, and so do `rlhfzoo train` "
        "and `rlhfzoo bench` before they start). `top_k: 1` decodes greedily.",
    )
    batch_size: int = Field(64, ge=1, description="policy backend: prompts per generate call.")
    template: str = Field(
        "auto",
        description="Judge prompt, a format string with {prompt} and {response}; `auto`: the task's own judge format "
        "where it has one (e.g. sentiment's), else an MT-Bench single-answer template with a system prompt.",
    )
    pairwise_template: str = Field(PAIR_TEMPLATE, description="compare(): format string with {prompt}, {response_a}, {response_b}.")
    system_prompt: str | None = Field(
        None, description="System prompt of single ratings (null: the MT-Bench-style default, none with the task's own format)."
    )
    fallback_reward: float = Field(0.0, description="Reward of output without a parseable [[N]] or of a failed request (counted).")
    on_failure: Literal["fallback", "raise"] = Field("fallback", description="`fallback`: use fallback_reward and count it; `raise`: an error.")
    max_failure_rate: float = Field(
        0.2, ge=0, le=1,
        description="With on_failure: fallback, stop with an error when more than this fraction of one score() call's "
        "responses (one iteration's batch) get fallback_reward; 1: never stop.",
    )
    url: str | None = Field(None, description="http backend: base URL (…/v1) or full chat-completions URL.")
    model: str | None = Field(None, description="http backend: the model name sent with each request.")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="http backend: environment variable holding the API key (the key is never logged).")
    timeout: float = Field(30.0, gt=0, description="http backend: seconds per request.")
    retries: int = Field(2, ge=0, description="http backend: retries after a timeout, a 429/5xx or a garbled answer.")
    retry_backoff: float = Field(0.5, ge=0, description="http backend: seconds before the first retry, doubled each time.")
    concurrency: int = Field(4, ge=1, description="http backend: requests in flight at once.")
    max_tokens: int = Field(256, ge=1, description="http backend: most tokens of a critique.")
    temperature: float = Field(0.0, ge=0, description="http backend: sampling temperature.")

    @model_validator(mode="after")
    def _check(self):
        if self.backend == "http" and not (self.url and self.model):
            raise ValueError("backend `http` needs `url` (an OpenAI-compatible endpoint) and `model`")
        if self.template != "auto":
            _check_template(self.template, ("prompt", "response"))
        _check_template(self.pairwise_template, ("prompt", "response_a", "response_b"))
        return self


def _check_template(template: str, fields: tuple[str, ...]) -> None:
    try:
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"template {template[:60]!r}… must use only the fields {', '.join('{' + f + '}' for f in fields)} ({e})") from None
    missing = [f for f in fields if "{" + f + "}" not in template]
    if missing:
        raise ValueError(f"template {template[:60]!r}… lacks {', '.join('{' + f + '}' for f in missing)}")


class CritiqueReward(RewardSource):
    name = "critique"
    aliases = ("judge", "llm-judge")
    summary = "LLM-as-a-judge: a critique ending in [[N]] (1-10), reward (N - 5.5) / 4.5; local policy or OpenAI-compatible endpoint; pairwise compare()."
    paper = "Zheng et al. 2023, Judging LLM-as-a-judge with MT-Bench, arXiv:2306.05685"
    Config = CritiqueConfig

    @classmethod
    def required_stages(cls, config: CritiqueConfig) -> list[str]:
        """The task's `judge` stage for `judge.init: auto`, else whatever the judge policy reads."""
        if config.backend != "policy":
            return []
        if config.judge.options.get("init") == "auto":
            return ["judge"]
        return config.judge.required_stages()

    def __init__(self, config=None, task=None, backend: JudgeBackend | None = None):
        super().__init__(config, task)
        c = self.config
        self.backend = backend or self._build_backend()
        own = task_judge_prompt(task) if c.template == "auto" else None
        if own is not None:
            self.format, self.system = own, c.system_prompt
        else:
            template = SINGLE_TEMPLATE if c.template == "auto" else c.template
            self.format = lambda p, r: template.format(prompt=p, response=r)
            self.system = c.system_prompt if c.system_prompt is not None else SINGLE_SYSTEM
        self.counts = {"calls": 0, "unparseable": 0, "failed": 0, "compare_pairs": 0, "compare_disagreements": 0,
                       "compare_unparseable": 0}
        self.rating_sum = 0.0

    def _build_backend(self) -> JudgeBackend:
        c = self.config
        if c.backend == "http":
            return HTTPJudge(c.url, c.model, c.api_key_env, c.timeout, c.retries, c.retry_backoff, c.concurrency,
                             c.max_tokens, c.temperature)
        judge = c.judge
        if judge.options.get("init") == "auto":
            if self.task is None:
                raise ValueError("critique: `judge.init: auto` needs a task (its cached judge)")
            judge = judge.with_options(init=str(stages.path("judge", self.task)))
        return PolicyJudge(judge.create(task=self.task), c.batch_size)

    def critiques(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str | None]:
        """The judge's raw critiques (None where a request failed)."""
        if len(prompts) != len(responses):
            raise ValueError(f"critique got {len(prompts)} prompts but {len(responses)} responses")
        return self.backend.complete(self.system, [self.format(p, r) for p, r in zip(prompts, responses)])

    def score(self, prompts, responses) -> torch.Tensor:
        rewards, failed, unrated = [], 0, []
        for text in self.critiques(prompts, responses):
            n = parse_rating(text)
            if n is not None:
                self.rating_sum += n
                rewards.append(rating_to_reward(n))
                continue
            if text is None:  # the request failed for good
                failed += 1
            else:
                unrated.append(text)
            rewards.append(self.config.fallback_reward)
        self.counts["calls"] += len(rewards)
        self.counts["failed"] += failed
        self.counts["unparseable"] += len(unrated)
        if failed or unrated:
            self._check_fallbacks(len(rewards), failed, unrated)
        return torch.tensor(rewards, dtype=torch.float32)

    def _check_fallbacks(self, total: int, failed: int, unrated: list[str]) -> None:
        """Raise a JudgeError when these fallbacks are not allowed: any at all with `on_failure:
        raise`, else more than `max_failure_rate` of the batch. The message says why, without secrets."""
        c, backend = self.config, self.backend
        reasons = []
        if failed:
            reasons.append(f"last failure at {backend.where}: {backend.last_failure or 'request failed'}")
        if unrated:
            reasons.append(backend.redact(f"no [[rating]] in {unrated[-1]!r:.120}"))
        why = "; ".join(reasons)
        if c.on_failure == "raise":
            raise JudgeError(f"critique: judge output unusable ({why}); set on_failure: fallback to count it instead")
        k = failed + len(unrated)
        if k / total > c.max_failure_rate:
            raise JudgeError(
                f"critique: {k} of {total} judge requests of this batch got no rating ({failed} failed, {len(unrated)} "
                f"without a [[rating]]), more than max_failure_rate={c.max_failure_rate:g}; {why}. Make {backend.where} "
                "answer with a [[rating]] (is it up? are its settings and the template right?), or raise the critique "
                "reward's max_failure_rate (1: never stop)"
            )

    def compare(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> torch.Tensor:
        """Pairwise verdicts [B] float32: +1 A is better, -1 B is better, 0 a tie -- or the two orders
        disagree, or a verdict is missing (both counted in `metrics()`)."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(f"compare got {len(prompts)} prompts, {len(responses_a)} A and {len(responses_b)} B responses")
        fmt = self.config.pairwise_template.format
        n = len(prompts)
        users = [fmt(prompt=p, response_a=a, response_b=b) for p, a, b in zip(prompts, responses_a, responses_b)]
        users += [fmt(prompt=p, response_a=b, response_b=a) for p, a, b in zip(prompts, responses_a, responses_b)]
        texts = self.backend.complete(PAIR_SYSTEM, users)
        value = {"A": 1.0, "B": -1.0, "C": 0.0}
        out = []
        for first, second in zip(texts[:n], texts[n:]):
            v1, v2 = parse_verdict(first), parse_verdict(second)
            if v1 is None or v2 is None:
                self.counts["compare_unparseable"] += 1
                out.append(0.0)
                continue
            a_first, a_second = value[v1], -value[v2]  # second order: A was shown as B
            if a_first != a_second:
                self.counts["compare_disagreements"] += 1
                out.append(0.0)
            else:
                out.append(a_first)
        self.counts["compare_pairs"] += n
        return torch.tensor(out, dtype=torch.float32)

    def metrics(self) -> dict[str, float]:
        c = self.counts
        scored = c["calls"] - c["unparseable"] - c["failed"]
        out = {f"judge_{k}": float(v) for k, v in c.items() if not k.startswith("compare")}
        out["judge_fallbacks"] = float(c["unparseable"] + c["failed"])
        out["judge_fallback_rate"] = out["judge_fallbacks"] / max(1, c["calls"])
        if scored:
            out["judge_mean_rating"] = self.rating_sum / scored
        if c["compare_pairs"]:
            out.update(compare_pairs=float(c["compare_pairs"]),
                       compare_disagreement_rate=c["compare_disagreements"] / c["compare_pairs"],
                       compare_unparseable=float(c["compare_unparseable"]))
        out.update(self.backend.metrics())
        return out


@hookimpl
def register_reward_sources(register):
    register(CritiqueReward)


@hookimpl
def register_stages(register):
    register(JudgeStage)
