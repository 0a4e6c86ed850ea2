"""The critique judge's HTTP backend against real local servers: the API key never leaves the
configured origin (redirects are refused), and nothing the server sends back can echo the key
into a message or the output."""

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhfzoo.errors import UserError
from rlhfzoo.plugins._judge_backends import HTTPJudge, JudgeError, redact

KEY = "sk-live-7f3a9c2e51"


class Recorder(BaseHTTPRequestHandler):
    """One origin: records every request it gets and answers with `reply(path)` ->
    (status, headers, body); the default is a valid chat-completions answer."""

    def log_message(self, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        server = self.server
        server.seen.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization")})
        status, headers, body = server.reply(self.path)
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def chat_answer(_path):
    return 200, {}, json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine [[7]]"}}]}).encode()


@contextmanager
def origin(reply=chat_answer):
    """A server on its own port of 127.0.0.1 (a port is an origin of its own)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    httpd.daemon_threads, httpd.seen, httpd.reply = True, [], reply
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never route the local servers through a proxy
    monkeypatch.setenv("RLHFZOO_TEST_JUDGE_KEY", KEY)
    return KEY


def judge(url, **options):
    return HTTPJudge(url + "/v1", "judge-1", "RLHFZOO_TEST_JUDGE_KEY", timeout=2.0, retries=1, retry_backoff=0.0, **options)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_refused_and_never_gets_the_key(key, code, capsys):
    with origin() as (other, other_url), origin(lambda p: (code, {"Location": other_url + "/v1/chat/completions"}, b"")) as (first, url):
        with pytest.raises(JudgeError) as e:
            judge(url).complete(None, ["rate this"])
    assert other.seen == []  # not even a request without the key
    assert first.seen[0]["auth"] == f"Bearer {key}" and len(first.seen) == 1  # not retried either
    message = str(e.value)
    assert f"HTTP {code}" in message and other_url + "/v1/chat/completions" in message and "`url`" in message
    assert key not in message and key not in "".join(capsys.readouterr())


def test_redirect_within_the_same_origin_is_refused_too(key):
    """A POST is not safely redirectable (urllib would resend it as a GET without its body), so
    even a same-origin redirect is a configuration error: `url` must be the final address."""
    with origin(lambda p: (302, {"Location": "/v2/chat/completions"}, b"") if p.startswith("/v1") else chat_answer(p)) as (srv, url):
        with pytest.raises(JudgeError, match="/v2/chat/completions"):
            judge(url).complete(None, ["rate this"])
    assert [s["path"] for s in srv.seen] == ["/v1/chat/completions"]


@pytest.mark.parametrize("status", [400, 401, 404])
def test_an_error_body_holding_the_key_is_redacted(key, status, capsys):
    body = f'{{"error": "invalid api key {key}", "echo": "Authorization: Bearer {key}", "other": "Bearer abc.def-ghi"}}'
    with origin(lambda p: (status, {}, body.encode())) as (_, url):
        with pytest.raises(JudgeError) as e:
            judge(url).complete(None, ["rate this"])
    message = str(e.value)
    assert f"HTTP {status}" in message and url in message and "invalid api key ***" in message
    assert key not in message and "abc.def-ghi" not in message and "Bearer ***" in message
    assert key not in "".join(capsys.readouterr())


def test_a_rejected_key_is_a_user_error_naming_the_url_and_the_fix(key):
    with origin(lambda p: (401, {}, b'{"error": "bad key"}')) as (_, url):
        with pytest.raises(JudgeError) as e:
            judge(url).complete(None, ["rate this"])
    assert isinstance(e.value, UserError)  # the command line prints one message and exits 2
    assert url + "/v1/chat/completions" in str(e.value) and "RLHFZOO_TEST_JUDGE_KEY" in str(e.value)


def test_a_failing_server_reports_its_last_failure_redacted(key, capsys):
    with origin(lambda p: (500, {}, f"upstream rejected Bearer {key}".encode())) as (srv, url):
        backend = judge(url)
        assert backend.complete(None, ["rate this"]) == [None]
    assert len(srv.seen) == 2  # tried, retried, given up
    assert "HTTP 500" in backend.last_failure and "upstream rejected Bearer ***" in backend.last_failure
    assert key not in backend.last_failure and key not in "".join(capsys.readouterr())


def test_redact():
    assert redact("key sk-1 in Bearer sk-1 and bearer\tother-token, done", ["sk-1", ""]) == "key *** in Bearer *** and Bearer ***, done"
    assert redact('{"auth": "Bearer abc"}') == '{"auth": "Bearer ***"}'
