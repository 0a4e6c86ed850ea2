"""The critique (LLM-as-a-judge) reward: the rating parser, fallback counting and the stop past
`max_failure_rate`, pairwise comparison in both orders, the HTTP backend against a local server
(timeouts, garbage, retries, concurrency, the key, a failing endpoint ending `rlhfzoo train` with
exit 2), config checks, and a tiny judge trained on sentiment's critiques. The backends' own
safety (redirects, redaction) is in test_judge_backends.py."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlhfzoo import stages
from rlhfzoo.cli import main as cli_main
from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.errors import UserError
from rlhfzoo.plugins.critique import (
    CritiqueReward,
    HTTPJudge,
    JudgeBackend,
    JudgeError,
    parse_rating,
    parse_verdict,
    rating_to_reward,
)
from rlhfzoo.plugins.reward_eval import spearman
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.testing import contract_config

# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("fluent , positive [[8]]", 8.0),
        ("Rating: [[ 7 ]]", 7.0),
        ("first [[3]] then, on reflection, [[9]]", 9.0),  # the last rating counts
        ("[[8.5]]", 8.5),
        ("[[10]]", 10.0),
        ("[[11]]", None),
        ("[[0]]", None),
        ("rating: 8", None),
        ("[8]", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_rating_to_reward():
    assert [rating_to_reward(n) for n in (1, 5.5, 10)] == pytest.approx([-1.0, 0.0, 1.0])


def test_parse_verdict():
    assert parse_verdict("A is more helpful. [[A]]") == "A"
    assert parse_verdict("[[ B ]]") == "B" and parse_verdict("tie [[C]]") == "C"
    assert parse_verdict("A is better") is None and parse_verdict(None) is None


# ------------------------------------------------------------------------------ a scripted backend


class Scripted(JudgeBackend):
    def __init__(self, answer):
        self.answer, self.seen = answer, []

    def complete(self, system, users):
        self.seen += list(users)
        out = [self.answer(u) for u in users]
        if None in out:
            self.last_failure = "scripted failure"
        return out


def critique(answer, **options):
    options = {"template": "Q: {prompt}\nA: {response}", **options}
    return CritiqueReward(CritiqueReward.Config(**options), backend=Scripted(answer))


def test_score_maps_ratings_and_counts_fallbacks():
    answers = {"good": "fine answer [[10]]", "bad": "poor [[1]]", "garbage": "I cannot rate this", "down": None}
    src = critique(lambda u: answers[u.split("A: ")[1]], fallback_reward=-0.25, max_failure_rate=0.5)
    r = src.score(["q"] * 4, ["good", "bad", "garbage", "down"])
    assert r.dtype == torch.float32 and r.tolist() == pytest.approx([1.0, -1.0, -0.25, -0.25])
    m = src.metrics()
    assert m["judge_calls"] == 4 and m["judge_unparseable"] == 1 and m["judge_failed"] == 1 and m["judge_fallbacks"] == 2
    assert m["judge_fallback_rate"] == pytest.approx(0.5) and m["judge_mean_rating"] == pytest.approx(5.5)
    assert src.backend.seen[0] == "Q: q\nA: good"


def test_on_failure_raise():
    src = critique(lambda u: "no rating here", on_failure="raise")
    with pytest.raises(JudgeError, match="no \\[\\[rating\\]\\]") as e:
        src.score(["q"], ["r"])
    assert isinstance(e.value, UserError)  # the command line prints one message and exits 2


def test_too_many_failures_in_one_batch_stop_with_a_clear_error():
    """A judge that fails every request must not train on fallback rewards to the end."""
    src = critique(lambda u: None if "down" in u else "no rating here" if "odd" in u else "ok [[8]]")
    with pytest.raises(JudgeError) as e:
        src.score(["q"] * 5, ["down", "down", "odd", "fine", "fine"])
    message = str(e.value)
    assert "3 of 5" in message and "2 failed" in message and "1 without a [[rating]]" in message
    assert "max_failure_rate" in message and "0.2" in message and "scripted failure" in message
    assert isinstance(e.value, UserError)
    assert src.metrics()["judge_fallbacks"] == 3  # counted before stopping


def test_failures_up_to_the_rate_are_counted_and_reported():
    src = critique(lambda u: None if "down" in u else "ok [[8]]")
    src.score(["q"] * 5, ["down", "a", "b", "c", "d"])  # 1 of 5 = 0.2: not more than the default
    src.score(["q"] * 5, ["a"] * 5)
    m = src.metrics()
    assert m["judge_fallbacks"] == 1 and m["judge_failed"] == 1 and m["judge_fallback_rate"] == pytest.approx(0.1)
    with pytest.raises(JudgeError, match="1 of 1"):
        src.score(["q"], ["down"])
    never = critique(lambda u: None, max_failure_rate=1.0)
    assert never.score(["q"] * 3, ["a"] * 3).tolist() == [0.0] * 3
    assert never.metrics()["judge_fallback_rate"] == 1.0


def test_compare_judges_both_orders_and_reports_disagreement():
    def consistent(u):  # prefers the longer answer wherever it is shown
        a = u.split("Assistant A's Answer]\n")[1].split("\n")[0]
        b = u.split("Assistant B's Answer]\n")[1].split("\n")[0]
        return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"

    src = critique(consistent)
    out = src.compare(["q"] * 3, ["long answer", "x", "same"], ["y", "long answer", "same"])
    assert out.tolist() == [1.0, -1.0, 0.0]
    assert len(src.backend.seen) == 6  # both orders
    assert src.metrics()["compare_disagreement_rate"] == 0.0

    biased = critique(lambda u: "[[A]]")  # always picks the first position
    assert biased.compare(["q"] * 4, ["a"] * 4, ["b"] * 4).tolist() == [0.0] * 4
    assert biased.metrics()["compare_disagreement_rate"] == 1.0

    broken = critique(lambda u: "hmm")
    assert broken.compare(["q"], ["a"], ["b"]).tolist() == [0.0]
    assert broken.metrics()["compare_unparseable"] == 1.0


# ------------------------------------------------------------------------------ config


def test_config_checks():
    with pytest.raises(ValueError, match="url"):
        CritiqueReward.Config(backend="http")
    with pytest.raises(ValueError, match="response"):
        CritiqueReward.Config(template="rate {prompt}")
    with pytest.raises(ValueError, match="only the fields"):
        CritiqueReward.Config(template="{prompt} {response} {extra}")
    with pytest.raises(ValueError, match="top_kk"):
        CritiqueReward.Config(judge={"name": "hf", "init": "auto", "top_kk": 1})
    with pytest.raises(ValueError):
        CritiqueReward.Config(judge={"name": "nope"})
    assert CritiqueReward.Config(max_failure_rate=0.5).max_failure_rate == 0.5
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_failure_rate") as e:
            CritiqueReward.Config(max_failure_rate=bad)
        assert "Extra inputs" not in str(e.value)


def test_the_judge_section_is_checked_at_its_full_path_and_dumps_as_written():
    data = {"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}}
    with pytest.raises(ConfigError, match=r"reward.judge.top_kk: unknown key 'top_kk'. Did you mean 'top_k'\?"):
        load_config(data={**data, "reward": {"name": "critique", "judge": {"name": "hf", "top_kk": 1}}})
    with pytest.raises(ConfigError, match=r"reward.judge.name: Policy 'hff' is not registered. Did you mean 'hf'\?"):
        load_config(data={**data, "reward": {"name": "critique", "judge": {"name": "hff"}}})
    judge = {"name": "hf", "init": "sft", "top_k": 2}
    cfg = load_config(data={**data, "reward": {"name": "critique", "judge": judge}})
    assert cfg.to_dict()["reward"]["judge"] == judge
    assert CritiqueReward.required_stages(cfg.reward.config) == ["sft"]  # what the judge policy reads
    assert CritiqueReward.required_stages(CritiqueReward.Config()) == ["judge"]  # init: auto, the task's judge stage


# ------------------------------------------------------------------------------ HTTP backend


class FakeChat(BaseHTTPRequestHandler):
    """A chat-completions endpoint whose behaviour is chosen by the user message."""

    calls: list = []
    forced = None  # (status, body): the answer to every request, whatever it asks
    in_flight = 0
    max_in_flight = 0
    lock = threading.Lock()

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        cls = type(self)
        with cls.lock:
            cls.calls.append({"user": user, "auth": self.headers.get("Authorization"), "system": body["messages"][0]["content"]})
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            if "SLOW" in user:
                time.sleep(1.0)
            elif "BUSY" in user:
                time.sleep(0.1)
            if cls.forced:
                status, payload = cls.forced
            elif "GARBAGE" in user:
                payload, status = b"<html>502 proxy error</html>", 200
            elif "DENIED" in user:
                payload, status = b'{"error": "bad key"}', 401
            elif "FLAKY" in user and sum("FLAKY" in c["user"] for c in cls.calls) == 1:
                payload, status = b"{}", 503  # first try fails, the retry succeeds
            else:
                content = "looks good [[8]]" if "good" in user else "meh [[3]]"
                payload, status = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode(), 200
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with cls.lock:
                cls.in_flight -= 1


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never route the local server through a proxy
    FakeChat.calls, FakeChat.forced, FakeChat.in_flight, FakeChat.max_in_flight = [], None, 0, 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def http_critique(url, **options):
    cfg = {"name": "critique", "backend": "http", "url": url, "model": "judge-1", "api_key_env": "RLHFZOO_TEST_JUDGE_KEY",
           "timeout": 0.3, "retries": 1, "retry_backoff": 0.0, "concurrency": 3, **options}
    return load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "reward": cfg}).reward.create(task=None)


def test_http_backend_scores_with_the_key_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", "sk-test-123")
    src = http_critique(server)
    assert "sk-test-123" not in repr(src.backend) and "sk-test-123" not in json.dumps(src.config.model_dump())
    r = src.score(["q1", "q2"], ["a good answer", "a poor answer"])
    assert r.tolist() == pytest.approx([rating_to_reward(8), rating_to_reward(3)])
    assert {c["auth"] for c in FakeChat.calls} == {"Bearer sk-test-123"}
    assert "[[rating]]" in FakeChat.calls[0]["system"]  # MT-Bench-style instructions
    assert src.metrics()["http_requests"] == 2.0


def test_http_timeout_and_garbage_fall_back_and_are_counted(server, monkeypatch):
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", "k")
    src = http_critique(server, fallback_reward=-1.0, max_failure_rate=0.5)
    start = time.time()
    r = src.score(["q"] * 4, ["good", "SLOW good", "GARBAGE good", "FLAKY good"])
    assert time.time() - start < 3.0  # two tries of 0.3 s, not the server's 1 s
    assert r.tolist() == pytest.approx([rating_to_reward(8), -1.0, -1.0, rating_to_reward(8)])
    m = src.metrics()
    assert m["judge_failed"] == 2.0 and m["http_failed"] == 2.0
    assert m["http_timeouts"] == 2.0 and m["http_bad_responses"] == 2.0  # each tried twice
    assert m["http_retries"] == 3.0  # SLOW, GARBAGE and FLAKY retried once


def test_http_concurrency_limit(server, monkeypatch):
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", "k")
    src = http_critique(server, concurrency=2)
    src.score(["q"] * 6, ["BUSY good"] * 6)
    assert FakeChat.max_in_flight <= 2 and len(FakeChat.calls) == 6


def test_http_rejected_key_is_an_error_without_the_key(server, monkeypatch):
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", "sk-secret-999")
    src = http_critique(server)
    with pytest.raises(JudgeError, match="HTTP 401") as e:
        src.score(["q"], ["DENIED"])
    assert "sk-secret-999" not in str(e.value) and "RLHFZOO_TEST_JUDGE_KEY" in str(e.value)


def test_http_unreachable_endpoint_falls_back(monkeypatch):
    monkeypatch.delenv("RLHFZOO_TEST_JUDGE_KEY", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with pytest.warns(UserWarning, match="RLHFZOO_TEST_JUDGE_KEY"):
        src = http_critique("http://127.0.0.1:9/v1", retries=0, max_failure_rate=1.0)  # discard port: connection refused
    assert src.score(["q"], ["r"]).tolist() == [0.0]
    assert src.metrics()["judge_failed"] == 1.0


def test_http_judge_failing_every_request_stops_without_the_key(server, monkeypatch, capsys):
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", "sk-secret-999")
    FakeChat.forced = (500, b'{"error": "overloaded; your request had Authorization: Bearer sk-secret-999"}')
    src = http_critique(server)
    with pytest.raises(JudgeError) as e:
        src.score(["q"] * 2, ["a", "b"])
    message = str(e.value)
    assert "2 of 2" in message and "HTTP 500" in message and server in message and "Bearer ***" in message
    assert "sk-secret-999" not in message and "sk-secret-999" not in "".join(capsys.readouterr())


@pytest.mark.parametrize("status", [401, 500])
def test_a_failing_judge_endpoint_ends_training_with_one_message_and_exit_2(server, monkeypatch, tmp_path, capsys, status):
    """`rlhfzoo train` with a judge that rejects the key (401) or fails every request (500):
    exit 2 and one `error:` line naming the endpoint, not a traceback nor a run trained on fallbacks."""
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", "sk-secret-999")
    FakeChat.forced = (status, b'{"error": "no luck for Bearer sk-secret-999"}')
    data = contract_config("a2c", tmp_path / "run", reward=None)
    data["reward"] = {"name": "critique", "backend": "http", "url": server, "model": "judge-1",
                      "api_key_env": "RLHFZOO_TEST_JUDGE_KEY", "timeout": 2.0, "retries": 0}
    (tmp_path / "judge.yaml").write_text(json.dumps(data))
    assert cli_main(["train", str(tmp_path / "judge.yaml")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and server in errors[0] and f"HTTP {status}" in errors[0], err
    assert "Traceback" not in err and "sk-secret-999" not in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_http_compare(server, monkeypatch):
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", "k")
    src = http_critique(server)  # the fake answers "[[8]]"/"[[3]]", never a verdict
    assert src.compare(["q"], ["a"], ["b"]).tolist() == [0.0]
    assert src.metrics()["compare_unparseable"] == 1.0 and len(FakeChat.calls) == 2


def test_http_url_forms():
    assert HTTPJudge("http://h:1/v1/", "m").url == "http://h:1/v1/chat/completions"
    assert HTTPJudge("http://h:1/v1/chat/completions", "m").url == "http://h:1/v1/chat/completions"


# ------------------------------------------------------------------------------ a tiny local judge


@pytest.mark.learning
def test_sentiment_judge_ranks_like_the_gold_reward():
    """The task's `judge` stage (`sft` on its critiques, from its SFT policy) through the `critique`
    source with the default `policy` backend: Spearman correlation with the gold reward (0.81 with
    the 1000-step recipe at a constant lr; 0.87 after 2000 cosine-decayed steps, twice the cost;
    the true critiques' ratings reach 0.99)."""
    task = SentimentTask()
    for name in ("judge", "sft-samples-test"):  # what the source and the held-out examples read
        stages.build(name, task)
    src = load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "reward": {"name": "critique"}}).reward.create(task=task)
    rows = task.examples("rewarded", "test")[::5][:300]
    prompts, responses = [e.prompt for e in rows], [e.response for e in rows]
    start = time.time()
    scores = src.score(prompts, responses)
    seconds = time.time() - start
    gold = task.gold_reward(prompts, responses)
    rho = spearman(scores.tolist(), gold.tolist())
    m = src.metrics()
    print(f"judge: spearman={rho:.3f} over {len(rows)} responses, fallback_rate={m['judge_fallback_rate']:.3f}, {seconds:.1f}s")
    assert rho > 0.5, m
    assert m["judge_fallback_rate"] < 0.05


def test_judge_config_matches_the_cached_recipe():
    """configs/critique_judge.yaml documents the recipe of the cached judge: they must agree."""
    from pathlib import Path

    from rlhfzoo.plugins.critique import JUDGE_RECIPE

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "critique_judge.yaml")
    train = cfg.train.model_dump()
    assert {k: train[k] for k in JUDGE_RECIPE} == JUDGE_RECIPE
    assert cfg.algorithm.to_dict()["examples"] == "critiques" and cfg.policy.to_dict()["init"] == "sft"
