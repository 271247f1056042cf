"""``headscope atlas serve``: serve one run's atlas folder, plus the live prompt API.

An ASGI app (Starlette) on uvicorn, so timeouts, the listen backlog, request parsing and the
concurrency cap come from a maintained server rather than from this file. What this file adds:

* **Static files**: only files under ``RUN/atlas/`` (paths are percent-decoded, ``..``, hidden names,
  NUL and backslashes are refused, and the resolved path must stay inside the folder: :func:`safe_path`).
* **Host check** (DNS rebinding): a request is answered only when its ``Host`` header names the bound
  address, ``localhost``/``127.0.0.1``/``[::1]``, or a name given with ``--allow-host`` (Starlette's
  ``TrustedHostMiddleware``; any other host gets 400).
* ``GET /api/info`` — whether the live box is on, the model, the limits.
* ``POST /api/prompt`` — JSON ``{"prompt": str, "heads": ["L.H"]}`` → :meth:`LiveEngine.run`. Needs
  ``Content-Type: application/json`` (415 otherwise, so a cross-site form cannot start work), a
  ``Content-Length`` (411) of at most ``MAX_BODY`` bytes (413; the bytes are counted as they are read, and a
  ``Transfer-Encoding`` (chunked) body is refused with 400), delivered within ``BODY_TIMEOUT`` s (408); bad JSON (incl. nesting too deep to
  parse), a lone surrogate or bad fields → 400; more than ``MAX_PENDING`` prompts waiting → 503; an
  unexpected failure → 500 with one log line. The model runs in ``WORKERS`` threads (the engine itself
  runs one forward pass at a time).
* **Limits**: at most ``MAX_CONNECTIONS`` open connections (503 beyond), a connection must send its
  request headers within ``HEADER_TIMEOUT`` s, idle keep-alive connections close after
  ``KEEP_ALIVE`` s, listen backlog ``BACKLOG``, a URL (path + query) of at most ``MAX_URL`` bytes (414). Client disconnects are not errors (no tracebacks).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import posixpath
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import HeadscopeError
from .live import BadRequest, LiveEngine

MAX_BODY = 16 * 1024   # bytes of a request body, counted as read (chunked bodies are refused outright)
BODY_TIMEOUT = 10.0    # seconds a request has to deliver its whole body once its head arrived (408 after)
MAX_URL = 2048         # bytes of path + query; longer: 414
WORKERS = 2            # threads that run live prompts (the engine serialises forward passes anyway)
MAX_PENDING = 256      # live prompts admitted at once (running + waiting); beyond: 503
MAX_CONNECTIONS = 512  # open connections + running requests (uvicorn's limit_concurrency); beyond: 503
HEADER_TIMEOUT = 10.0  # seconds a connection has to send a complete request head
KEEP_ALIVE = 5         # seconds an idle keep-alive connection stays open
BACKLOG = 1024         # listen backlog (the kernel caps it at net.core.somaxconn)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".json": "application/json", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", CSP.encode()),
                    (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]

log = logging.getLogger("headscope.atlas")


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
    try:
        target = (root / rel).resolve()
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(root):
        return None
    try:
        if target.is_dir():
            target = target / "index.html"
        return target if target.is_file() else None
    except OSError:  # a name too long for the file system, a permission: nothing to serve
        return None


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Host-header values the server answers: localhost names, the bound address and ``extra``;
    for a wildcard bind (0.0.0.0, ::) also this machine's host name and its addresses."""
    def norm(h: str) -> str:
        h = h.strip().lower()
        try:
            if ipaddress.ip_address(h.strip("[]")).version == 6:
                return f"[{h.strip('[]')}]"
        except ValueError:
            pass
        return h

    out = list(LOCAL_HOSTS) + [norm(host)] + [norm(h) for h in extra]
    if host in ("0.0.0.0", "::", ""):
        names = {socket.gethostname(), socket.getfqdn()}
        for name in list(names):
            try:
                names |= {ai[4][0] for ai in socket.getaddrinfo(name, None)}
            except OSError:
                pass
        out += [norm(n) for n in names if n]
    return sorted(set(out))


def _json(status: int, obj, close: bool = False):
    from starlette.responses import JSONResponse
    return JSONResponse(obj, status_code=status, headers={"Connection": "close"} if close else None)


def _error(status: int, msg: str, close: bool = False):
    return _json(status, {"error": msg}, close)


def make_app(root: Path, engine: LiveEngine | None, hosts: list[str], workers: int = WORKERS,
             max_pending: int = MAX_PENDING):
    """The Starlette app: static atlas files under ``root`` + the live API of ``engine`` (None: off)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    root = Path(root)
    limiter = anyio.CapacityLimiter(workers)
    state = {"pending": 0}

    async def info(request):
        return _json(200, engine.info() if engine else {"live": False})

    async def prompt(request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _error(415, "POST a JSON body with 'Content-Type: application/json'", close=True)
        length = request.headers.get("content-length")
        if length is None:
            return _error(411, "Content-Length required", close=True)
        if "transfer-encoding" in request.headers:  # h11 would follow the chunks, not Content-Length
            return _error(400, "Transfer-Encoding is not accepted: send a plain body with Content-Length",
                          close=True)
        n = int(length)  # h11 has already refused a malformed Content-Length
        if n > MAX_BODY:
            return _error(413, f"request too large: {n} bytes (at most {MAX_BODY})", close=True)
        chunks, got = [], 0
        try:
            with anyio.fail_after(BODY_TIMEOUT):
                async for chunk in request.stream():  # counted whatever the framing: never more than MAX_BODY
                    got += len(chunk)
                    if got > MAX_BODY:
                        return _error(413, f"request too large: more than {MAX_BODY} bytes", close=True)
                    chunks.append(chunk)
        except ClientDisconnect:
            log.info("client went away before sending its request body")
            return Response(status_code=400)  # nobody reads it
        except TimeoutError:
            return _error(408, f"request body not received within {BODY_TIMEOUT:g} s", close=True)
        raw = b"".join(chunks)
        if engine is None:
            return _error(503, "the live prompt box is off: serve with a model (--model)")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return _error(400, "request body is not valid UTF-8 JSON")
        except RecursionError:
            return _error(400, "request body is nested too deeply")
        if state["pending"] >= max_pending:
            return _error(503, f"busy: {state['pending']} live prompts are waiting; try again shortly")
        state["pending"] += 1
        try:
            res = await anyio.to_thread.run_sync(engine.run, body, limiter=limiter)
        except HeadscopeError as e:  # BadRequest included
            return _error(400, str(e).splitlines()[0] if str(e) else type(e).__name__)
        except Exception as e:  # noqa: BLE001 — report in one line, keep serving
            log.error("live prompt failed: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return _error(500, f"internal error: {type(e).__name__}")
        finally:
            state["pending"] -= 1
        return _json(200, res)

    async def api_missing(request):
        return _error(404, "no such API endpoint")

    def static(request):  # sync: Starlette runs it in its thread pool (file reads)
        if request.method not in ("GET", "HEAD"):
            return _error(405, "method not allowed")
        target = safe_path(root, request.scope.get("raw_path", b"").decode("latin-1") or request.url.path)
        if target is None:
            return _error(404, "not found")
        try:
            body = target.read_bytes()
        except OSError:
            return _error(404, "not found")
        ctype = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return Response(body, media_type=ctype)

    async def not_allowed(request, exc):
        return _error(405, "method not allowed")

    async def not_found(request, exc):
        return _error(404, "not found")

    routes = [
        Route("/api/info", info, methods=["GET"]),
        Route("/api/prompt", prompt, methods=["POST"]),
        Route("/api/{rest:path}", api_missing, methods=["GET", "POST"]),
        Route("/{path:path}", static, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
                    exception_handlers={405: not_allowed, 404: not_found})
    return _SecurityHeaders(app)


class _SecurityHeaders:
    """ASGI middleware: the CSP / nosniff / no-store headers on every response (errors included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > MAX_URL:
            from starlette.responses import JSONResponse
            response = JSONResponse({"error": f"URL longer than {MAX_URL} bytes"}, status_code=414,
                                    headers={"Connection": "close"})
            message_send = send

            async def send_414(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
                await message_send(message)
            return await response(scope, receive, send_414)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _protocol_class(header_timeout: float):
    """uvicorn's h11 protocol plus a deadline for the request head: a connection that has not sent a
    complete request head within ``header_timeout`` seconds of opening (or of its last response) is
    closed, so idle or trickling connections cannot pile up."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class AtlasProtocol(H11Protocol):
        _deadline = None
        _scope_at_arm = None

        def _arm(self):
            self._disarm()
            self._scope_at_arm = self.scope
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self):
            self._deadline = None
            if self.scope is self._scope_at_arm and not self.transport.is_closing():
                self.transport.close()  # no request head yet: drop the connection quietly

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self):
            super().handle_events()
            if self._deadline is not None and self.scope is not self._scope_at_arm:
                self._disarm()  # a request head arrived

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return AtlasProtocol


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the log line (redirections, test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: bool) -> None:
    """uvicorn's and our log lines, one per event, as ``atlas: ...`` on stderr."""
    for name in ("uvicorn", "headscope.atlas"):
        lg = logging.getLogger(name)
        if not any(getattr(h, "_headscope", False) for h in lg.handlers):
            h = _StderrHandler()
            h.setFormatter(logging.Formatter("atlas: %(message)s"))
            h._headscope = True
            lg.addHandler(h)
            lg.propagate = False
        lg.setLevel(logging.INFO if verbose else logging.WARNING)


class AtlasServer:
    """A bound, listening atlas server. ``serve_forever()`` runs it (blocking; Ctrl-C in the main thread
    stops it), ``shutdown()`` stops it from another thread, ``server_close()`` closes the socket."""

    def __init__(self, sock: socket.socket, root: Path, engine: LiveEngine | None, hosts: list[str],
                 verbose: bool = False):
        import uvicorn
        self.socket = sock
        self.root = Path(root)
        self.engine = engine
        self.allowed_hosts = hosts
        self.server_address = sock.getsockname()
        _setup_logging(verbose)
        config = uvicorn.Config(
            make_app(self.root, engine, hosts), http=_protocol_class(HEADER_TIMEOUT), ws="none",
            lifespan="off", log_config=None, access_log=verbose, log_level="info" if verbose else "warning",
            limit_concurrency=MAX_CONNECTIONS, backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE,
            timeout_graceful_shutdown=5, server_header=False, date_header=False)
        self._server = uvicorn.Server(config)
        self._done = threading.Event()
        self._running = False

    def serve_forever(self) -> None:
        self._running = True
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._running:
            self._done.wait(30)

    def server_close(self) -> None:
        self.socket.close()


def bind(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); one-line HeadscopeError if not."""
    if not 0 <= port <= 65535:
        raise HeadscopeError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    except (OSError, OverflowError) as e:
        msg = getattr(e, "strerror", None) or str(e)
        raise HeadscopeError(f"cannot listen on {host}:{port}: {msg}") from None
    sock.set_inheritable(True)
    return sock


def make_server(run_dir: Path, model=None, host: str = "127.0.0.1", port: int = 8765,
                verbose: bool = False, allow_hosts: list[str] | tuple[str, ...] = ()) -> AtlasServer:
    """A server for ``RUN/atlas`` (which must be built); ``model`` turns the live prompt box on."""
    root = Path(run_dir) / "atlas"
    if not (root / "index.html").is_file():
        raise HeadscopeError(f"no atlas in {run_dir}: run `headscope atlas build {run_dir}` first")
    sock = bind(host, port)
    try:
        engine = LiveEngine(model, Path(run_dir)) if model is not None else None
        return AtlasServer(sock, root, engine, allowed_hosts(host, allow_hosts), verbose)
    except BaseException:
        sock.close()
        raise


def serve_in_thread(server: AtlasServer) -> threading.Thread:
    """Run ``server`` in a daemon thread (tests, notebooks); stop it with ``server.shutdown()``."""
    server._running = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return t

