"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 started by the test."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from headscope.errors import HeadscopeError
from headscope.explain.openai_client import ChatClient, OpenAIExplainer, ResponseCache, api_key_from_env
from headscope.explain.prompts import ClassifyRequest, ExplainRequest


class Server:
    """A chat-completions endpoint whose answers follow a script: a list of actions consumed one per
    request (then ``default``). Actions: ("ok", text), ("status", code), ("slow", seconds, text),
    ("raw", bytes)."""

    def __init__(self, default=("ok", "Yes")):
        self.script, self.default = [], default
        self.requests, self.lock = [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    action = outer.script.pop(0) if outer.script else outer.default
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    time.sleep(outer.delay)
                    kind = action[0]
                    if kind == "status":
                        data = b'{"error": "busy"}'
                        self.send_response(action[1])
                        if action[1] == 429:
                            self.send_header("Retry-After", "0")
                    elif kind == "lp":  # ("lp", text, {token: logprob}): answers with log-probabilities
                        if not body.get("logprobs"):
                            raise AssertionError("log-probabilities were not asked for")
                        alts = [{"token": t, "logprob": v, "bytes": None} for t, v in action[2].items()]
                        first = {"token": action[1], "logprob": action[2].get(action[1], -1.0), "bytes": None,
                                 "top_logprobs": alts}
                        data = json.dumps({"choices": [{"index": 0, "finish_reason": "length",
                                                        "message": {"role": "assistant", "content": action[1]},
                                                        "logprobs": {"content": [first]}}]}).encode()
                        self.send_response(200)
                    elif kind == "no_lp":  # a server that refuses the logprobs parameter (HTTP 400)
                        if body.get("logprobs"):
                            data = b'{"error": {"message": "logprobs is not supported by this server"}}'
                            self.send_response(400)
                        else:
                            data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                        "content": action[1]}}]}).encode()
                            self.send_response(200)
                    elif kind == "raw":
                        data = action[1]
                        self.send_response(200)
                    else:
                        if kind == "slow":
                            time.sleep(action[1])
                        text = action[-1]
                        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                        self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    try:
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def client(url, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 2.0)
    return ChatClient(url, "test-model", **kw)


MSG = [{"role": "user", "content": "hello"}]


def test_ok_request_shape(server):
    server.script = [("ok", "An answer.")]
    c = client(server.url, api_key="sk-test")
    assert c.complete(MSG, max_tokens=7) == "An answer."
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"] == {"model": "test-model", "messages": MSG, "max_tokens": 7, "temperature": 0.0}


def test_retries_429_and_500_then_succeeds(server):
    server.script = [("status", 429), ("status", 500), ("status", 503), ("ok", "fine")]
    c = client(server.url, max_retries=5)
    assert c.complete(MSG) == "fine"
    assert len(server.requests) == 4 and c.stats["retries"] == 3


def test_slow_answer_past_timeout_is_retried(server):
    server.script = [("slow", 1.5, "late"), ("ok", "on time")]
    c = client(server.url, timeout=0.5, max_retries=2)
    t = time.time()
    assert c.complete(MSG) == "on time"
    assert time.time() - t < 1.5 and len(server.requests) == 2


def test_malformed_json_is_retried_then_clear_error(server):
    server.script = [("raw", b"this is not json"), ("raw", b'{"choices": []}'), ("ok", "good")]
    assert client(server.url, max_retries=3).complete(MSG) == "good"
    server.script, server.default = [], ("raw", b"{broken")
    with pytest.raises(HeadscopeError, match=r"failed after 3 attempts: malformed answer"):
        client(server.url, max_retries=2).complete(MSG)


def test_persistent_5xx_gives_one_line_error(server):
    server.default = ("status", 500)
    with pytest.raises(HeadscopeError, match=r"failed after 3 attempts: HTTP 500") as e:
        client(server.url, max_retries=2).complete(MSG)
    assert "\n" not in str(e.value)
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
    server.default = ("status", 401)
    with pytest.raises(HeadscopeError, match="refused the request: HTTP 401"):
        client(server.url, max_retries=4).complete(MSG)
    assert len(server.requests) == 1


def test_endpoint_down():
    s = Server()
    url = s.url
    s.close()
    with pytest.raises(HeadscopeError, match="failed after 2 attempts"):
        client(url, max_retries=1, timeout=0.5).complete(MSG)


def test_concurrency_limit(server):
    server.delay = 0.15
    c = client(server.url, concurrency=3)
    reqs = [([{"role": "user", "content": f"q{i}"}], 5) for i in range(10)]
    assert c.complete_many(reqs) == ["Yes"] * 10
    assert 2 <= server.max_in_flight <= 3


def test_cache_keyed_by_request(server, tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    server.script = [("ok", "first"), ("ok", "second")]
    c = client(server.url, cache=cache)
    assert c.complete(MSG) == "first"
    assert client(server.url, cache=cache).complete(MSG) == "first"  # from the cache, a new client
    assert len(server.requests) == 1
    assert c.complete(MSG, max_tokens=9) == "second"                  # another request, another key
    assert len(server.requests) == 2


def test_dry_run_writes_jsonl_and_sends_nothing(server, tmp_path):
    out = tmp_path / "reqs.jsonl"
    c = client(server.url, dry_run=out)
    ex = OpenAIExplainer(c)
    ex.explain_many([ExplainRequest(["a b c"], ["d e"], " tok"), ExplainRequest(["x"], [], " tok")])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 2 and not server.requests
    assert lines[0]["body"]["max_tokens"] == 200 and "a b c" in lines[0]["body"]["messages"][1]["content"]


def test_explainer_and_yes_no_scorer(server):
    server.script = [("ok", "  Active on lists. "), ("ok", "Yes"), ("ok", "no."), ("ok", "Maybe")]
    ex = OpenAIExplainer(client(server.url, concurrency=1))
    assert ex.explain_many([ExplainRequest(["a"], ["b"], " c")]) == ["Active on lists."]
    probs = ex.classify_many([ClassifyRequest("Active on lists.", e) for e in ("x", "y", "z")])
    assert probs == [1.0, 0.0, None]
    assert server.requests[1]["body"]["max_tokens"] == 1
    assert "Is the given example an active example? (Yes/No)" in server.requests[1]["body"]["messages"][1]["content"]


def test_missing_api_key(monkeypatch):
    monkeypatch.delenv("HEADSCOPE_TEST_KEY", raising=False)
    with pytest.raises(HeadscopeError, match=r"missing API key: set \$HEADSCOPE_TEST_KEY"):
        api_key_from_env("https://api.openai.com/v1", "HEADSCOPE_TEST_KEY")
    assert api_key_from_env("http://127.0.0.1:8000/v1", "HEADSCOPE_TEST_KEY") is None
    monkeypatch.setenv("HEADSCOPE_TEST_KEY", "k")
    assert api_key_from_env("https://api.openai.com/v1", "HEADSCOPE_TEST_KEY") == "k"


def test_yes_no_from_logprobs(server):
    """P(yes) = e^lp(yes) / (e^lp(yes) + e^lp(no)), spellings merged; other tokens ignored."""
    import math
    server.script = [("lp", "Yes", {"Yes": -0.2, " yes": -2.0, "No": -1.5, "Maybe": -3.0})]
    ex = OpenAIExplainer(client(server.url))
    [p] = ex.classify_many([ClassifyRequest("Active on lists.", "x")])
    y, n = math.exp(-0.2) + math.exp(-2.0), math.exp(-1.5)
    assert p == pytest.approx(y / (y + n))
    body = server.requests[0]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert ex.probabilities == "logprobs"


def test_server_without_logprobs_falls_back_to_text_and_says_so(server):
    server.default = ("no_lp", "No")
    ex = OpenAIExplainer(client(server.url, concurrency=1))
    assert ex.classify_many([ClassifyRequest("e", "x"), ClassifyRequest("e", "y")]) == [0.0, 0.0]
    assert ex.probabilities.startswith("text")
    assert ex.client.logprobs_supported is False
    # once known, later judgements do not ask again: 1 refused + 2 plain requests
    assert [bool(r["body"].get("logprobs")) for r in server.requests] == [True, False, False]


def test_server_ignoring_logprobs_is_noticed(server):
    server.default = ("ok", "Yes")  # answers, but without log-probabilities
    ex = OpenAIExplainer(client(server.url))
    assert ex.classify_many([ClassifyRequest("e", "x")]) == [1.0]
    assert ex.probabilities.startswith("text")


def test_logprobs_are_cached(server, tmp_path):
    cache = ResponseCache(tmp_path / "c")
    server.script = [("lp", "No", {"Yes": -1.0, "No": -0.5})]
    a = OpenAIExplainer(client(server.url, cache=cache)).classify_many([ClassifyRequest("e", "x")])
    b = OpenAIExplainer(client(server.url, cache=cache)).classify_many([ClassifyRequest("e", "x")])
    assert a == b and 0 < a[0] < 0.5 and len(server.requests) == 1
