"""LLM-as-a-judge reward (`critique`): a judge model writes a short critique ending in a rating
`[[N]]`, N in 1..10 (MT-Bench single-answer grading, Zheng et al. 2023, arXiv:2306.05685), and

    reward = (N - 5.5) / 4.5          in [-1, 1]

Output without a parseable rating (or a request that failed after its retries) gets
`fallback_reward` and is counted in `metrics()` (`judge_unparseable`, `judge_failed`); with
`on_failure: raise` it is an error instead. Never a silent zero.

Pairwise mode, `compare(prompts, a, b)`: "which is better, A or B" (MT-Bench pairwise,
verdict `[[A]]`, `[[B]]` or `[[C]]` for a tie), judged in both orders to cancel position bias;
a pair whose two orders disagree counts as a tie, and how often that happens is reported
(`compare_disagreement_rate`).

Backends:
* `policy`: any registered policy generates the critique, e.g. a local `transformers` model
  (`judge: {name: hf, init: <dir>}`); `init: auto` is the task's cached judge, trained by the
  `sft` objective on the task's critique data (`configs/critique_judge.yaml` does the same by hand).
* `http`: an OpenAI-compatible chat-completions endpoint (`url`), the key read from the
  environment variable named by `api_key_env` (never logged), with a timeout per request,
  retries with exponential back-off, and at most `concurrency` requests in flight.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, model_validator

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import PluginConfig, RewardSource

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


# ------------------------------------------------------------------------------ backends


class JudgeError(RuntimeError):
    """The judge cannot be used as configured (e.g. the endpoint rejects the request or the key)."""


class JudgeBackend(ABC):
    """Generates one completion per user message; None where a request failed for good."""

    @abstractmethod
    def complete(self, system: str | None, users: Sequence[str]) -> list[str | None]: ...

    def metrics(self) -> dict[str, float]:
        return {}


class PolicyJudge(JudgeBackend):
    """A registered policy writes the critiques (greedy with `top_k: 1`), in batches, without
    disturbing the caller's random state."""

    def __init__(self, policy: Any, batch_size: int = 64):
        self.policy = policy
        self.batch_size = batch_size
        policy.module.requires_grad_(False)
        policy.module.eval()
        if torch.cuda.is_available():
            policy.module.to("cuda")

    def complete(self, system, users):
        prompts = [f"{system}\n\n{u}" if system else u for u in users]
        out: list[str | None] = []
        with torch.random.fork_rng(devices=[]):
            for k in range(0, len(prompts), self.batch_size):
                out += list(self.policy.generate(prompts[k : k + self.batch_size]).responses)
        return out


class HTTPJudge(JudgeBackend):
    """An OpenAI-compatible chat-completions endpoint, stdlib only (urllib + a thread pool)."""

    RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        retry_backoff: float = 0.5,
        concurrency: int = 4,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ):
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, retry_backoff
        self.concurrency, self.max_tokens, self.temperature = concurrency, max_tokens, temperature
        self._headers = {"Content-Type": "application/json"}
        self.api_key_env = api_key_env
        if api_key_env:
            key = os.environ.get(api_key_env)
            if key:
                self._headers["Authorization"] = f"Bearer {key}"
            else:
                warnings.warn(f"critique: ${api_key_env} is not set; calling {self.url} without an API key", stacklevel=2)
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "retries": 0, "timeouts": 0, "bad_responses": 0, "http_errors": 0, "failed": 0}

    def __repr__(self) -> str:  # never show the key
        return f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    @staticmethod
    def _content(raw: bytes) -> str:
        """The first choice's message text of a chat-completions answer; ValueError when it is not one."""
        try:
            data = json.loads(raw.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"not a chat-completions response ({type(e).__name__}): {raw[:120]!r}") from None
        if not isinstance(content, str):
            raise ValueError(f"message content is {type(content).__name__}, not text")
        return content

    def _request(self, system: str | None, user: str) -> str | None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body = json.dumps({
            "model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature,
        }).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._count("requests")
            try:
                req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return self._content(raw)
            except urllib.error.HTTPError as e:
                self._count("http_errors")
                if e.code not in self.RETRYABLE:
                    detail = e.read()[:200].decode("utf-8", "replace")
                    hint = f" (check the key in ${self.api_key_env})" if e.code in (401, 403) else ""
                    raise JudgeError(f"judge endpoint {self.url} answered HTTP {e.code}{hint}: {detail}") from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                self._count("timeouts" if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError) else "http_errors")
            except (ValueError, http.client.HTTPException):  # garbled body, status line or length
                self._count("bad_responses")
        self._count("failed")
        return None

    def complete(self, system, users):
        if not users:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(users))) as pool:
            return list(pool.map(lambda u: self._request(system, u), users))

    def metrics(self):
        with self._lock:
            return {f"http_{k}": float(v) for k, v in self.counts.items()}


# ------------------------------------------------------------------------------ the judge stage

# Train settings of the task's default judge: SFT on its critiques, from its SFT policy (a task
# may override them with `judge_recipe()`). It must learn word sentiment and grammaticality from a
# few verdict tokens per example, and that comes late and needs a moderate lr. On sentiment,
# Spearman correlation with the gold reward over 300 held-out responses (measured 2026-11-22):
#   lr 1e-3:  800 steps 0.12, 1200 0.69, 1600 0.75 (seed 1: 0.75), 2000 0.87 (seed 1: 0.88), 2400 0.84
#   lr 2e-3:  800 steps 0.43, 1600 0.44 (too high: it settles on the majority verdicts)
JUDGE_RECIPE: dict[str, Any] = {"steps": 2000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "lr_schedule": "cosine"}


def judge_run_data(task: Any) -> dict[str, Any]:
    recipe = getattr(task, "judge_recipe", None)
    return {
        "task": {"name": task.name, **task.config.model_dump(mode="json")},
        "policy": {"name": "hf", "init": "sft"},
        "algorithm": {"name": "sft", "examples": "critiques"},
        "train": {**JUDGE_RECIPE, **(recipe() if callable(recipe) else {}), "progress": False, "eval_prompts": 0},
    }


def judge_path(task: Any, log=print) -> Path:
    """Directory of the task's judge (`sft` on the task's `critiques`), trained on first use."""
    from rlhfzoo import stages
    from rlhfzoo.artifacts import artifact
    from rlhfzoo.config import load_config
    from rlhfzoo.trainer import Trainer

    data = judge_run_data(task)

    def build(tmp: Path) -> None:
        if log:
            log(f"[rlhfzoo] training the critique judge for task {task.name!r} (cached for later runs)")
        Trainer(load_config(data={**data, "output_dir": str(tmp / "run")}), log=log).fit()

    return artifact("judge", {**data, "sft": stages.sft_run_data(task)}, build, log=log) / "run" / "policy"


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
    judge: dict[str, Any] = Field(
        default_factory=lambda: {"name": "hf", "init": "auto", "top_k": 1, "max_new_tokens": 16},
        description="policy backend: the judge's policy section (`name` + that policy's options). `init: auto`: the "
        "task's cached judge (sft on the task's critiques). `top_k: 1` decodes greedily.",
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
        if self.backend == "policy":
            from rlhfzoo.registry import RegistryError, registry

            opts = dict(self.judge)
            name = opts.pop("name", None)
            if not isinstance(name, str):
                raise ValueError("`judge` needs a `name`: the registered policy that writes the critiques, e.g. hf")
            try:
                policy_config = registry.get("policy", name).cls.Config
            except RegistryError as e:
                raise ValueError(f"judge.name: {str(e).splitlines()[0]}") from None
            policy_config(**opts)  # unknown keys / bad values are errors now, not at the first score()
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
        from rlhfzoo.registry import registry

        opts = dict(c.judge)
        entry = registry.get("policy", opts.pop("name"))
        if opts.get("init") == "auto":
            if self.task is None:
                raise ValueError("critique: `judge.init: auto` needs a task (its cached judge)")
            opts["init"] = str(judge_path(self.task))
        return PolicyJudge(entry.cls(entry.cls.Config(**opts), task=self.task), c.batch_size)

    def _fallback(self, what: str, text: str | None) -> float:
        self.counts[what] += 1
        if self.config.on_failure == "raise":
            reason = "request failed" if what == "failed" else f"no [[rating]] in {text!r:.120}"
            raise JudgeError(f"critique: judge output unusable ({reason}); set on_failure: fallback to count it instead")
        return self.config.fallback_reward

    def critiques(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str | None]:
        """The judge's raw critiques (None where a request failed)."""
        if len(prompts) != len(responses):
            raise ValueError(f"critique got {len(prompts)} prompts but {len(responses)} responses")
        return self.backend.complete(self.system, [self.format(p, r) for p, r in zip(prompts, responses)])

    def score(self, prompts, responses) -> torch.Tensor:
        rewards = []
        for text in self.critiques(prompts, responses):
            n = parse_rating(text)
            if n is None:
                rewards.append(self._fallback("failed" if text is None else "unparseable", text))
            else:
                self.rating_sum += n
                rewards.append(rating_to_reward(n))
        self.counts["calls"] += len(rewards)
        return torch.tensor(rewards, dtype=torch.float32)

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
        out["judge_fallback_rate"] = (c["unparseable"] + c["failed"]) / max(1, c["calls"])
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
