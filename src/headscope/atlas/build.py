"""Write the static head atlas into ``RUN/atlas/``.

Layout (every data page is a JavaScript file calling ``window.__atlas_page(key, data)``, so the site
opens from disk without a server; each page is small so a model with thousands of heads loads fast)::

    RUN/atlas/index.html
    RUN/atlas/static/atlas.js, atlas.css
    RUN/atlas/data/index.js                      model, sources, grid measures [L][H], collection sizes,
                                                  highlights (the Start-here heads: atlas/highlights.py),
                                                  role_grid [L][H] (strongest confirmed role or null) and
                                                  roles {id: title} when the run has heads/roles.json
    RUN/atlas/data/layer/<L>.js                  {"layer": L, "heads": {"<H>": {source: per-head data}},
                                                  "patterns": [{"prompt": i, "heads": {"<H>": [S][S]}}],
                                                  "in_context": {"<H>": [{"prompt": i, readings}]}
                                                  (example_readings: where it looks, what it writes)
    RUN/atlas/data/search/<c>.js                 {"tokens": {token: ["L.H", ...]}} (c: first character)
    RUN/atlas/data/search/docs.js                {"docs": [[kind, id, href, title, text], ...]}: heads,
                                                  features and neurons by token and explanation text
    RUN/atlas/data/c/<source>/<key>/ids.js       {"ids": [...], "summary": [[id, {scalar fields}], ...]}
    RUN/atlas/data/c/<source>/<key>/<chunk>.js   {"items": {id: item}} (CHUNK items a page)

The folder is written next to the old one and swapped in, so an interrupted build leaves the previous
atlas intact.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from ..errors import HeadscopeError
from ..runs import RunDir, os_error_text, read_json, using_run
from .collect import clean, collect
from .highlights import highlights, load_neuron_ablation

CHUNK = 50
"""Items of a collection (features, neurons) per data page."""
SEARCH_PER_HEAD = 60
"""Most tokens per head and source put into the token search index."""
MAX_EXAMPLE_TOKENS = 48
DEFAULT_EXAMPLES = (
    "The cat sat on the mat. Then the dog ran to the park. The cat sat on the mat.",
    "When Mary and John went to the store, John gave a drink to Mary because she was thirsty.",
)
"""Prompts whose attention patterns the static atlas shows for every head (the first repeats a
sentence, so induction and previous-token heads are visible)."""

RECORD_LISTS = {"sae": "sae"}
"""Per-head keys holding a list of records (one per SAE of the layer) whose first record's numbers are
grid measures (e.g. the SAE's ``n_groups`` and ``polysemantic``)."""

SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


def page_js(key: str, data) -> bytes:
    """The JS text of one data page: ``window.__atlas_page(key, data);`` with every non-ASCII
    character and ``<`` escaped, so no token text can end a script or be read as markup."""
    body = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    body = body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"window.__atlas_page({json.dumps(key)},{body});\n".encode("ascii")


def _safe(part: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_\-]", "_", str(part))
    return s or "_"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_head(key: str, L: int, H: int) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)", str(key))
    if not m:
        return None
    layer, head = int(m.group(1)), int(m.group(2))
    return (layer, head) if layer < L and head < H else None


def _measures(sources: dict, L: int, H: int) -> list[dict]:
    """Every numeric per-head field (top level, or one level down as ``a.b``) as a [L][H] grid."""
    out = []
    for src, data in sources.items():
        per_head = data.get("per_head") or {}
        fields: dict[str, list] = {}
        for hk, d in per_head.items():
            lh = _parse_head(hk, L, H)
            if lh is None or not isinstance(d, dict):
                continue
            flat = {}
            for k, v in d.items():
                if _is_number(v) or isinstance(v, bool):
                    flat[k] = float(v)
                    continue
                own = RECORD_LISTS.get(src) == k  # e.g. sae: [one record per SAE of this layer]
                if own and isinstance(v, list) and v and isinstance(v[0], dict):
                    v = v[0]
                if isinstance(v, dict):
                    for k2, v2 in v.items():
                        if _is_number(v2) or isinstance(v2, bool):
                            flat[k2 if own else f"{k}.{k2}"] = float(v2)
            for k, v in flat.items():
                grid = fields.setdefault(k, [[None] * H for _ in range(L)])
                grid[lh[0]][lh[1]] = float(v)
        for k, grid in fields.items():
            vals = [v for row in grid for v in row if v is not None]
            if not vals:
                continue
            out.append({"id": f"{src}.{k}", "source": src, "key": k, "label": f"{src}: {k.replace('_', ' ')}",
                        "values": grid, "min": min(vals), "max": max(vals)})
    return out


def _tokens_in(obj, out: list, under_token_key: bool = False, depth: int = 0) -> None:
    """Strings found under keys that name tokens (``token``, ``tokens``, ``top_tokens`` ...)."""
    if depth > 8 or len(out) >= SEARCH_PER_HEAD:
        return
    if isinstance(obj, str):
        if under_token_key:
            out.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tokens_in(v, out, under_token_key or "tok" in str(k).lower(), depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _tokens_in(v, out, under_token_key, depth + 1)


def normalize_token(t: str) -> str:
    """Search form of a token: stripped of spaces (and the BPE markers Ġ/▁), lower-cased."""
    return t.replace("Ġ", " ").replace("▁", " ").strip().lower()


def shard_of(norm: str) -> str:
    c = norm[:1]
    return c if re.fullmatch(r"[a-z0-9]", c) else "_"


def _search_index(sources: dict, L: int, H: int) -> dict[str, dict[str, list[str]]]:
    shards: dict[str, dict[str, list[str]]] = {}
    for src, data in sources.items():
        for hk, d in (data.get("per_head") or {}).items():
            if _parse_head(hk, L, H) is None:
                continue
            toks: list[str] = []
            _tokens_in(d, toks)
            for t in dict.fromkeys(normalize_token(t) for t in toks):
                if t:
                    heads = shards.setdefault(shard_of(t), {}).setdefault(t, [])
                    if hk not in heads:
                        heads.append(hk)
    return shards


MAX_DOC_CHARS = 600
"""Most characters of text per searchable head, feature or neuron."""


def _docs(sources: dict, coll_index: list[dict], colls: list, L: int, H: int) -> list[list[str]]:
    """One searchable document per head, SAE feature and neuron: its tokens and explanation texts
    (lower-cased, ≤ MAX_DOC_CHARS), with the atlas link that opens it."""
    docs = []
    for l in range(L):
        for hh in range(H):
            hk = f"{l}.{hh}"
            toks: list[str] = []
            texts: list[str] = []
            lab = None
            for data in sources.values():
                d = (data.get("per_head") or {}).get(hk)
                if d is None:
                    continue
                _tokens_in(d, toks)
                if isinstance(d, dict) and isinstance(d.get("label"), dict):
                    lab = d["label"]
                    texts += [lab.get("label") or "", lab.get("summary") or ""]
                if isinstance(d, dict) and isinstance(d.get("roles"), dict):  # search by role name
                    v = d["roles"]
                    texts += [v.get("text") or ""] + [f"confirmed {r.replace('_', ' ')} {r.replace('_', '-')}"
                                                      for r in v.get("confirmed") or []]
                    lab = lab or {"label": v.get("roles_sentence")}
                for e in (d.get("explanations") or []) if isinstance(d, dict) else []:
                    texts.append(str(e.get("explanation", "")))
            words = " ".join(dict.fromkeys(normalize_token(t) for t in toks if normalize_token(t)))
            text = (" ".join(t for t in texts if t) + " " + words).strip().lower()
            if text:
                title = (isinstance(lab, dict) and lab.get("label")) or ""
                docs.append(["head", hk, f"#/head/{hk}", str(title)[:120], text[:MAX_DOC_CHARS]])
    for ci, (c, (src, key, items)) in enumerate(zip(coll_index, colls)):
        kind = "feature" if src == "sae" and key.startswith("features_") else "neuron" if src == "neurons" else None
        if kind is None:
            continue
        for iid, item in items:
            summ = _summary(item)
            toks = [str(summ.get("fires_on_token", "")), str(item.get("token", ""))]
            toks += [str(t) for t in summ.get("top_logit_tokens", [])] + [str(t) for t in item.get("top_tokens", [])[:6]]
            ex = [str(e.get("explanation", "")) for e in item.get("explanations") or []]
            words = " ".join(dict.fromkeys(normalize_token(t) for t in toks if normalize_token(t)))
            title = (ex[0].splitlines()[0][:120] if ex else "")
            name = f"{key[len('features_'):]} #{iid}" if kind == "feature" else iid
            docs.append([kind, name, f"#/item/{ci}/{iid}", title, (" ".join(ex) + " " + words).strip().lower()[:MAX_DOC_CHARS]])
    return docs


def role_grid(sources: dict, L: int, H: int) -> dict:
    """``{"role_grid": [L][H] the head's strongest confirmed role (or None), "roles": {id: title}}`` from the
    heads source's verdicts; {} when the run has no roles (the grid is then coloured by measures only)."""
    heads = sources.get("heads") or {}
    titles = {rid: r.get("title", rid) for rid, r in (heads.get("roles") or {}).items() if isinstance(r, dict)}
    if not titles:
        return {}
    grid = [[None] * H for _ in range(L)]
    for hk, d in (heads.get("per_head") or {}).items():
        lh = _parse_head(hk, L, H)
        conf = ((d or {}).get("roles") or {}).get("confirmed") if isinstance(d, dict) else None
        if lh is not None and conf:
            grid[lh[0]][lh[1]] = conf[0]
    return {"role_grid": grid, "roles": titles}


def _collections(sources: dict) -> tuple[list[tuple[str, str, list[tuple[str, dict]]]], dict]:
    """Split each source's top-level keys into collections (many items: pages) and small globals."""
    colls, globs = [], {}
    for src, data in sources.items():
        for key, val in data.items():
            if key == "per_head":
                continue
            items = None
            if isinstance(val, dict) and val and all(isinstance(v, dict) for v in val.values()):
                items = [(str(k), v) for k, v in val.items()]
            elif isinstance(val, list) and len(val) > 5 and all(isinstance(v, dict) for v in val):
                items = [(str(v.get("id", i)), v) for i, v in enumerate(val)]
            if items is not None:
                colls.append((src, key, items))
            else:
                globs.setdefault(src, {})[key] = val
    return colls, globs


def _summary(item: dict) -> dict:
    """Scalar fields and short token lists of an item (shown in collection lists and used to sort
    them); an SAE feature also gets its top output tokens and the token it fires on most."""
    out = {k: v for k, v in item.items() if (_is_number(v) or isinstance(v, str) and len(v) <= 80)
           and not isinstance(v, bool)}
    for k, v in item.items():
        if "tok" in k and isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = v[:6]
    logits = item.get("logits")
    if isinstance(logits, dict) and isinstance(logits.get("top"), list):
        out["top_logit_tokens"] = [t[0] for t in logits["top"][:5] if isinstance(t, list) and t]
    expl = item.get("explanations")
    if isinstance(expl, list) and expl and isinstance(expl[0], dict) and expl[0].get("explanation"):
        out["explanation"] = str(expl[0]["explanation"]).strip().splitlines()[0][:80]
    ex = item.get("examples")
    if isinstance(ex, list) and ex and isinstance(ex[0], dict) and "context" in ex[0] and "index" in ex[0]:
        try:
            out["fires_on_token"] = ex[0]["context"][ex[0]["index"]]
        except (IndexError, TypeError):
            pass
    return out


def example_patterns(model, prompts, layers: list[int] | None = None) -> tuple[list[dict], list[dict]]:
    """Attention patterns of every head on each example prompt.

    Returns (examples, per_layer): examples ``[{"text", "tokens": [S]}]`` and per_layer[L] =
    ``[{"prompt": i, "heads": {"<H>": [S][S] rounded to 3 decimals}}]``."""
    from ..capture import capture
    layers = list(range(model.n_layers)) if layers is None else layers
    examples, per_layer = [], [[] for _ in range(model.n_layers)]
    for i, text in enumerate(prompts):
        ids = model.to_tokens(text)[:, :MAX_EXAMPLE_TOKENS]
        cap = capture(model, ids, layers=layers, what={"pattern"})
        examples.append({"text": text, "tokens": model.token_str(ids[0])})
        for layer in layers:
            p = cap["pattern"][layer][0].float().cpu()
            per_layer[layer].append({"prompt": i, "heads": {
                str(h): (torch.round(p[h] * 1000) / 1000).tolist() for h in range(model.n_heads)}})
    return examples, per_layer


def example_readings(model, run_dir: Path, prompts, k: int = 5) -> dict[int, dict[str, list]]:
    """Every head read in context on the example prompts (:func:`headscope.heads.in_context.read_in_context`:
    per position the source it attends to most, the ranks of that token and of the token after it in the
    head's direct logit contribution and lens, its top tokens by that contribution and its lens tokens ranked
    by their KL(lens ‖ null) term): {layer: {"<H>": [{"prompt": i, ...}]}}. Lens fields only when the run
    has lenses (and the null lens: the KL ranking needs it)."""
    from ..heads.in_context import read_in_context
    bank = null = gains = None
    lens = Path(run_dir) / "lens"
    if (lens / "lenses.json").is_file() and (lens / "null.safetensors").is_file():
        try:
            from ..lens.apply import load_gains
            from ..lens.lenses import load_bank
            from ..lens.train import load_null
        except ModuleNotFoundError:
            pass
        else:
            bank = load_bank(model, lens)[0].to(model.device)
            null, gains = load_null(lens), load_gains(lens)
    out: dict[int, dict[str, list]] = {}
    for i, text in enumerate(prompts):
        ids = model.to_tokens(text)[:, :MAX_EXAMPLE_TOKENS]
        for name, rec in read_in_context(model, ids, bank=bank, null=null, gains=gains, k=k).items():
            layer, head = map(int, name.split("."))
            out.setdefault(layer, {}).setdefault(str(head), []).append({"prompt": i, **rec})
    return out


def static_dir() -> Path:
    return Path(str(resources.files("headscope.atlas") / "static"))


def build_atlas(run_dir: Path, model=None, examples: list[str] | tuple[str, ...] | None = DEFAULT_EXAMPLES,
                progress: bool = True) -> dict:
    """Build ``RUN/atlas/`` from whatever the run directory holds; returns a summary
    ``{"index": path of index.html, "sources": [...], "errors": {...}, "n_pages": int}``.

    ``model``: when given (it must be the run's model), the attention patterns of every head on
    ``examples`` are stored for the head pages."""
    from tqdm import tqdm
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise HeadscopeError(f"not a headscope run directory (no run.json): {run_dir}")
    info = read_json(run_dir / "run.json")
    if not isinstance(info, dict) or not isinstance(info.get("model", {}), dict):
        raise HeadscopeError(f"corrupt run directory {run_dir}: run.json is not a headscope run record")
    ident = info.get("model", {})
    final = run_dir / "atlas"
    if final.exists() and not final.is_dir():
        raise HeadscopeError(f"{final} is a file, not the atlas folder: move it away and build again")
    if model is not None:
        model.check_identity(ident, f"run directory {run_dir}")
    try:
        L, H = int(ident["n_layers"]), int(ident["n_heads"])
    except (KeyError, TypeError, ValueError):
        raise HeadscopeError(f"{run_dir}/run.json records no model shape (n_layers, n_heads)") from None
    got = collect(run_dir)
    sources, errors = got["sources"], got["errors"]

    ex_list, ex_layers, ex_lens = [], None, None
    if model is not None and examples:
        ex_list, ex_layers = example_patterns(model, examples)
        ex_lens = example_readings(model, run_dir, examples)  # every head read in context (lens or not)

    with using_run(run_dir):  # a stage starting meanwhile does not take our temporary folder for a leftover
        try:
            return _build(run_dir, final, info, ident, L, H, sources, errors, ex_list, ex_layers, ex_lens, progress)
        except OSError as e:
            raise HeadscopeError(f"cannot write the atlas in {run_dir}: {os_error_text(e)}") from None


def _build(run_dir, final, info, ident, L, H, sources, errors, ex_list, ex_layers, ex_lens, progress) -> dict:
    from tqdm import tqdm
    tmp = Path(tempfile.mkdtemp(prefix=".atlas.tmp.", dir=run_dir))  # unique: concurrent builds do not collide
    os.chmod(tmp, 0o755)  # the served folder is world-readable like any web root (mkdtemp makes it 0700)
    pages = 0

    def write(key: str, data) -> None:
        nonlocal pages
        if not all(SAFE_KEY.match(p) for p in key.split("/")):
            raise HeadscopeError(f"internal: unsafe atlas page key {key!r}")
        path = tmp / "data" / f"{key}.js"  # a plain write (0644 under the usual umask): the whole folder is
        path.parent.mkdir(parents=True, exist_ok=True)  # committed at once by the rename below
        path.write_bytes(page_js(key, data))
        pages += 1

    try:
        shutil.copytree(static_dir(), tmp / "static", ignore=shutil.ignore_patterns("index.html", "__pycache__"))
        shutil.copy2(static_dir() / "index.html", tmp / "index.html")
        bar = tqdm(total=L, desc="atlas: layer pages", unit=" layers", disable=not progress, file=sys.stderr)
        for layer in range(L):
            heads = {}
            for h in range(H):
                hk = f"{layer}.{h}"
                heads[str(h)] = {src: data["per_head"][hk] for src, data in sources.items()
                                 if hk in (data.get("per_head") or {})}
            page = {"layer": layer, "heads": heads}
            if ex_layers is not None:
                page["patterns"] = ex_layers[layer]
            if ex_lens and layer in ex_lens:
                page["in_context"] = ex_lens[layer]
            write(f"layer/{layer}", page)
            bar.update(1)
        bar.close()
        shards = _search_index(sources, L, H)
        for shard, toks in shards.items():
            write(f"search/{shard}", {"tokens": toks})
        colls, globs = _collections(sources)
        coll_index = []
        for src, key, items in colls:
            base = f"c/{_safe(src)}/{_safe(key)}"
            chunks: dict[int, dict] = {}
            id_to_chunk = {}
            for i, (iid, item) in enumerate(items):
                chunks.setdefault(i // CHUNK, {})[iid] = item
                id_to_chunk[iid] = i // CHUNK
            for c, chunk in chunks.items():
                write(f"{base}/{c}", {"items": chunk})
            write(f"{base}/ids", {"ids": [iid for iid, _ in items],
                                  "summary": [[iid, _summary(item)] for iid, item in items]})
            coll_index.append({"source": src, "key": key, "base": base, "n": len(items), "chunk": CHUNK})
        write("search/docs", {"docs": _docs(sources, coll_index, colls, L, H)})
        index = {
            "version": 1, "built": time.time(), "model": ident, "n_layers": L, "n_heads": H,
            "sources": list(sources), "errors": errors,
            "measures": _measures(sources, L, H),
            "highlights": [x for x in highlights(sources, H, load_neuron_ablation(run_dir))
                           if _parse_head(x["head"], L, H) is not None],  # only heads this model has
            **role_grid(sources, L, H),
            "globals": globs, "collections": coll_index,
            "search_shards": sorted(shards), "search_docs": True, "examples": ex_list,
            "stages": {k: {kk: vv for kk, vv in v.items() if _is_number(vv) or isinstance(vv, str)}
                       for k, v in (info.get("stages") or {}).items() if isinstance(v, dict)},
        }
        write("index", clean(index))
        lock = os.open(run_dir, os.O_RDONLY)  # one swap at a time (concurrent builds): flock the run folder
        old = None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=".atlas.old.", dir=run_dir))  # empty: the rename replaces it
                os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                if old is not None:  # put the previous atlas back
                    os.replace(old, final)
                    old = None
                raise
        finally:
            os.close(lock)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"index": str(final / "index.html"), "sources": list(sources), "errors": errors, "n_pages": pages}

