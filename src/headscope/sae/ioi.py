"""IOI worked example (Wang et al. 2022; Kissane et al. §4): which SAE features at the second-subject
(S2) position matter for the indirect-object logit difference.

Prompts come from templates in two orders, ABBA ("When Mary and John went to the store, John gave a
drink to") and BABA ("When John and Mary went to the store, John gave a drink to"), with names that
are single tokens (with a leading space) of the model's tokenizer. Metric: logit difference
``logit(IO) − logit(S)`` at the last position. For each feature live at S2 in any prompt, the feature
is zero-ablated at S2 only — z[S2] ← z[S2] − f(z[S2]) · W_dec[f] (the SAE's error term is kept, so
nothing but that feature changes) — and the change of the mean logit difference is recorded.
"""

from __future__ import annotations

import random
import sys

import torch

from ..capture import HeadIntervention, capture
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, write_json
from .attribution import weight_attribution
from .io import load_sae
from .options import IoiOptions
from .train import sae_dir

TEMPLATES = (
    "When {A} and {B} went to the store, {C} gave a drink to",
    "When {A} and {B} went to the park, {C} gave a ball to",
    "After {A} and {B} went to the office, {C} gave a letter to",
    "While {A} and {B} were working at the school, {C} gave a book to",
    "Then, {A} and {B} had a long argument, and afterwards {C} said to",
    "When {A} and {B} got a snack at the cafe, {C} decided to give it to",
)
NAMES = ("Mary", "John", "Tom", "James", "Anna", "Paul", "Lisa", "Mark", "Sarah", "David", "Emma", "Peter",
         "Alice", "Bob", "Kate", "Daniel", "Laura", "Michael", "Jessica", "Chris")


def single_token_names(model: Model) -> list[str]:
    """Names that are one token with a leading space in the model's tokenizer."""
    out = [n for n in NAMES if len(model.tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1]
    if len(out) < 2:
        raise HeadscopeError(f"fewer than two single-token names in {model.name}'s tokenizer: cannot build IOI prompts")
    return out


def ioi_prompts(model: Model, n: int = 100, seed: int = 0) -> list[dict]:
    """``n`` prompts (half ABBA, half BABA): dicts with text, io, s, order, template."""
    names = single_token_names(model)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = TEMPLATES[i % len(TEMPLATES)]
        io, s = rng.sample(names, 2)
        order = "ABBA" if i % 2 == 0 else "BABA"
        a, b = (io, s) if order == "ABBA" else (s, io)
        out.append({"text": t.format(A=a, B=b, C=s), "io": io, "s": s, "order": order, "template": i % len(TEMPLATES)})
    return out


def _s2_position(model: Model, ids: list[int], s_id: int) -> int:
    pos = [i for i, t in enumerate(ids) if t == s_id]
    if len(pos) < 2:
        raise HeadscopeError("IOI prompt without two occurrences of the subject token")
    return pos[1]


@torch.no_grad()
def run_ioi(model: Model, run: RunDir, opts: IoiOptions, progress: bool = True, *, top: int = 20) -> dict:
    """The IOI example on SAE ``opts.name``; writes ``sae/<name>/ioi.json`` and returns it.

    ``opts.max_features``: ablate only the live features with the largest mean activation at S2 (default:
    all); ``top``: features listed in the result."""
    from tqdm import tqdm
    name, n_prompts, seed, max_features = opts.name, opts.n_prompts, opts.seed, opts.max_features
    sae = load_sae(sae_dir(run, name), model).to(model.device)
    L = sae.cfg.layer
    prompts = ioi_prompts(model, n_prompts, seed)
    tok = model.tokenizer
    rows, s2, io_ids, s_ids = [], [], [], []
    for p in prompts:
        ids = [model.bos_id] + tok(p["text"], add_special_tokens=False)["input_ids"]
        io_ids.append(tok(" " + p["io"], add_special_tokens=False)["input_ids"][0])
        s_ids.append(tok(" " + p["s"], add_special_tokens=False)["input_ids"][0])
        s2.append(_s2_position(model, ids, s_ids[-1]))
        rows.append(ids)
    # batch prompts by length (templates differ in length)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r), []).append(i)

    # z and feature activations at S2
    z_s2, zs, hs = {}, {}, {}
    for n_tok, idx in groups.items():
        ids = torch.tensor([rows[i] for i in idx], device=model.device)
        cap = capture(model, ids, layers=[L], what=("z", "resid_pre"), stop_after=L)
        z = cap["z"][L]
        zs[n_tok], hs[n_tok] = z, cap["resid_pre"][L]   # the variant passes resume at L from this stream
        for j, i in enumerate(idx):
            z_s2[i] = z[j, s2[i]].reshape(-1).float()
    X = torch.stack([z_s2[i] for i in range(len(rows))])
    acts = sae.encode(X)                                                       # [P, F]
    live = (acts > 0).any(0).nonzero().flatten()
    if max_features is not None and live.numel() > max_features:
        live = live[acts[:, live].mean(0).topk(max_features).indices]
    live = live.tolist()

    # the variants of z: clean (patched with itself), the SAE reconstruction spliced in at S2 (how much
    # of the logit difference the SAE keeps), and each live feature's contribution removed at S2
    def variant(v, idx, z):
        z = z.clone()
        for j, i in enumerate(idx):
            if v == "spliced":
                z[j, s2[i]] = sae.decode(acts[i:i + 1])[0].reshape(z.shape[2:]).to(z.dtype)
            elif v != "clean":
                z[j, s2[i]] -= (acts[i, v] * sae.W_dec[v]).reshape(z.shape[2:]).to(z.dtype)
        return z
    variants = ["clean", "spliced"] + live
    diffs = torch.zeros(len(variants), len(rows))   # [variant, prompt] logit(IO) − logit(S) at the end
    io_t, s_t = torch.tensor(io_ids), torch.tensor(s_ids)
    per_pass = max(1, 64 // max(len(idx) for idx in groups.values()))   # variants per forward pass
    bar = tqdm(total=len(variants) * len(groups), desc=f"IOI: ablating {len(live)} live features", file=sys.stderr,
               disable=not progress)
    for n_tok, idx in groups.items():   # every variant of a length group in a few batched passes
        ids = torch.tensor([rows[i] for i in idx], device=model.device)
        for v0 in range(0, len(variants), per_pass):
            vs = variants[v0:v0 + per_pass]
            value = torch.cat([variant(v, idx, zs[n_tok]) for v in vs])
            rep = ids.repeat(len(vs), 1)
            lg = capture(model, rep, layers=[], what=("logits",), resume=(L, hs[n_tok].repeat(len(vs), 1, 1)),
                         logit_positions=torch.full((rep.shape[0],), n_tok - 1),
                         interventions=[HeadIntervention(L, kind="patch", value=value)]).logits[:, -1].float().cpu()
            lg = lg.view(len(vs), len(idx), -1)
            ar = torch.arange(len(idx))
            ii = torch.tensor(idx)
            diffs[v0:v0 + len(vs), ii] = lg[:, ar, io_t[ii]] - lg[:, ar, s_t[ii]]
            bar.update(len(vs))
    bar.close()
    clean, spliced = diffs[0], diffs[1]
    w = weight_attribution(sae).cpu()
    order = torch.tensor([p["order"] == "ABBA" for p in prompts])
    effects = []
    for vi, f in enumerate(live):
        d = diffs[2 + vi] - clean
        effects.append({"feature": f, "delta_logit_diff": float(d.mean()), "delta_abba": float(d[order].mean()),
                        "delta_baba": float(d[~order].mean()), "frac_prompts_active": float((acts[:, f] > 0).float().mean()),
                        "mean_act": float(acts[:, f].mean()), "top_heads": [int(h) for h in w[f].topk(min(3, w.shape[1])).indices],
                        "head_attribution": [round(float(x), 4) for x in w[f]]})
    effects.sort(key=lambda e: e["delta_logit_diff"])
    res = {"name": name, "layer": L, "n_prompts": len(prompts), "position": "S2",
           "logit_diff_clean": float(clean.mean()), "logit_diff_clean_abba": float(clean[order].mean()),
           "logit_diff_clean_baba": float(clean[~order].mean()), "logit_diff_sae_spliced_at_s2": float(spliced.mean()),
           "frac_prompts_io_preferred": float((clean > 0).float().mean()), "n_live_features": len(live),
           "features": effects[:top] + [e for e in effects[top:] if e["delta_logit_diff"] > 0][-top:],
           "examples": [p["text"] for p in prompts[:4]]}
    write_json(sae_dir(run, name) / "ioi.json", res)
    return res
