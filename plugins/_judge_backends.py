"""Backends of the `critique` judge: what turns judge prompts into completions.

Not a plugin (it registers nothing); `critique` picks one of:

* `PolicyJudge`: a registered policy (e.g. a local `transformers` model) writes the critiques;
* `HTTPJudge`: an OpenAI-compatible chat-completions endpoint, stdlib only (urllib and a
  thread pool): a timeout per request, retries with exponential back-off after a timeout, a
  429/5xx or a garbled answer, at most `concurrency` requests in flight.

The API key of `HTTPJudge` goes to the configured `url` and nowhere else:

* redirects are never followed, not even within the same host: a redirect could carry the
  `Authorization` header to another host, and a POST cannot be redirected faithfully anyway
  (urllib resends it as a GET without its body). A 3xx answer is a `JudgeError` naming the
  address it points to; set `url` to that address if you trust it;
* every text that comes from the server or names the URL (error bodies, garbled answers,
  failure reasons) is passed through `redact` before it goes into a message: the key and any
  `Bearer <token>` become `***`.

A failure that retrying cannot fix (a rejected key, a wrong URL, a redirect) is a `JudgeError`,
a user error: the command line prints its one-line message and exits 2. A request that still
fails after its retries gives None, and `last_failure` says why.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import torch

from rlhfzoo.errors import UserError


class JudgeError(UserError, RuntimeError):
    """The judge cannot be used as configured (e.g. the endpoint rejects the key, or too many of
    its answers are unusable); the message names where and the fix."""


_BEARER = re.compile(r"\bBearer\s+[^\s\"',;}\]]+", re.IGNORECASE)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with each (non-empty) secret and every `Bearer <token>` replaced by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _BEARER.sub("Bearer ***", text)


class JudgeBackend(ABC):
    """Generates one completion per user message; None where a request failed for good."""

    where = "the judge"  # for messages: which judge failed
    last_failure: str | None = None  # why the latest failed request failed, free of secrets

    @abstractmethod
    def complete(self, system: str | None, users: Sequence[str]) -> list[str | None]: ...

    def metrics(self) -> dict[str, float]:
        return {}

    def redact(self, text: str) -> str:
        """`text` safe to show: without the backend's secrets (it has none by default)."""
        return text


class PolicyJudge(JudgeBackend):
    """A registered policy writes the critiques (greedy with `top_k: 1`), in batches, without
    disturbing the caller's random state."""

    where = "the judge policy (`judge`)"

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


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every 3xx into an HTTPError instead of following it (see the module docstring)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


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
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"
        elif api_key_env:
            warnings.warn(f"critique: ${api_key_env} is not set; calling {self.shown_url} without an API key", stacklevel=2)
        self.where = f"judge endpoint {self.shown_url}"
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "retries": 0, "timeouts": 0, "bad_responses": 0, "http_errors": 0, "failed": 0}

    def __repr__(self) -> str:  # never show the key
        return f"HTTPJudge(url={self.shown_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    @property
    def shown_url(self) -> str:
        return self.redact(self.url)

    def redact(self, text: str) -> str:
        return redact(text, [self._key])

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _failed_try(self, counter: str, reason: str) -> None:
        with self._lock:
            self.counts[counter] += 1
            self.last_failure = self.redact(reason)

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

    def _error_body(self, e: urllib.error.HTTPError) -> str:
        """The start of an error answer's body, on one line and redacted."""
        try:
            body = e.read()[:200].decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            return ""
        return self.redact(" ".join(body.split()))

    def _fix_for(self, code: int) -> str:
        if code in (401, 403):
            if not self.api_key_env:
                return "no API key was sent (api_key_env is null): set api_key_env to the variable holding the key"
            if not self._key:
                return f"${self.api_key_env} is not set: export the endpoint's API key in it"
            return f"check the key in ${self.api_key_env}: the endpoint rejected it"
        if code in (404, 405):
            return "check `url` (the endpoint's base URL, e.g. https://host/v1) and `model`"
        return "check `url`, `model` and `max_tokens` against the endpoint's documentation"

    def _refuse(self, e: urllib.error.HTTPError) -> JudgeError:
        """The error for an answer that retrying cannot fix: a redirect or a 4xx."""
        if 300 <= e.code < 400:
            target = urllib.parse.urljoin(self.url, e.headers.get("Location", "") or "")
            return JudgeError(
                f"{self.where} redirected the request (HTTP {e.code}) to {self.redact(target) or 'nowhere'}; redirects "
                "are not followed, so that the API key goes to `url` only: if you trust that address, set `url` to it"
            )
        detail = self._error_body(e)
        return JudgeError(f"{self.where} answered HTTP {e.code}{': ' + detail if detail else ''}; {self._fix_for(e.code)}")

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
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return self._content(raw)
            except urllib.error.HTTPError as e:
                if e.code not in self.RETRYABLE:
                    self._failed_try("http_errors", f"HTTP {e.code}")
                    raise self._refuse(e) from None
                detail = self._error_body(e)
                self._failed_try("http_errors", f"HTTP {e.code}{': ' + detail if detail else ''}")
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                    self._failed_try("timeouts", f"no answer within {self.timeout:g} s (timeout)")
                else:
                    self._failed_try("http_errors", f"cannot reach it ({reason})")
            except (ValueError, http.client.HTTPException) as e:  # garbled body, status line or length
                self._failed_try("bad_responses", f"garbled answer: {e}")
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
