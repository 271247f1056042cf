"""Feature dashboards as data, stored in the run directory for the atlas: ``run_dashboards(model, run, name)``.

For every feature that fires on the held-out tokens scanned (``n_tokens``), one record:

* ``density``: firing frequency; ``max_act``; ``head_attribution``: [H] weight attribution;
* ``examples``: the ``n_examples`` max-activating tokens, each with ``context`` (token strings from
  ``ctx_left`` before to ``ctx_right`` after), the index of the activating token in it, and the feature's
  activation on every context token;
* ``quantiles``: a uniform random sample (``n_samples``) of the tokens where it fires, grouped in four
  bins by activation relative to ``max_act`` (0–25 %, 25–50 %, 50–75 %, 75–100 %), each with context;
* ``logits``: top and bottom 10 tokens of W_dec[f]·W_O·diag(γ_final)·W_Uᵀ;
* ``dfa``: for the top example, the source tokens with the largest |DFA| (summed over heads) and the
  DFA summed per head (see :mod:`.attribution`).

Files: ``sae/<name>/dashboards/index.json`` ({layer, n_features, alive, page_size, pages, n_tokens})
and ``sae/<name>/dashboards/page_{i:03d}.json`` ({"features": {f: record}}), ``page_size`` features per page.
"""

from __future__ import annotations

import math
import sys

import torch

from ..capture import capture
from ..data import TokenCorpus
from ..models.load import Model
from ..runs import RunDir, read_json, write_json
from .attribution import dfa_from_capture, output_tokens, weight_attribution
from .io import load_sae
from .model import AttnSAE
from .train import sae_dir


@torch.no_grad()
def _scan(model: Model, sae: AttnSAE, corpus: TokenCorpus, n_tokens: int, batch_size: int, n_examples: int,
          n_samples: int, progress: bool, seed: int = 0):
    """Streaming top-k and random sample per feature over held-out tokens (positions ≥ 1)."""
    from tqdm import tqdm
    L, F, S = sae.cfg.layer, sae.cfg.d_sae, corpus.seq_len
    dev = model.device
    top_v = torch.full((F, n_examples), -1.0, device=dev)
    top_i = torch.full((F, n_examples), -1, dtype=torch.long, device=dev)
    smp_k = torch.full((F, n_samples), -1.0, device=dev)
    smp_v = torch.zeros((F, n_samples), device=dev)
    smp_i = torch.full((F, n_samples), -1, dtype=torch.long, device=dev)
    counts = torch.zeros(F, dtype=torch.long, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    n_rows, seq0 = 0, 0
    total = math.ceil(min(n_tokens, corpus.n_sequences("heldout") * S) / (S * batch_size))
    for ids in tqdm(corpus.batches("heldout", batch_size, max_tokens=n_tokens), total=total, file=sys.stderr,
                    desc="feature dashboards", disable=not progress, unit=" batch"):
        B = ids.shape[0]
        z = capture(model, ids.to(dev), layers=[L], what=("z",), stop_after=L)["z"][L][:, 1:]
        acts = sae.encode(z.reshape(-1, sae.cfg.d_in).float())               # [B·(S−1), F]
        pos = torch.arange(1, S, device=dev).repeat(B)
        seq = torch.arange(seq0, seq0 + B, device=dev).repeat_interleave(S - 1)
        gidx = seq * S + pos
        counts += (acts > 0).sum(0)
        v, i = torch.cat([top_v, acts.T], 1).topk(n_examples, dim=1)
        top_i = torch.cat([top_i, gidx.expand(F, -1)], 1).gather(1, i)
        top_v = v
        keys = torch.rand(acts.shape, generator=g, device=dev).masked_fill(acts <= 0, -1.0).T
        k, i = torch.cat([smp_k, keys], 1).topk(n_samples, dim=1)
        smp_v = torch.cat([smp_v, acts.T], 1).gather(1, i)
        smp_i = torch.cat([smp_i, gidx.expand(F, -1)], 1).gather(1, i)
        smp_k = k
        n_rows += acts.shape[0]
        seq0 += B
    return top_v.cpu(), top_i.cpu(), smp_k.cpu(), smp_v.cpu(), smp_i.cpu(), counts.cpu(), n_rows


@torch.no_grad()
def run_dashboards(model: Model, run: RunDir, name: str, *, n_tokens: int = 16384, batch_size: int = 8,
                   n_examples: int = 10, n_samples: int = 20, ctx_left: int = 12, ctx_right: int = 4,
                   page_size: int = 128, corpus: str | None = None, progress: bool = True) -> dict:
    """Build the dashboards of SAE ``name`` (see module docstring); returns the index dict."""
    folder = sae_dir(run, name)
    stage = f"sae/{name}/dashboards"
    sae = load_sae(folder, model).to(model.device)
    tj = folder / "train.json"
    cfg = read_json(tj)["config"] if tj.is_file() else {}
    tc = TokenCorpus(model, corpus or cfg.get("corpus", "default"), seq_len=cfg.get("seq_len", sae.cfg.context_size))
    S = tc.seq_len
    top_v, top_i, smp_k, smp_v, smp_i, counts, n_rows = _scan(model, sae, tc, n_tokens, batch_size, n_examples,
                                                              n_samples, progress)
    alive = (counts > 0).nonzero().flatten().tolist()
    w = weight_attribution(sae).cpu()
    logits = output_tokens(model, sae, alive)
    # every sequence an example or a DFA comes from: one batched forward pass to the SAE's layer gives
    # its activations (encoded once) and, for the sequences of top examples, the DFA inputs
    need: dict[int, set[int]] = {}
    for f in alive:
        for gi in list(top_i[f][top_v[f] > 0]) + list(smp_i[f][smp_k[f] > 0]):
            need.setdefault(int(gi) // S, set()).add(f)
    by_seq: dict[int, list[int]] = {}   # DFA of each feature's top example, grouped by sequence
    for f in alive:
        by_seq.setdefault(int(top_i[f][0]) // S, []).append(f)
    seq_acts: dict[int, dict[int, torch.Tensor]] = {}
    seq_tokens: dict[int, list[str]] = {}
    dfa_rec: dict[int, dict] = {}
    L = sae.cfg.layer
    order = sorted(set(need) | set(by_seq))
    for b in range(0, len(order), batch_size):
        seqs = order[b:b + batch_size]
        ids = torch.stack([tc.sequence("heldout", s) for s in seqs]).to(model.device)
        cap = capture(model, ids, layers=[L], what=("z", "pattern", "v"), stop_after=L)
        acts_b = sae.encode(cap["z"][L].reshape(len(seqs) * S, -1).float()).reshape(len(seqs), S, -1).cpu()
        for j, s in enumerate(seqs):
            seq_tokens[s] = model.token_str(ids[j].tolist())
            acts = acts_b[j]
            acts[0] = 0.0  # BOS: not modelled
            seq_acts[s] = {f: acts[:, f] for f in need.get(s, ())}
            feats = by_seq.get(s)
            if not feats:
                continue
            pat, proj = dfa_from_capture(model, sae, cap["pattern"][L][j:j + 1], cap["v"][L][j:j + 1], feats)
            for k, f in enumerate(feats):
                t = int(top_i[f][0]) % S
                d = (pat[0, :, t, :] * proj[0, :, :, k].T).cpu()                  # [H, S]
                per_src = d.sum(0)
                top_src = per_src.abs().topk(min(8, t + 1)).indices.tolist()
                dfa_rec[f] = {"dest": t, "sources": [{"pos": int(p), "token": seq_tokens[s][p],
                                                      "dfa": round(float(per_src[p]), 4)} for p in top_src],
                              "per_head": [round(float(x), 4) for x in d.sum(1)]}

    def example(f: int, gi: int, act: float) -> dict:
        s, p = divmod(int(gi), S)
        lo, hi = max(0, p - ctx_left), min(S, p + ctx_right + 1)
        return {"seq": s, "pos": p, "act": round(float(act), 4), "context": seq_tokens[s][lo:hi],
                "index": p - lo, "acts": [round(float(a), 3) for a in seq_acts[s][f][lo:hi]]}
    records = {}
    for f in alive:
        mx = float(top_v[f][0])
        ex = [example(f, gi, v) for v, gi in zip(top_v[f], top_i[f]) if v > 0]
        samp = [(float(v), int(gi)) for k, v, gi in zip(smp_k[f], smp_v[f], smp_i[f]) if k >= 0]
        bins = [[] for _ in range(4)]
        for v, gi in sorted(samp, reverse=True):
            bins[min(3, int(4 * v / mx)) if mx > 0 else 0].append(example(f, gi, v))
        records[f] = {
            "feature": f, "density": float(counts[f]) / max(1, n_rows), "max_act": round(mx, 4),
            "head_attribution": [round(float(x), 4) for x in w[f]],
            "examples": ex,
            "quantiles": [{"range": [q / 4, (q + 1) / 4], "examples": bins[q]} for q in range(4)],
            "logits": {"top": logits[f]["top"], "bottom": logits[f]["bottom"]},
            "dfa": dfa_rec.get(f),
        }
    pages = [alive[i:i + page_size] for i in range(0, len(alive), page_size)]
    for pi, page in enumerate(pages):
        write_json(folder / f"dashboards/page_{pi:03d}.json", {"features": {str(f): records[f] for f in page}})
    index = {"name": name, "layer": sae.cfg.layer, "n_features": sae.cfg.d_sae, "alive": len(alive),
             "n_tokens": n_rows, "page_size": page_size, "pages": len(pages),
             "feature_page": {str(f): pi for pi, page in enumerate(pages) for f in page}}
    write_json(folder / "dashboards/index.json", index)
    return index
