"""``headscope atlas serve``: serve one run's atlas folder, plus the live prompt API.

Only files under ``RUN/atlas/`` are served (paths are percent-decoded, ``..``, hidden names, NUL and
backslashes are refused, and the resolved path must stay inside the folder). Endpoints:

* ``GET /api/info`` — whether the live box is on, the model, the limits.
* ``POST /api/prompt`` — JSON ``{"prompt": str, "heads": ["L.H"]}`` → :meth:`LiveEngine.run`.
  Bodies over ``MAX_BODY`` bytes get 413, a missing length 411, bad JSON or fields 400; an
  unexpected failure 500. The server keeps serving after any of them.
"""

from __future__ import annotations

import json
import mimetypes
import posixpath
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import HeadscopeError
from .live import BadRequest, LiveEngine

MAX_BODY = 16 * 1024
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".json": "application/json", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def safe_path(root: Path, raw: str) -> Path | None:
    """The file under ``root`` that the request path ``raw`` names, or None when it is not a plain
    file inside ``root`` (traversal in any encoding, hidden names, odd characters)."""
    path = urlsplit(raw).path
    for _ in range(3):  # decode repeatedly so %252e%252e cannot smuggle '..' past a later decoder
        dec = unquote(path)
        if dec == path:
            break
        path = dec
    if "\x00" in path or "\\" in path or "%" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in ("..", ".") or p.startswith(".") for p in parts):
        return None
    rel = posixpath.join(*parts) if parts else "index.html"
    root = root.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        return None
    if target.is_dir():
        target = target / "index.html"
    return target if target.is_file() else None


class AtlasHandler(BaseHTTPRequestHandler):
    server_version = "headscope-atlas"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet unless asked
        if getattr(self.server, "verbose", False):
            sys.stderr.write("atlas: " + (fmt % args) + "\n")

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _error(self, status: int, msg: str) -> None:
        self._json(status, {"error": msg})

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/api/info":
            live = self.server.engine
            return self._json(200, live.info() if live else {"live": False})
        if path.startswith("/api/"):
            return self._error(404, "no such API endpoint")
        target = safe_path(self.server.root, self.path)
        if target is None:
            return self._error(404, "not found")
        try:
            body = target.read_bytes()
        except OSError:
            return self._error(404, "not found")
        ctype = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, body, ctype)

    do_HEAD = do_GET

    def do_POST(self):
        path = urlsplit(self.path).path
        if path != "/api/prompt":
            self.close_connection = True
            return self._error(404, "no such API endpoint")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            return self._error(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            return self._error(400, "bad Content-Length")
        if n < 0 or n > MAX_BODY:
            self.close_connection = True  # do not read an oversized body
            return self._error(413, f"request too large: {n} bytes (at most {MAX_BODY})")
        raw = self.rfile.read(n)
        engine = self.server.engine
        if engine is None:
            return self._error(503, "the live prompt box is off: serve with a model (--model)")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self._error(400, "request body is not valid UTF-8 JSON")
        try:
            res = engine.run(body)
        except BadRequest as e:
            return self._error(400, str(e))
        except HeadscopeError as e:
            return self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 — report, keep serving
            sys.stderr.write(f"atlas: live prompt failed: {type(e).__name__}: {e}\n")
            return self._error(500, f"internal error: {type(e).__name__}")
        self._json(200, res)

    def do_PUT(self):
        self.close_connection = True
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_PUT


class AtlasServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, root: Path, engine: LiveEngine | None, verbose: bool = False):
        self.root = Path(root)
        self.engine = engine
        self.verbose = verbose
        super().__init__(addr, AtlasHandler)


def make_server(run_dir: Path, model=None, host: str = "127.0.0.1", port: int = 8765,
                verbose: bool = False) -> AtlasServer:
    """A server for ``RUN/atlas`` (which must be built); ``model`` turns the live prompt box on."""
    root = Path(run_dir) / "atlas"
    if not (root / "index.html").is_file():
        raise HeadscopeError(f"no atlas in {run_dir}: run `headscope atlas build {run_dir}` first")
    engine = LiveEngine(model, Path(run_dir)) if model is not None else None
    try:
        return AtlasServer((host, port), root, engine, verbose)
    except OSError as e:
        raise HeadscopeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve_in_thread(server: AtlasServer) -> threading.Thread:
    """Run ``server`` in a daemon thread (tests, notebooks); stop it with ``server.shutdown()``."""
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return t
