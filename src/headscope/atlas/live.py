"""The live prompt box: run the model on any prompt in the server process.

:class:`LiveEngine` answers ``{"prompt": str, "heads": ["L.H", ...]}`` with::

    {"tokens": [S] str,
     "heads": {"L.H": {"pattern": [S][S] (dest, src), ...per-instrument views of that head}},
     "views": {name: ...global views (SAE features per position, firing neurons)},
     "errors": {view: message}}

Requests are validated first (:class:`BadRequest`, answered with HTTP 400): a prompt of at most
``max_chars`` characters and ``max_tokens`` tokens, at most ``max_heads`` heads, each ``"L.H"`` in range.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import torch

from ..errors import HeadscopeError

MAX_CHARS = 2000
MAX_TOKENS = 128
MAX_HEADS = 12


class BadRequest(HeadscopeError):
    """A malformed or oversized live-prompt request (HTTP 400)."""


def parse_request(body, model, max_chars: int = MAX_CHARS, max_heads: int = MAX_HEADS) -> tuple[str, list[tuple[int, int]]]:
    """Validate a request body; returns (prompt, [(layer, head)])."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = set(body) - {"prompt", "heads"}
    if unknown:
        raise BadRequest(f"unknown request field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' must be a non-empty string")
    if len(prompt) > max_chars:
        raise BadRequest(f"prompt too long: {len(prompt)} characters (at most {max_chars})")
    if "\x00" in prompt:
        raise BadRequest("prompt contains a NUL character")
    heads = body.get("heads", [])
    if not isinstance(heads, list) or not all(isinstance(x, str) for x in heads):
        raise BadRequest("'heads' must be a list of strings like \"3.1\"")
    if len(heads) > max_heads:
        raise BadRequest(f"too many heads: {len(heads)} (at most {max_heads})")
    out = []
    for x in heads:
        m = re.fullmatch(r"\s*(\d{1,6})\.(\d{1,6})\s*", x)
        if not m:
            raise BadRequest(f"bad head {x[:40]!r}: write layer.head, e.g. \"3.1\"")
        layer, head = int(m.group(1)), int(m.group(2))
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise BadRequest(f"head {layer}.{head} does not exist: the model has layers 0..{model.n_layers - 1} "
                             f"and heads 0..{model.n_heads - 1}")
        if (layer, head) not in out:
            out.append((layer, head))
    return prompt, out


class LiveEngine:
    """Runs live prompts for the server; one forward pass at a time (a lock guards the model)."""

    def __init__(self, model, run_dir: Path, max_tokens: int = MAX_TOKENS):
        self.model = model
        self.run_dir = Path(run_dir)
        self.max_tokens = min(max_tokens, model.n_ctx)
        self.lock = threading.Lock()
        self.views = ["attention pattern"]

    def default_heads(self) -> list[str]:
        """The three heads with the highest induction score, when head scores exist."""
        from ..runs import read_json
        p = self.run_dir / "heads" / "scores.json"
        try:
            grid = read_json(p)["scores"]["induction"]
            flat = sorted(((v, f"{l}.{h}") for l, row in enumerate(grid) for h, v in enumerate(row)
                           if isinstance(v, (int, float))), reverse=True)
            return [k for _, k in flat[:3]]
        except (HeadscopeError, KeyError, TypeError):
            return [f"{self.model.n_layers // 2}.0"]

    def info(self) -> dict:
        return {"live": True, "model": self.model.name, "views": self.views, "max_tokens": self.max_tokens,
                "max_heads": MAX_HEADS, "max_chars": MAX_CHARS, "default_heads": self.default_heads()}

    def run(self, body) -> dict:
        model = self.model
        prompt, heads = parse_request(body, model)
        try:
            ids = model.to_tokens(prompt)
        except HeadscopeError as e:
            raise BadRequest(str(e)) from None
        if ids.shape[1] > self.max_tokens:
            raise BadRequest(f"prompt too long: {ids.shape[1]} tokens (at most {self.max_tokens})")
        from ..capture import capture
        out: dict = {"tokens": model.token_str(ids[0]), "heads": {}, "views": {}, "errors": {}}
        layers = sorted({l for l, _ in heads})
        with self.lock:
            if layers:
                cap = capture(model, ids, layers=layers, what={"pattern"})
                for l, h in heads:
                    p = cap["pattern"][l][0, h].float().cpu()
                    out["heads"][f"{l}.{h}"] = {"pattern": (torch.round(p * 1000) / 1000).tolist()}
        return out
