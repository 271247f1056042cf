"""`headscope atlas serve`: only the atlas folder is served, bad requests get 4xx, the server survives."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
import torch

from headscope.atlas.build import build_atlas
from headscope.atlas.live import MAX_HEADS, parse_request, BadRequest
from headscope.atlas.server import MAX_BODY, make_server, safe_path, serve_in_thread
from headscope.capture import capture
from headscope.errors import HeadscopeError
from headscope.runs import RunDir
from headscope.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("srv") / "run", tiny.identity())
    (run.path / "secret.txt").write_text("do not serve")
    build_atlas(run.path, model=None, progress=False)
    srv = make_server(run.path, model=tiny, port=0)
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def raw(srv, text: bytes) -> bytes:
    with socket.create_connection(srv.server_address[:2], timeout=30) as s:
        s.sendall(text)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def test_serves_the_atlas_only(server):
    st, hd, body = request(server, "GET", "/")
    assert st == 200 and b"static/atlas.js" in body and hd["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in hd["Content-Security-Policy"] and hd["X-Content-Type-Options"] == "nosniff"
    st, hd, body = request(server, "GET", "/data/index.js?x=1")
    assert st == 200 and body.startswith(b"window.__atlas_page(") and "javascript" in hd["Content-Type"]
    for path in ("/../run.json", "/%2e%2e/run.json", "/%2E%2E/secret.txt", "/data/..%2f..%2fsecret.txt",
                 "/%252e%252e/secret.txt", "/static/%2e%2e/%2e%2e/run.json", "/..%5c..%5crun.json",
                 "/data/index.js%00.png", "/.hidden", "//etc/passwd", "/nope.js", "/api/nothing"):
        st, _, body = request(server, "GET", path)
        assert st == 404, path
        assert b"do not serve" not in body and b"format_version" not in body
    # a raw request line with '..' that no client would normalise
    resp = raw(server, b"GET /../../secret.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 404") and b"do not serve" not in resp


def test_safe_path_unit(tmp_path):
    root = tmp_path / "atlas"
    (root / "data").mkdir(parents=True)
    (root / "index.html").write_text("x")
    (root / "data" / "a.js").write_text("y")
    (tmp_path / "outside.txt").write_text("z")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    assert safe_path(root, "/") == (root / "index.html").resolve()
    assert safe_path(root, "/data/a.js") == (root / "data" / "a.js").resolve()
    assert safe_path(root, "/data/") is None  # a folder without index.html
    assert safe_path(root, "/link.txt") is None  # a symlink out of the folder
    assert safe_path(root, "/data/../../outside.txt") is None


def test_live_prompt_matches_capture(server, tiny):
    st, _, body = request(server, "GET", "/api/info")
    info = json.loads(body)
    assert st == 200 and info["live"] and info["max_heads"] == MAX_HEADS
    req = json.dumps({"prompt": "The cat sat on the mat. The cat", "heads": ["1.2", "0.0"]})
    st, hd, body = request(server, "POST", "/api/prompt", req, {"Content-Type": "application/json"})
    assert st == 200, body
    res = json.loads(body)
    ids = tiny.to_tokens("The cat sat on the mat. The cat")
    assert res["tokens"] == tiny.token_str(ids[0])
    cap = capture(tiny, ids, layers=[0, 1], what={"pattern"})
    torch.testing.assert_close(torch.tensor(res["heads"]["1.2"]["pattern"]), cap["pattern"][1][0, 2], atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(res["heads"]["0.0"]["pattern"]), cap["pattern"][0][0, 0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("body,status,msg", [
    (b"not json", 400, "not valid"),
    (b"\xff\xfe", 400, "not valid"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": ""}).encode(), 400, "non-empty"),
    (json.dumps({"prompt": 5}).encode(), 400, "non-empty"),
    (json.dumps({"prompt": "x", "heads": "1.2"}).encode(), 400, "list"),
    (json.dumps({"prompt": "x", "heads": ["1.9"]}).encode(), 400, "does not exist"),
    (json.dumps({"prompt": "x", "heads": ["a.b"]}).encode(), 400, "layer.head"),
    (json.dumps({"prompt": "x", "heads": ["0.0"] * (MAX_HEADS + 1)}).encode(), 400, "too many"),
    (json.dumps({"prompt": "x", "evil": 1}).encode(), 400, "unknown"),
    (json.dumps({"prompt": "word " * 300}).encode(), 400, "exceeds the context"),
    (json.dumps({"prompt": "y" * 3000}).encode(), 400, "too long"),
])
def test_bad_requests_then_still_working(server, body, status, msg):
    st, _, out = request(server, "POST", "/api/prompt", body, {"Content-Type": "application/json"})
    assert st == status and msg in json.loads(out)["error"]
    st, _, _ = request(server, "POST", "/api/prompt", json.dumps({"prompt": "hello", "heads": ["0.1"]}))
    assert st == 200


def test_oversized_and_odd_requests(server):
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10)})
    st, _, out = request(server, "POST", "/api/prompt", big)
    assert st == 413
    resp = raw(server, b"POST /api/prompt HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 413")
    resp = raw(server, b"POST /api/prompt HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 413")
    resp = raw(server, b"POST /api/prompt HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400")
    resp = raw(server, b"POST /api/prompt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 411")
    resp = raw(server, b"GARBAGE\r\n\r\n")
    assert b"400" in resp  # HTTP/0.9-style garbage gets a bare error page
    st, _, _ = request(server, "PUT", "/api/prompt", "{}")
    assert st == 405
    st, _, _ = request(server, "POST", "/data/index.js", "{}")
    assert st == 404
    st, _, body = request(server, "GET", "/")
    assert st == 200


def test_parse_request_unit(tiny):
    assert parse_request({"prompt": "hi", "heads": [" 1.2", "1.2", "0.3"]}, tiny) == ("hi", [(1, 2), (0, 3)])
    with pytest.raises(BadRequest):
        parse_request({"prompt": "a\x00b"}, tiny)


def test_server_needs_a_built_atlas(tmp_path, tiny):
    RunDir(tmp_path / "r", tiny.identity())
    with pytest.raises(HeadscopeError, match="atlas build"):
        make_server(tmp_path / "r", model=None, port=0)


def test_server_without_model_has_no_live_box(tmp_path, tiny):
    run = RunDir(tmp_path / "r", tiny.identity())
    build_atlas(run.path, progress=False)
    srv = make_server(run.path, model=None, port=0)
    serve_in_thread(srv)
    try:
        st, _, body = request(srv, "GET", "/api/info")
        assert st == 200 and json.loads(body) == {"live": False}
        st, _, _ = request(srv, "POST", "/api/prompt", json.dumps({"prompt": "x"}))
        assert st == 503
    finally:
        srv.shutdown()
        srv.server_close()
