"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp's server, …) through
the ``openai`` package (optional extra: ``pip install headscope[openai]``), with headscope's cache and
dry run around it.

* **Transport, retries, timeouts** — the ``openai`` package: HTTP 408/409/429/5xx, timeouts and refused
  connections are retried up to ``max_retries`` times with its exponential backoff (0.5 s · 2^n, ≤ 8 s,
  jittered), honouring ``Retry-After`` / ``retry-after-ms``; other 4xx answers (bad key, unknown model) fail
  at once. headscope adds one thing the package does not retry: a 200 answer that is not a chat completion
  (malformed JSON, no choices, no text) is retried up to ``max_retries`` times, ``backoff · 2^n`` seconds apart.
  When retries run out: one-line :class:`HeadscopeError` naming the endpoint and the last failure.
* **Concurrency**: at most ``concurrency`` requests in flight (a thread pool over one client).
* **Log-probabilities**: Yes/No judgements ask for ``logprobs`` (``top_logprobs=20``) and turn them into
  P(yes)/(P(yes)+P(no)). A server that refuses the parameter (HTTP 400/422 naming it) or answers without
  them is remembered (``logprobs_supported = False``); judgements then come from the answer's text
  (1 / 0 / None), and every score file says which (``probabilities``).
* **Cache**: answers (text and log-probabilities) stored by the SHA-256 of the request (URL + body) as JSON
  files, so a rerun (or a resumed run) sends nothing it already sent.
* **Dry run**: requests are appended to a JSONL file instead of being sent; nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HeadscopeError
from ..runs import atomic_write_bytes
from .prompts import ClassifyRequest, ExplainRequest, classify_messages, explain_messages, parse_yes_no

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
TOP_LOGPROBS = 20


@dataclass
class Answer:
    """One completion: its text and, when asked for and given, the first answer token's top log-probs."""

    content: str
    top_logprobs: dict[str, float] | None = field(default=None)

    def p_yes(self) -> float | None:
        """P(yes) / (P(yes) + P(no)) over the first token's alternatives (spellings stripped and
        lower-cased); the text's yes/no (1 / 0 / None) when there are no log-probabilities or neither word
        is among them."""
        if self.top_logprobs:
            y = sum(math.exp(v) for k, v in self.top_logprobs.items() if k.strip().lower() == "yes")
            n = sum(math.exp(v) for k, v in self.top_logprobs.items() if k.strip().lower() == "no")
            if y + n > 0:
                return y / (y + n)
        return parse_yes_no(self.content)


class ResponseCache:
    """Answers keyed by the request, one JSON file each under ``root`` (atomic writes)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(url: str, body: dict) -> str:
        return hashlib.sha256((url + "\n" + json.dumps(body, sort_keys=True)).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Answer | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
            return Answer(d["content"], d.get("top_logprobs"))
        except (json.JSONDecodeError, KeyError, OSError, TypeError):
            return None  # a corrupt entry is just a miss

    def put(self, key: str, ans: Answer) -> None:
        atomic_write_bytes(self._path(key), json.dumps({"content": ans.content,
                                                        "top_logprobs": ans.top_logprobs}).encode())


class _Malformed(Exception):
    pass


def _openai():
    try:
        import openai
    except ImportError:
        raise HeadscopeError("the openai backend needs the `openai` package: pip install 'headscope[openai]'") \
            from None
    return openai


class ChatClient:
    """``{base_url}/chat/completions`` through ``openai.OpenAI``; see the module docstring for the policies."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 4,
                 max_retries: int = 5, timeout: float = 60.0, backoff: float = 1.0,
                 cache: ResponseCache | None = None, dry_run: Path | None = None, seed: int | None = None):
        if concurrency < 1:
            raise HeadscopeError(f"concurrency must be at least 1, got {concurrency}")
        if max_retries < 0:
            raise HeadscopeError(f"max retries must be at least 0, got {max_retries}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.max_retries, self.timeout, self.backoff = concurrency, max_retries, timeout, backoff
        self.cache, self.dry_run, self.seed = cache, dry_run, seed
        self.logprobs_supported: bool | None = None  # unknown until the server answers a judgement
        self._lock = threading.Lock()
        self._client = None
        self._local = threading.local()  # attempts of the request this thread is sending
        self.stats = {"sent": 0, "cached": 0, "retries": 0, "dry_run": 0, "attempts": 0}

    def _sdk(self):
        if self._client is None:
            openai = _openai()

            def count(_request):
                self._local.attempts = getattr(self._local, "attempts", 0) + 1
                with self._lock:
                    self.stats["attempts"] += 1
            http = openai.DefaultHttpxClient(event_hooks={"request": [count]})
            self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none",
                                         max_retries=self.max_retries, timeout=self.timeout, http_client=http)
        return self._client

    def body(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, logprobs: bool = False) -> dict:
        b = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if self.seed is not None:
            b["seed"] = self.seed
        if logprobs:
            b["logprobs"], b["top_logprobs"] = True, TOP_LOGPROBS
        return b

    def complete(self, messages: list[dict], max_tokens: int = 200, temperature: float = 0.0) -> str:
        """The answer's text (``choices[0].message.content``)."""
        return self.answer(messages, max_tokens, temperature).content

    def answer(self, messages: list[dict], max_tokens: int = 200, temperature: float = 0.0,
               logprobs: bool = False) -> Answer:
        """One completion (from the cache when it holds it); ``logprobs`` asks for the first token's top
        log-probabilities unless the server is known not to give them."""
        logprobs = logprobs and self.logprobs_supported is not False
        body = self.body(messages, max_tokens, temperature, logprobs)
        if self.dry_run is not None:
            with self._lock:
                Path(self.dry_run).parent.mkdir(parents=True, exist_ok=True)
                with open(self.dry_run, "a") as f:
                    f.write(json.dumps({"url": self.url, "body": body}) + "\n")
                self.stats["dry_run"] += 1
            return Answer("")
        key = ResponseCache.key(self.url, body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            with self._lock:
                self.stats["cached"] += 1
            return hit
        self._local.attempts = 0
        try:
            ans = self._send(body)
        finally:
            with self._lock:
                self.stats["retries"] += max(0, self._local.attempts - 1)
        if logprobs and ans.top_logprobs is None:
            with self._lock:
                self.logprobs_supported = False
        elif logprobs:
            with self._lock:
                self.logprobs_supported = True
        if self.cache is not None:
            self.cache.put(key, ans)
        with self._lock:
            self.stats["sent"] += 1
        return ans

    def _send(self, body: dict) -> Answer:
        openai = _openai()
        fail = f"endpoint {self.url} failed after {self.max_retries + 1} attempts"
        keep = "(finished work is kept; rerun to resume)"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._sdk().chat.completions.create(**body)
                return self._parse(resp)
            except openai.APIStatusError as e:
                if e.status_code in (400, 422) and body.get("logprobs") and "logprob" in str(e).lower():
                    with self._lock:
                        self.logprobs_supported = False
                    return self._send({k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")})
                if e.status_code == 429 or e.status_code >= 500 or e.status_code in (408, 409):
                    raise HeadscopeError(f"{fail}: HTTP {e.status_code} {_short(e)} {keep}") from None
                raise HeadscopeError(f"endpoint {self.url} refused the request: HTTP {e.status_code} "
                                     f"{_short(e)}") from None
            except openai.APITimeoutError:
                raise HeadscopeError(f"{fail}: timed out after {self.timeout:g} s {keep}") from None
            except openai.APIConnectionError as e:
                raise HeadscopeError(f"{fail}: cannot connect ({_short(e)}) {keep}") from None
            except (_Malformed, openai.APIResponseValidationError, json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"malformed answer ({_short(e)})"
        raise HeadscopeError(f"{fail}: {last} {keep}")

    @staticmethod
    def _parse(resp) -> Answer:
        if isinstance(resp, (str, bytes)):
            raise _Malformed(f"not JSON: {resp[:80]!r}")
        try:
            choice = resp.choices[0]
            content = choice.message.content
        except (AttributeError, IndexError, TypeError, KeyError):
            raise _Malformed(f"no choices[0].message.content in {str(resp)[:80]!r}") from None
        if not isinstance(content, str):
            raise _Malformed("content is not a string")
        top = None
        lp = getattr(choice, "logprobs", None)
        toks = getattr(lp, "content", None) if lp is not None else None
        if toks:
            alts = getattr(toks[0], "top_logprobs", None) or []
            top = {a.token: float(a.logprob) for a in alts} or {toks[0].token: float(toks[0].logprob)}
        return Answer(content, top)

    def complete_many(self, requests: list[tuple[list[dict], int]]) -> list[str]:
        """Answers to (messages, max_tokens) requests, at most ``concurrency`` in flight, in order."""
        return [a.content for a in self.answer_many(requests)]

    def answer_many(self, requests: list[tuple[list[dict], int]], logprobs: bool = False) -> list[Answer]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futs = [pool.submit(self.answer, m, n, 0.0, logprobs) for m, n in requests]
            return [f.result() for f in futs]


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:160]


def api_key_from_env(base_url: str, env: str = "OPENAI_API_KEY") -> str | None:
    """The key from ``$env``; missing is an error unless the endpoint is on this machine."""
    key = os.environ.get(env)
    host = urllib.parse.urlparse(base_url).hostname or ""
    if not key and host not in LOCAL_HOSTS:
        raise HeadscopeError(f"missing API key: set ${env} for {base_url} (local servers need none), or "
                             "use --backend statistical to run offline")
    return key


class OpenAIExplainer:
    """Explainer and scorer through a :class:`ChatClient`. Explanations: ≤ ``max_tokens`` tokens. Scoring:
    one answer token, P(yes) from its log-probabilities when the server gives them, else the text's
    Yes → 1, No → 0, anything else → None (``probabilities`` says which)."""

    name = "openai"

    def __init__(self, client: ChatClient, max_tokens: int = 200):
        self.client, self.max_tokens = client, max_tokens

    def config(self) -> dict:
        return {"backend": "openai", "url": self.client.url, "model": self.client.model, "max_tokens": self.max_tokens}

    @property
    def probabilities(self) -> str:
        """How judgements were read: ``logprobs``, ``text (the server gave no log-probabilities)`` or
        ``unknown`` (nothing judged yet)."""
        s = self.client.logprobs_supported
        return "unknown" if s is None else "logprobs" if s else "text (the server gave no log-probabilities)"

    def complete_many(self, messages: list[list[dict]], max_tokens: int | None = None) -> list[str]:
        """Free text for each chat (explanations, head summaries)."""
        n = max_tokens or self.max_tokens
        return [a.strip() for a in self.client.complete_many([(m, n) for m in messages])]

    def p_yes_many(self, messages: list[list[dict]]) -> list[float | None]:
        """P(yes) for each yes/no question (see the class docstring)."""
        return [a.p_yes() for a in self.client.answer_many([(m, 1) for m in messages], logprobs=True)]

    def explain_many(self, reqs: list[ExplainRequest]) -> list[str]:
        return self.complete_many([explain_messages(r) for r in reqs])

    def classify_many(self, reqs: list[ClassifyRequest]) -> list[float | None]:
        return self.p_yes_many([classify_messages(r) for r in reqs])
