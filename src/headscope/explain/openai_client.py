"""A small client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama,
llama.cpp's server, …), standard library only.

* **Concurrency**: at most ``concurrency`` requests in flight (a thread pool).
* **Retries**: HTTP 429 and 5xx, timeouts, refused connections and malformed JSON answers are retried
  up to ``max_retries`` times with exponential backoff and full jitter (``backoff · 2^attempt · U(0.5,
  1.5)``, capped at ``max_backoff``; a ``Retry-After`` header is honoured up to the cap). Other 4xx
  answers (bad key, unknown model) fail at once. When retries run out: :class:`HeadscopeError` naming
  the endpoint and the last failure.
* **Cache**: answers are stored by the SHA-256 of the request (URL + body) as JSON files, so a rerun
  (or a resumed run) sends nothing it already sent.
* **Dry run**: requests are appended to a JSONL file instead of being sent; nothing is cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import HeadscopeError
from ..runs import atomic_write_bytes
from .prompts import ClassifyRequest, ExplainRequest, classify_messages, explain_messages, parse_yes_no

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


class ResponseCache:
    """Answers keyed by the request, one JSON file each under ``root`` (atomic writes)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(url: str, body: dict) -> str:
        return hashlib.sha256((url + "\n" + json.dumps(body, sort_keys=True)).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())["content"]
        except (json.JSONDecodeError, KeyError, OSError):
            return None  # a corrupt entry is just a miss

    def put(self, key: str, content: str) -> None:
        atomic_write_bytes(self._path(key), json.dumps({"content": content}).encode())


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None):
        super().__init__(msg)
        self.retry_after = retry_after


class ChatClient:
    """POST ``{base_url}/chat/completions``; see the module docstring for the policies."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 4,
                 max_retries: int = 5, timeout: float = 60.0, backoff: float = 1.0, max_backoff: float = 30.0,
                 cache: ResponseCache | None = None, dry_run: Path | None = None, seed: int | None = None):
        if concurrency < 1:
            raise HeadscopeError(f"concurrency must be at least 1, got {concurrency}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
        self.backoff, self.max_backoff = backoff, max_backoff
        self.cache, self.dry_run = cache, dry_run
        self.seed = seed
        self._lock = threading.Lock()
        self.stats = {"sent": 0, "cached": 0, "retries": 0, "dry_run": 0}

    def body(self, messages: list[dict], max_tokens: int, temperature: float = 0.0) -> dict:
        b = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if self.seed is not None:
            b["seed"] = self.seed
        return b

    def complete(self, messages: list[dict], max_tokens: int = 200, temperature: float = 0.0) -> str:
        """The answer's text (``choices[0].message.content``)."""
        body = self.body(messages, max_tokens, temperature)
        if self.dry_run is not None:
            with self._lock:
                Path(self.dry_run).parent.mkdir(parents=True, exist_ok=True)
                with open(self.dry_run, "a") as f:
                    f.write(json.dumps({"url": self.url, "body": body}) + "\n")
                self.stats["dry_run"] += 1
            return ""
        key = ResponseCache.key(self.url, body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            with self._lock:
                self.stats["cached"] += 1
            return hit
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            try:
                content = self._post(body)
                if self.cache is not None:
                    self.cache.put(key, content)
                with self._lock:
                    self.stats["sent"] += 1
                return content
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                with self._lock:
                    self.stats["retries"] += 1
                delay = min(self.max_backoff, self.backoff * 2 ** attempt * random.uniform(0.5, 1.5))
                if e.retry_after is not None:
                    delay = min(self.max_backoff, max(delay, e.retry_after))
                time.sleep(delay)
        raise HeadscopeError(f"endpoint {self.url} failed after {self.max_retries + 1} attempts: {last} "
                             "(finished work is kept; rerun to resume)")

    def _post(self, body: dict) -> str:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace").replace("\n", " ")
            if e.code == 429 or e.code >= 500:
                ra = e.headers.get("Retry-After") if e.headers else None
                try:
                    ra = float(ra) if ra is not None else None
                except ValueError:
                    ra = None
                raise _Retryable(f"HTTP {e.code} {detail}", ra) from None
            raise HeadscopeError(f"endpoint {self.url} refused the request: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None
        try:
            ans = json.loads(raw)
            content = ans["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
            return content
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed answer ({type(e).__name__}): {raw[:120]!r}") from None

    def complete_many(self, requests: list[tuple[list[dict], int]]) -> list[str]:
        """Answers to (messages, max_tokens) requests, at most ``concurrency`` in flight, in order."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futs = [pool.submit(self.complete, m, n) for m, n in requests]
            return [f.result() for f in futs]


def api_key_from_env(base_url: str, env: str = "OPENAI_API_KEY") -> str | None:
    """The key from ``$env``; missing is an error unless the endpoint is on this machine."""
    key = os.environ.get(env)
    host = urllib.parse.urlparse(base_url).hostname or ""
    if not key and host not in LOCAL_HOSTS:
        raise HeadscopeError(f"missing API key: set ${env} for {base_url} (local servers need none), or "
                             "use --backend statistical to run offline")
    return key


class OpenAIExplainer:
    """Explainer and scorer through a :class:`ChatClient` (explanations: ≤ ``max_tokens`` tokens;
    scoring: one token, Yes → 1, No → 0, anything else → None)."""

    name = "openai"

    def __init__(self, client: ChatClient, max_tokens: int = 200):
        self.client, self.max_tokens = client, max_tokens

    def config(self) -> dict:
        return {"backend": "openai", "url": self.client.url, "model": self.client.model, "max_tokens": self.max_tokens}

    def explain_many(self, reqs: list[ExplainRequest]) -> list[str]:
        return [a.strip() for a in self.client.complete_many([(explain_messages(r), self.max_tokens) for r in reqs])]

    def classify_many(self, reqs: list[ClassifyRequest]) -> list[float | None]:
        return [parse_yes_no(a) for a in self.client.complete_many([(classify_messages(r), 1) for r in reqs])]
