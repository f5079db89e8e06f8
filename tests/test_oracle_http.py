"""The http oracle against small chat-completions servers on 127.0.0.1, started by each test."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.oracles import OracleError, oracle_config
from rlhf_bilevel.oracles.http import chosen

KEY = "sk-test-9f8e7d6c5b4a"
SHOWN = re.compile(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nReply with", re.S)


def completion(content) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def kind_judge(question: str) -> bytes:
    """Names the response that says 'kind', whichever position it is shown in."""
    a, b = SHOWN.search(question).groups()
    return completion("A" if "kind" in a else "B")


class Server:
    """A chat-completions server whose every answer comes from `reply(n, question, headers)`:
    (status, body) or (status, body, seconds to sleep first); n counts requests from 1."""

    def __init__(self, reply):
        self.reply, self.requests, self.lock = reply, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((dict(self.headers), payload))
                    n = len(server.requests)
                status, body, *delay = server.reply(n, payload["messages"][0]["content"], self.headers)
                time.sleep(delay[0] if delay else 0)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up waiting: what a timeout test expects
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy set in the environment must not see local requests
    monkeypatch.setenv("JUDGE_KEY", KEY)
    servers = []

    def start(reply):
        servers.append(Server(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def judge(server, **cfg):
    settings = dict(kind="http", url=server.url, model="judge-1", api_key_env="JUDGE_KEY", timeout=5.0, backoff=0.0) | cfg
    return make_labeller(oracle_config(**settings))


def test_a_good_judge_is_asked_in_both_orders_with_the_key(serve):
    server = serve(lambda n, question, headers: (200, kind_judge(question)))
    oracle = judge(server, batch_size=3)
    prob = oracle.ask(["p", "q", "r"], ["kind words", "rude", "kind"], ["rude", "kind words", "kind too"])
    assert prob.tolist() == [1.0, 0.0, 0.5]  # both kind: the server's tie-break is positional, and cancels
    assert not oracle.offers_score
    assert len(server.requests) == 6
    for headers, payload in server.requests:
        assert headers["Authorization"] == f"Bearer {KEY}"
        assert payload["model"] == "judge-1" and payload["temperature"] == 0
    shown = sorted(SHOWN.search(payload["messages"][0]["content"]).groups() for _, payload in server.requests)
    pairs = [("kind words", "rude"), ("rude", "kind words"), ("kind", "kind too")]
    assert shown == sorted(pairs + [(b, a) for a, b in pairs])


def test_a_judge_that_always_names_the_first_shown_gives_one_half(serve):
    server = serve(lambda n, question, headers: (200, completion("**Response A.**")))
    assert judge(server).ask(["p", "q"], ["x", "y"], ["y", "x"]).tolist() == [0.5, 0.5]


def test_a_server_that_times_out_is_retried_then_a_clear_error(serve):
    server = serve(lambda n, question, headers: (200, completion("A"), 1.0))
    oracle = judge(server, timeout=0.2, retries=2, batch_size=2)
    with pytest.raises(OracleError) as caught:
        oracle.ask(["p"], ["x"], ["y"])
    message = str(caught.value)
    assert message == f"http: {server.url}: no answer within 0.2 s (oracle.timeout) (gave up after 3 attempts, oracle.retries=2)"
    assert len(server.requests) == 6  # two questions (both orders), three attempts each


def test_malformed_json_is_an_error_after_the_retries(serve):
    server = serve(lambda n, question, headers: (200, b'{"choices": [{"message": '))
    with pytest.raises(OracleError, match=r"is not chat-completions JSON .*'\{\"choices\": \[\{\"message\": ' \(gave up after 2 attempts"):
        judge(server, retries=1, batch_size=1).ask(["p"], ["x"], ["y"])
    assert len(server.requests) in (2, 3, 4)  # the second question may have started before the first gave up


@pytest.mark.parametrize("content", ["Both are fine.", "A or B", "C", "", None])
def test_an_answer_that_names_neither_choice_is_an_error_not_a_guess(serve, content):
    server = serve(lambda n, question, headers: (200, completion(content)))
    with pytest.raises(OracleError, match=r"^http: http://127\.0\.0\.1:\d+/v1/chat/completions: ") as caught:
        judge(server, retries=0).ask(["p"], ["x"], ["y"])
    assert ("neither 'A' nor 'B'" if content is not None else "is NoneType, not text") in str(caught.value)


def test_a_server_that_fails_once_then_answers_is_a_success(serve):
    server = serve(lambda n, question, headers: (503, b'{"error": "overloaded"}') if n == 1 else (200, kind_judge(question)))
    prob = judge(server, retries=1, batch_size=1).ask(["p"], ["kind"], ["rude"])
    assert prob.tolist() == [1.0] and len(server.requests) == 3


def test_the_key_never_appears_in_an_error_message(serve):
    def echo_key(n, question, headers):
        # the key straddles the point where an error message cuts a quoted body
        return 500, f'{{"error": "{"x" * 80} bad gateway for {headers["Authorization"]}"}}'.encode()

    server = serve(echo_key)
    with pytest.raises(OracleError) as caught:
        judge(server, retries=1, batch_size=1).ask(["p"], ["x"], ["y"])
    assert KEY[:6] not in str(caught.value) and "Bearer ***" in str(caught.value)
    assert "HTTP 500" in str(caught.value)


def test_a_refused_key_stops_at_once_and_names_the_variable_not_the_key(serve):
    server = serve(lambda n, question, headers: (401, f'{{"error": "invalid key {KEY}"}}'.encode()))
    with pytest.raises(OracleError) as caught:
        judge(server, retries=3, batch_size=1).ask(["p"], ["x"], ["y"])
    message = str(caught.value)
    assert message == f"http: {server.url}: HTTP 401 Unauthorized; check the key in $JUDGE_KEY"
    assert len(server.requests) <= 2  # not retried (the second question may have been sent before the first failed)


def test_a_wrong_path_says_what_the_url_must_be(serve):
    server = serve(lambda n, question, headers: (404, b"not found"))
    with pytest.raises(OracleError, match=r"HTTP 404 .*oracle\.url must be the chat-completions endpoint itself"):
        judge(server, batch_size=1).ask(["p"], ["x"], ["y"])
    assert len(server.requests) <= 2  # not retried (the second question may have been sent before the first failed)


def test_a_server_that_is_down_is_a_clear_error(serve):
    server = serve(lambda n, question, headers: (200, completion("A")))
    server.close()  # its port is now closed: connections are refused
    with pytest.raises(OracleError, match=r"^http: http://127\.0\.0\.1:\d+/v1/chat/completions: .*refused.* \(gave up after 2 attempts"):
        judge(server, retries=1, batch_size=1).ask(["p"], ["x"], ["y"])


@pytest.mark.parametrize(
    ("content", "named"),
    [("A", 0), (" b. ", 1), ("**Response B**", 1), ("Answer: A", 0), ("(a)", 0), ("A is better", None), ("A or B", None), ("", None), ("AB", None)],
)
def test_replies_are_read_strictly(content, named):
    assert chosen(content, ("A", "B")) == named


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"url": None}, r"^oracle\.url: the http oracle needs the chat-completions endpoint, e.g\. oracle\.url=http://"),
        ({"url": "127.0.0.1:8000/v1/chat/completions"}, r"^oracle\.url: expected an http:// or https:// URL"),
        ({"model": None}, r"^oracle\.model: the http oracle needs the name of the model the endpoint serves"),
        ({"api_key_env": "NO_SUCH_JUDGE_KEY"}, r"^oracle\.api_key_env: the environment variable NO_SUCH_JUDGE_KEY is not set"),
    ],
)
def test_http_settings_that_cannot_work_are_config_errors(changes, match, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    settings = dict(kind="http", url="http://127.0.0.1:1/v1/chat/completions", model="m") | changes
    with pytest.raises(ConfigError, match=match):
        make_labeller(oracle_config(**settings))

