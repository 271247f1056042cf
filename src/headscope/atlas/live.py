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

from ..capture import capture
from ..errors import HeadscopeError

MAX_CHARS = 2000
MAX_TOKENS = 128
MAX_HEADS = 12


def lens_lists(info: dict, n_tokens: int) -> dict:
    """One head of :func:`headscope.lens.apply.show` as per-position lists aligned with the prompt's
    ``n_tokens`` tokens: {"lens": [S][≤k] tokens, "lens_prob": [S][≤k], "lens_term": [S][≤k] (bits of
    KL(lens ‖ null), when ranked by it), "unembedding": [S][k], "gain", "informative"}; position 0 is not
    modelled, so its lists are empty."""
    view = {"lens": [[] for _ in range(n_tokens)], "lens_prob": [[] for _ in range(n_tokens)],
            "lens_term": [[] for _ in range(n_tokens)], "unembedding": [[] for _ in range(n_tokens)],
            "gain": info.get("gain"), "informative": info.get("informative")}
    for p in info["positions"]:
        t = p["t"]
        view["lens"][t] = [x[0] for x in p["lens"]]
        view["lens_prob"][t] = [round(x[1], 4) for x in p["lens"]]
        view["lens_term"][t] = [round(x[2], 4) if x[2] is not None else None for x in p["lens"]]
        view["unembedding"][t] = [x[0] for x in p["unembed"]]
    return view


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
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("prompt is not valid Unicode (it contains a lone surrogate)") from None
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

    def __init__(self, model, run_dir: Path, max_tokens: int = MAX_TOKENS, progress: bool = False):
        self.model = model
        self.run_dir = Path(run_dir)
        self.max_tokens = min(max_tokens, model.n_ctx)
        self.lock = threading.Lock()
        self.views = ["attention pattern"]
        self.load_errors: dict[str, str] = {}
        self.lens = self._load("lens", self._load_lens)
        self.saes = self._load("sae", self._load_saes) or {}
        self.neurons = self._load("neurons", self._load_neurons) or []
        if self.lens:
            self.views.append("lens tokens per position")
        if self.saes:
            self.views.append("SAE features per position with DFA")
        if self.neurons:
            self.views.append("firing next-token neurons and the heads that drive them")

    def _load(self, name: str, fn):
        """Load one instrument's artifacts for live use; absent → None, broken → noted in load_errors."""
        try:
            return fn()
        except ModuleNotFoundError:
            return None
        except HeadscopeError as e:
            self.load_errors[name] = str(e).splitlines()[0]
            return None

    def _load_lens(self):
        if not (self.run_dir / "lens" / "lenses.json").is_file():
            return None
        from ..lens.apply import load_gains
        from ..lens.lenses import load_bank
        from ..lens.train import load_null
        bank, _ = load_bank(self.model, self.run_dir / "lens")
        bank = bank.to(self.model.device)
        null = load_null(self.run_dir / "lens") if (self.run_dir / "lens" / "null.safetensors").is_file() else None
        return {"bank": bank, "sites": set(map(tuple, bank.sites)), "gains": load_gains(self.run_dir / "lens"),
                "null": null}

    def _load_saes(self):
        root = self.run_dir / "sae"
        if not root.is_dir():
            return None
        from ..sae.io import load_sae
        out = {}
        for folder in sorted(p for p in root.iterdir() if (p / "cfg.json").is_file()):
            sae = load_sae(folder, self.model).to(self.model.device)
            out[folder.name] = sae
        return out

    def _load_neurons(self):
        """Studied next-token neurons with their firing threshold: half the largest activation seen
        on their mined train prompts."""
        mine = self.run_dir / "neurons" / "mine.json"
        if not mine.is_file():
            return None
        from ..runs import read_json
        out = []
        for n in read_json(mine)["neurons"]:
            acts = [p["act"] for p in n.get("train", [])]
            if acts and max(acts) > 0:
                out.append({"layer": n["layer"], "neuron": n["neuron"], "token": n["token"],
                            "max_act": max(acts), "threshold": 0.5 * max(acts)})
        return out

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
                "max_heads": MAX_HEADS, "max_chars": MAX_CHARS, "default_heads": self.default_heads(),
                "lens_heads": sorted(f"{l}.{h}" for l, h in self.lens["sites"]) if self.lens else [],
                "saes": {k: int(v.cfg.layer) for k, v in self.saes.items()}, "n_neurons": len(self.neurons),
                "load_errors": self.load_errors}

    def run(self, body) -> dict:
        model = self.model
        prompt, heads = parse_request(body, model)
        try:
            ids = model.to_tokens(prompt)
        except HeadscopeError as e:
            raise BadRequest(str(e)) from None
        if ids.shape[1] > self.max_tokens:
            raise BadRequest(f"prompt too long: {ids.shape[1]} tokens (at most {self.max_tokens})")
        out: dict = {"tokens": model.token_str(ids[0]), "heads": {}, "views": {}, "errors": {}}
        layers = sorted({l for l, _ in heads})
        with self.lock:
            if layers:
                cap = capture(model, ids, layers=layers, what={"pattern"})
                for l, h in heads:
                    p = cap["pattern"][l][0, h].float().cpu()
                    out["heads"][f"{l}.{h}"] = {"pattern": (torch.round(p * 1000) / 1000).tolist()}
                from ..heads.in_context import read_in_context   # where each head looks and what it writes
                lens = self.lens or {}
                for hk, rec in read_in_context(model, ids, heads=list(heads), bank=lens.get("bank"),
                                               null=lens.get("null"), gains=lens.get("gains")).items():
                    out["heads"][hk]["in_context"] = rec
            for name, fn in (("lens", self._lens_view), ("sae", self._sae_view), ("neurons", self._neuron_view)):
                try:
                    fn(prompt, ids, heads, out)
                except HeadscopeError as e:
                    out["errors"][name] = str(e).splitlines()[0]
        return out

    def _lens_view(self, prompt: str, ids, heads, out: dict, k: int = 5) -> None:
        """Per position t ≥ 1, the top-k tokens of each picked head's lens — ranked by their KL(lens ‖ null)
        term, as ``lens show`` does (by probability only when the run has no null lens) — and of its
        unembedding baseline (``headscope.lens.apply.show``); position 0's lists are empty."""
        if not self.lens:
            return
        sites = [s for s in heads if s in self.lens["sites"]]
        if not sites:
            return
        from ..lens.apply import show
        null = self.lens.get("null")
        res = show(self.model, self.lens["bank"], prompt, sites=sites, k=k, gains=self.lens["gains"], null=null,
                   by="kl" if null is not None else "prob")
        for name, info in res["heads"].items():
            out["heads"][name]["lens"] = lens_lists(info, len(out["tokens"]))

    def _sae_view(self, prompt: str, ids, heads, out: dict, k: int = 5, n_src: int = 5) -> None:
        """For each SAE: per position the ``k`` most active features, each with its DFA over source
        tokens (top ``n_src`` by |DFA|, summed over heads) and per head (``headscope.sae.attribution.dfa``)."""
        if not self.saes:
            return
        from ..sae.attribution import dfa
        model = self.model
        tokens = out["tokens"]
        views = {}
        for name, sae in self.saes.items():
            L = sae.cfg.layer
            z = capture(model, ids, layers=[L], what={"z"}, stop_after=L)["z"][L][0]
            acts = sae.encode(z.reshape(z.shape[0], -1).float()).cpu()           # [S, F]
            acts[0] = 0.0  # BOS is not modelled
            top = acts.topk(min(k, acts.shape[1]), dim=-1)
            feats = sorted({int(f) for t in range(acts.shape[0]) for v, f in zip(top.values[t], top.indices[t]) if v > 0})
            rows = []
            if feats:
                D = dfa(model, sae, ids, features=feats)[0].cpu()                  # [T, S, H, F']
                col = {f: j for j, f in enumerate(feats)}
                for t in range(acts.shape[0]):
                    fl = []
                    for v, f in zip(top.values[t].tolist(), top.indices[t].tolist()):
                        if v <= 0:
                            continue
                        d = D[t, : t + 1, :, col[f]]                                 # [S', H]
                        per_src = d.sum(1)
                        order = per_src.abs().topk(min(n_src, t + 1)).indices.tolist()
                        fl.append({"feature": f, "act": round(v, 4),
                                   "dfa_sources": [{"pos": p, "token": tokens[p], "dfa": round(float(per_src[p]), 4)}
                                                   for p in order],
                                   "dfa_heads": [round(float(x), 4) for x in d.sum(0)]})
                    rows.append(fl)
            else:
                rows = [[] for _ in tokens]
            views[name] = {"layer": L, "positions": rows}
        out["views"]["sae"] = views

    def _neuron_view(self, prompt: str, ids, heads, out: dict, max_pairs: int = 16, top_heads: int = 5) -> None:
        """Studied next-token neurons that fire (activation ≥ half their mined maximum) at some position,
        strongest first, each with the heads that drive it there (attribution A and whether the head is
        active: A > mean + 2σ; ``headscope.neurons.attribution``)."""
        if not self.neurons:
            return
        from ..neurons.attribution import active_heads, attribute_prompts, head_name
        model = self.model
        layers = sorted({n["layer"] for n in self.neurons})
        cap = capture(model, ids, layers=layers, what={"mlp_post"}, stop_after=max(layers))
        firing = []
        for n in self.neurons:
            a = cap["mlp_post"][n["layer"]][0, :, n["neuron"]].float().cpu()
            for t in range(1, a.shape[0]):
                if a[t] >= n["threshold"]:
                    firing.append((float(a[t]) / n["max_act"], t, float(a[t]), n))
        firing.sort(key=lambda x: -x[0])
        firing = firing[:max_pairs]
        rows = []
        if firing:
            row_ids = [ids[0, : t + 1].tolist() for _, t, _, _ in firing]
            A = attribute_prompts(model, row_ids, [n["layer"] for *_, n in firing], [n["neuron"] for *_, n in firing],
                                  progress=False)
            act = active_heads(A)
            for i, (rel, t, a, n) in enumerate(firing):
                vals = torch.nan_to_num(A[i], nan=float("-inf"))
                order = vals.topk(min(top_heads, int((~torch.isnan(A[i])).sum()))).indices.tolist()
                rows.append({"neuron": f"{n['layer']}.{n['neuron']}", "token": n["token"], "pos": t,
                             "at": out["tokens"][t], "act": round(a, 4), "rel_act": round(rel, 3),
                             "heads": [{"head": head_name(model, k), "A": round(float(A[i, k]), 4),
                                        "active": bool(act[i, k])} for k in order]})
        out["views"]["neurons"] = rows
