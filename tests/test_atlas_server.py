"""`headscope atlas serve`: only the atlas folder is served, bad requests get 4xx, the server survives,
foreign Host headers are refused, and 300 live prompts 50 at a time are all answered correctly."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from headscope.atlas.build import build_atlas
from headscope.atlas.live import MAX_HEADS, parse_request, BadRequest
from headscope.atlas import server as server_mod
from headscope.atlas.server import MAX_BODY, allowed_hosts, make_server, safe_path, serve_in_thread
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


JSON = {"Content-Type": "application/json"}


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    conn.request(method, path, body=body, headers=headers if headers is not None else (JSON if body else {}))
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


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
    assert st == 200 and b"static/atlas.js" in body and hd["content-type"].startswith("text/html")
    assert "default-src 'self'" in hd["content-security-policy"] and hd["x-content-type-options"] == "nosniff"
    st, hd, body = request(server, "GET", "/data/index.js?x=1")
    assert st == 200 and body.startswith(b"window.__atlas_page(") and "javascript" in hd["content-type"]
    for path in ("/../run.json", "/%2e%2e/run.json", "/%2E%2E/secret.txt", "/data/..%2f..%2fsecret.txt",
                 "/%252e%252e/secret.txt", "/static/%2e%2e/%2e%2e/run.json", "/..%5c..%5crun.json",
                 "/data/index.js%00.png", "/.hidden", "//etc/passwd", "/nope.js", "/api/nothing"):
        st, _, body = request(server, "GET", path)
        assert st == 404, path
        assert b"do not serve" not in body and b"format_version" not in body
    # a raw request line with '..' that no client would normalise
    resp = raw(server, b"GET /../../secret.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
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


def test_lone_surrogate_and_deep_nesting_are_400(server):
    for body in (b'{"prompt": "a \\ud800 b"}', b'{"prompt": "\\udfff"}', b"[" * 5000 + b"]" * 5000,
                 b'{"prompt": "x", "heads": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        st, hd, out = request(server, "POST", "/api/prompt", body)
        assert st == 400 and hd["content-type"] == "application/json", (body[:30], st, out[:200])
        assert json.loads(out)["error"]
    st, _, _ = request(server, "POST", "/api/prompt", json.dumps({"prompt": "hello"}))
    assert st == 200


def test_post_needs_json_content_type(server):
    body = json.dumps({"prompt": "hello"})
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"},
                    {"Content-Type": "multipart/form-data; boundary=x"}):
        st, _, out = request(server, "POST", "/api/prompt", body, headers)
        assert st == 415 and "application/json" in json.loads(out)["error"], headers
    st, _, _ = request(server, "POST", "/api/prompt", body, {"Content-Type": "application/json; charset=utf-8"})
    assert st == 200


def test_foreign_host_headers_are_refused(server):
    port = server.server_address[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "localhost.attacker.example",
                 "", "[::2]"):
        for method, path, body in (("GET", "/", None), ("GET", "/data/index.js", None), ("GET", "/api/info", None),
                                   ("POST", "/api/prompt", json.dumps({"prompt": "x"}))):
            st, _, out = request(server, method, path, body, {"Host": host, **JSON})
            assert st == 400 and b"format_version" not in out and b"atlas" not in out, (host, path)
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        st, _, _ = request(server, "GET", "/api/info", None, {"Host": host})
        assert st == 200, host
    resp = raw(server, b"GET / HTTP/1.0\r\n\r\n")  # no Host header at all
    assert resp.startswith(b"HTTP/1.1 400")


def test_allowed_hosts_unit():
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "[::1]", "localhost"]
    assert "[::1]" in allowed_hosts("::1") and "box.lan" in allowed_hosts("127.0.0.1", ["Box.lan"])
    wild = allowed_hosts("0.0.0.0")
    assert socket.gethostname().lower() in wild and "attacker.example" not in wild


def test_oversized_and_odd_requests(server):
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10)})
    st, _, out = request(server, "POST", "/api/prompt", big)
    assert st == 413
    head = b"POST /api/prompt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    resp = raw(server, head + b"Content-Length: 99999999999\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 413")
    for bad in (b"-5", b"abc"):
        resp = raw(server, head + b"Content-Length: " + bad + b"\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 400"), resp[:40]
    resp = raw(server, head + b"Connection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 411")
    resp = raw(server, b"GARBAGE\r\n\r\n")
    assert b"400" in resp  # HTTP/0.9-style garbage gets a bare error page
    st, _, _ = request(server, "PUT", "/api/prompt", "{}")
    assert st == 405
    st, _, _ = request(server, "POST", "/data/index.js", "{}")
    assert st == 405
    st, hd, body = request(server, "HEAD", "/data/index.js")
    assert st == 200 and body == b"" and int(hd["content-length"]) > 0
    st, _, body = request(server, "GET", "/")
    assert st == 200


def test_parse_request_unit(tiny):
    assert parse_request({"prompt": "hi", "heads": [" 1.2", "1.2", "0.3"]}, tiny) == ("hi", [(1, 2), (0, 3)])
    with pytest.raises(BadRequest):
        parse_request({"prompt": "a\x00b"}, tiny)
    with pytest.raises(BadRequest, match="surrogate"):
        parse_request({"prompt": "a\ud800b"}, tiny)


def test_client_disconnects_are_quiet(server, capfd):
    """Clients that hang up mid-request or before reading the answer: no traceback, the server keeps going."""
    body = json.dumps({"prompt": "The cat sat on the mat. " * 4, "heads": ["1.2"]}).encode()
    for i in range(40):
        with socket.create_connection(server.server_address[:2], timeout=30) as s:
            head = (f"POST /api/prompt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            s.sendall(head + (body if i % 2 else body[: len(body) // 2]))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    st, _, _ = request(server, "POST", "/api/prompt", json.dumps({"prompt": "hello"}))
    assert st == 200
    time.sleep(0.5)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and len(err.splitlines()) <= 40, err[-2000:]


def test_idle_connections_are_dropped_and_do_not_block(tiny, tmp_path, monkeypatch):
    """200 connections that never send a request neither stop others from being served nor stay open
    past the request-head deadline."""
    monkeypatch.setattr(server_mod, "HEADER_TIMEOUT", 1.0)
    run = RunDir(tmp_path / "r", tiny.identity())
    build_atlas(run.path, progress=False)
    srv = make_server(run.path, model=tiny, port=0)
    serve_in_thread(srv)
    socks = []
    try:
        socks = [socket.create_connection(srv.server_address[:2], timeout=30) for _ in range(200)]
        socks[0].sendall(b"GET / HTTP/1.1\r\nHost: local")  # a trickled, never finished request head
        st, _, _ = request(srv, "POST", "/api/prompt", json.dumps({"prompt": "hello"}))
        assert st == 200
        deadline = time.time() + 30
        closed = 0
        for s in socks:  # each is closed by the server (recv returns b"" or the reset)
            s.settimeout(max(0.1, deadline - time.time()))
            try:
                closed += s.recv(100) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()
        srv.shutdown()
        srv.server_close()


def test_load_300_prompts_50_in_parallel(server):
    """Every one of 300 live prompts sent 50 at a time from 127.0.0.1 is answered, with exactly the
    answer the same request gets alone."""
    words = "the cat sat on a mat and then ran far away from home".split()
    reqs = [json.dumps({"prompt": " ".join(words[i % 7: i % 7 + 3 + i % 5]) + f" {i % 30}",
                        "heads": [f"{i % 2}.{i % 4}", "1.0"]}) for i in range(30)]
    alone = []
    for r in reqs:
        st, _, out = request(server, "POST", "/api/prompt", r)
        assert st == 200
        alone.append(json.loads(out))

    def one(i):
        st, _, out = request(server, "POST", "/api/prompt", reqs[i % len(reqs)])
        return i, st, out

    with ThreadPoolExecutor(50) as ex:
        got = list(ex.map(one, range(300)))
    assert [st for _, st, _ in got] == [200] * 300
    for i, _, out in got:
        assert json.loads(out) == alone[i % len(reqs)], i


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


def test_atlas_files_are_world_readable_and_concurrent_builds_do_not_collide(tmp_path, tiny):
    """Data pages are written like index.html (readable by the web server's other users), and several
    builds of one run at once (two studies refreshing the atlas) all succeed and leave one whole atlas."""
    import os
    import stat
    from concurrent.futures import ThreadPoolExecutor as Pool
    run = RunDir(tmp_path / "r", tiny.identity())
    with Pool(4) as ex:
        res = list(ex.map(lambda _: build_atlas(run.path, progress=False), range(4)))
    assert all(r["n_pages"] > 0 for r in res)
    atlas = run.path / "atlas"
    files = [p for p in atlas.rglob("*") if p.is_file()]
    assert any(p.suffix == ".js" and "data" in p.parts for p in files)
    umask = os.umask(0)
    os.umask(umask)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o444 & ~umask == 0o444 & ~umask, p
    for d in [atlas] + [p for p in atlas.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(d.stat().st_mode) & 0o555 & ~umask == 0o555 & ~umask, d
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".atlas")) == []


def test_body_limits_hold_whatever_the_framing(server, monkeypatch, capfd):
    """A chunked body is never read past the limit (it is refused outright, also behind a small
    Content-Length), a body that trickles is cut at BODY_TIMEOUT with 408, a URL over MAX_URL is 414
    with no traceback, and the server keeps answering."""
    head = b"POST /api/prompt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    chunk = b"x" * 8192  # the first chunk of a 60 MB chunked body: the answer comes before any more is read
    for framing in (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\r\n"):
        t0 = time.time()
        resp = raw(server, head + framing + b"\r\n" + b"%x\r\n%s" % (60_000_000, chunk))
        assert resp.split(b"\r\n")[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 411 Length Required"), resp[:80]
        assert b"prompt too long" not in resp and time.time() - t0 < 20
    monkeypatch.setattr(server_mod, "BODY_TIMEOUT", 1.0)
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        t0 = time.time()
        s.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"prompt"')  # 9 of 1000 bytes, then silence
        resp = s.recv(65536)
        assert resp.startswith(b"HTTP/1.1 408"), resp[:80]
        assert time.time() - t0 < 10
    for path in ("/" + "a" * 10_000, "/api/info?" + "q" * 5000, "/" + "%2e" * 3000):
        st, hd, body = request(server, "GET", path)
        assert st == 414 and "content-security-policy" in hd, (st, body[:80])
    st, _, body = request(server, "GET", "/" + "a" * 300)  # long but allowed: a plain 404
    assert st == 404
    st, _, _ = request(server, "POST", "/api/prompt", json.dumps({"prompt": "hello"}))
    assert st == 200
    time.sleep(0.3)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-2000:]
