"""Feature dashboards as data, stored in the run directory for the atlas: ``run_dashboards(model, run, opts)``.

For every feature that fires on the held-out tokens scanned (``n_tokens // seq_len`` held-out sequences
drawn by the shared sampler, :mod:`headscope.sampling`, so spread over the split's documents), one record:

* ``density``: firing frequency; ``max_act``; ``head_attribution``: [H] weight attribution;
* ``examples``: the ``n_examples`` max-activating tokens, each with ``seq``, ``pos``, ``doc`` (its held-out
  document), ``context`` (token strings from
  ``ctx_left`` before to ``ctx_right`` after), the index of the activating token in it, and the feature's
  activation on every context token;
* ``quantiles``: a uniform random sample (``n_samples``) of the tokens where it fires, grouped in four
  bins by activation relative to ``max_act`` (0–25 %, 25–50 %, 50–75 %, 75–100 %), each with context;
* ``logits``: top and bottom 10 tokens of W_dec[f]·W_O·diag(γ_final)·W_Uᵀ;
* ``dfa``: for the top example, the source tokens with the largest |DFA| (summed over heads) and the
  DFA summed per head (see :mod:`.attribution`).

Files: ``sae/<name>/dashboards/index.json`` ({layer, n_features, alive, page_size, pages, n_tokens})
and ``sae/<name>/dashboards/page_{i:03d}.json`` ({"features": {f: record}}), ``page_size`` features per page;
the index also records ``n_sequences`` and ``n_documents`` scanned.

**One forward pass.** The scan over the held-out sequences (eager attention, so that the SAE layer's
pattern is formed) keeps, per sequence that still holds an example, a sample or a top example, its
SAE activations (sparse: the nonzero (position·F + feature, value) pairs) and, for the sequences of
top examples, the pattern and values of the SAE layer for DFA; sequences that no longer hold any are
dropped after each batch (a later batch can never bring them back). When what is kept exceeds
``cache_bytes`` (256 MiB) it is let go and a second pass over the sequences the pages need recomputes
the same tensors (same batches, same calls: the pages are the same either way).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

import torch

from ..capture import capture, eager_attention
from ..data import TokenCorpus
from ..models.load import Model
from ..runs import RunDir, atomic_write_bytes, read_json, write_json
from ..sampling import Windows
from .attribution import dfa_from_capture, output_tokens, weight_attribution
from .io import load_sae
from .model import AttnSAE
from .options import DashboardOptions
from .train import sae_dir

CACHE_BYTES = 256 * 2 ** 20
"""Default memory bound of what the scan keeps for the pages (beyond it: a second forward pass)."""


@dataclass
class _Kept:
    """What the pages need from one scanned sequence: its SAE activations as the nonzero entries of
    the [S, F] matrix (``flat`` = position·F + feature, ``vals``) and, while the sequence holds some
    feature's top example, the SAE layer's ``pattern`` [1, H, S, S] and ``v`` [1, S, Hkv, Dh]."""

    flat: torch.Tensor
    vals: torch.Tensor
    pattern: torch.Tensor | None
    v: torch.Tensor | None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.flat, self.vals, self.pattern, self.v) if t is not None)

    def dense(self, S: int, F: int) -> torch.Tensor:
        """The activations [S, F]."""
        out = torch.zeros(S * F, dtype=self.vals.dtype)
        out[self.flat] = self.vals
        return out.reshape(S, F)


@dataclass
class _Scan:
    """Streaming statistics of the scan: per feature the top ``n_examples`` activations and their global
    token index (sequence·S + position), a uniform sample (random keys ``smp_k``, −1 where empty), the
    firing ``counts``, the rows scanned; ``kept``: what :class:`_Kept` holds per sequence (None when the
    memory bound was exceeded)."""

    top_v: torch.Tensor
    top_i: torch.Tensor
    smp_k: torch.Tensor
    smp_v: torch.Tensor
    smp_i: torch.Tensor
    counts: torch.Tensor
    n_rows: int
    kept: dict[int, _Kept] | None = field(default=None)
    n_sequences: int = 0
    n_documents: int = 0


def _encode_seqs(sae: AttnSAE, z: torch.Tensor) -> torch.Tensor:
    """SAE activations [B, S, F] of z [B, S, H, Dh]; position 0 (BOS, not modelled) set to 0. The scan
    and the second pass call this on the same batches, so both get the same numbers."""
    B, S = z.shape[:2]
    acts = sae.encode(z.reshape(B * S, -1).float()).reshape(B, S, -1)
    acts[:, 0] = 0.0
    return acts


def _seqs_in_use(S: int, top_v, top_i, smp_k, smp_i) -> tuple[set[int], set[int]]:
    """(sequences holding an example or a sample of some feature, sequences holding a top example)."""
    ex = torch.cat([top_i[top_v > 0], smp_i[smp_k >= 0]]) // S
    top = top_i[:, 0][top_v[:, 0] > 0] // S
    return set(ex.unique().tolist()), set(top.unique().tolist())


@torch.no_grad()
def _scan(model: Model, sae: AttnSAE, corpus: TokenCorpus, n_tokens: int, batch_size: int, n_examples: int,
          n_samples: int, progress: bool, seed: int = 0, cache_bytes: int = CACHE_BYTES) -> _Scan:
    """Streaming top-k and random sample per feature over held-out tokens (positions ≥ 1), keeping
    what the pages need from each sequence within ``cache_bytes`` (module docstring)."""
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
    kept: dict[int, _Kept] | None = {} if cache_bytes > 0 else None
    n_rows = 0
    plan = Windows(corpus, "heldout", seed)
    n_seq = min(len(plan), max(1, n_tokens // S))
    batches = tqdm(plan.batches(batch_size, n_seq), total=math.ceil(n_seq / batch_size), file=sys.stderr,
                   desc="feature dashboards", disable=not progress, unit=" batch")
    for k, (ids, _) in enumerate(batches):
        B = ids.shape[0]
        seq_ids = [int(x) for x in plan.seqs[k * batch_size:k * batch_size + B]]
        # eager attention even when only z is read: z is then the same as in the second pass
        with eager_attention(model):
            cap = capture(model, ids.to(dev), layers=[L], what=("z", "pattern", "v") if kept is not None else ("z",),
                          stop_after=L)
        acts_seq = _encode_seqs(sae, cap["z"][L])                            # [B, S, F]
        acts = acts_seq[:, 1:].reshape(-1, F)                                 # [B·(S−1), F]
        pos = torch.arange(1, S, device=dev).repeat(B)
        seq = torch.tensor(seq_ids, device=dev).repeat_interleave(S - 1)
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
        if kept is not None:
            for j in range(B):
                a = acts_seq[j].flatten()
                nz = a.nonzero().flatten()
                kept[seq_ids[j]] = _Kept(nz.cpu(), a[nz].cpu(), cap["pattern"][L][j:j + 1].to("cpu", copy=True),
                                       cap["v"][L][j:j + 1].to("cpu", copy=True))
            in_use, tops = _seqs_in_use(S, top_v, top_i, smp_k, smp_i)
            for s in list(kept):
                if s not in in_use:
                    del kept[s]
                elif s not in tops:
                    kept[s].pattern = kept[s].v = None
            if sum(x.nbytes() for x in kept.values()) > cache_bytes:
                kept = None                                                   # over the bound: second pass
    return _Scan(top_v.cpu(), top_i.cpu(), smp_k.cpu(), smp_v.cpu(), smp_i.cpu(), counts.cpu(), n_rows, kept,
                 n_seq, plan.n_documents(n_seq))


def _second_pass(model: Model, sae: AttnSAE, corpus: TokenCorpus, order: list[int], batch_size: int):
    """Yield (sequence, token ids, activations [S, F], pattern [1, H, S, S], v [1, S, Hkv, Dh]) for the
    sequences ``order``, recomputed in batches of ``batch_size`` (when the scan kept nothing)."""
    L = sae.cfg.layer
    for b in range(0, len(order), batch_size):
        seqs = order[b:b + batch_size]
        ids = torch.stack([corpus.sequence("heldout", s) for s in seqs]).to(model.device)
        cap = capture(model, ids, layers=[L], what=("z", "pattern", "v"), stop_after=L)   # eager (pattern)
        acts_b = _encode_seqs(sae, cap["z"][L]).cpu()
        for j, s in enumerate(seqs):
            yield s, ids[j].tolist(), acts_b[j], cap["pattern"][L][j:j + 1], cap["v"][L][j:j + 1]


def _from_kept(kept: dict[int, _Kept], corpus: TokenCorpus, order: list[int], S: int, F: int):
    """As :func:`_second_pass`, from what the scan kept."""
    for s in order:
        k = kept[s]
        yield s, corpus.sequence("heldout", s).tolist(), k.dense(S, F), k.pattern, k.v


def _windows(acts: torch.Tensor, wanted: list[tuple[int, int]], ctx_left: int, ctx_right: int) -> list[list[float]]:
    """For each (feature f, position p) in ``wanted``: f's activations (rounded to 3 decimals) on the
    context positions [p − ctx_left, p + ctx_right] ∩ [0, S) of ``acts`` [S, F]."""
    S = acts.shape[0]
    f = torch.tensor([w[0] for w in wanted])
    p = torch.tensor([w[1] for w in wanted])
    pos = (p[:, None] + torch.arange(-ctx_left, ctx_right + 1)).clamp(0, S - 1)
    rows = acts[pos, f[:, None]].tolist()                                      # [n, ctx_left + 1 + ctx_right]
    out = []
    for (_, pi), row in zip(wanted, rows):
        lo, hi = max(0, pi - ctx_left), min(S, pi + ctx_right + 1)
        out.append([round(a, 3) for a in row[lo - pi + ctx_left:hi - pi + ctx_left]])
    return out


def _dfa_records(model: Model, sae: AttnSAE, pattern: torch.Tensor, v: torch.Tensor, feats: list[int],
                 dests: list[int], tokens: list[str]) -> dict[int, dict]:
    """The ``dfa`` record of each feature in ``feats`` at its destination position in ``dests``, from the
    sequence's pattern [1, H, S, S] and v [1, S, Hkv, Dh] at the SAE layer."""
    pat, proj = dfa_from_capture(model, sae, pattern, v, feats)
    out = {}
    for k, (f, t) in enumerate(zip(feats, dests)):
        d = (pat[0, :, t, :] * proj[0, :, :, k].T).cpu()                      # [H, S]
        per_src = d.sum(0)
        top_src = per_src.abs().topk(min(8, t + 1)).indices.tolist()
        vals = per_src.tolist()
        out[f] = {"dest": t, "sources": [{"pos": p, "token": tokens[p], "dfa": round(vals[p], 4)} for p in top_src],
                  "per_head": [round(x, 4) for x in d.sum(1).tolist()]}
    return out


def _write_page(path, obj) -> None:
    """A page as compact JSON (the C encoder: indented JSON goes through Python's slow one)."""
    atomic_write_bytes(path, (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode())


@torch.no_grad()
def run_dashboards(model: Model, run: RunDir, opts: DashboardOptions, progress: bool = True, *,
                   n_samples: int = 20, ctx_left: int = 12, ctx_right: int = 4, page_size: int = 128,
                   cache_bytes: int = CACHE_BYTES) -> dict:
    """Build the dashboards of SAE ``opts.name`` (see module docstring); returns the index dict.
    Keywords the CLI and the study leave at their defaults (tests set them): ``n_samples`` random activating
    examples per feature for the quantiles, ``ctx_left``/``ctx_right`` context tokens per example,
    ``page_size`` features per page; ``cache_bytes``: memory bound of what the scan keeps (0: always a
    second forward pass)."""
    name = opts.name
    folder = sae_dir(run, name)
    sae = load_sae(folder, model).to(model.device)
    tj = folder / "train.json"
    cfg = read_json(tj)["config"] if tj.is_file() else {}
    tc = TokenCorpus(model, opts.corpus or cfg.get("corpus", "default"),
                     seq_len=cfg.get("seq_len", sae.cfg.context_size))
    S, F = tc.seq_len, sae.cfg.d_sae
    scan = _scan(model, sae, tc, opts.n_tokens, opts.batch_size, opts.n_examples, n_samples, progress,
                 cache_bytes=cache_bytes)
    alive = (scan.counts > 0).nonzero().flatten().tolist()
    w = weight_attribution(sae).cpu().tolist()
    logits = output_tokens(model, sae, alive)
    top_v, top_i = scan.top_v.tolist(), scan.top_i.tolist()
    smp_k, smp_v, smp_i = scan.smp_k.tolist(), scan.smp_v.tolist(), scan.smp_i.tolist()
    counts = scan.counts.tolist()
    # per sequence: the (feature, position) of every example and sample in it, and the features whose
    # top example (the DFA's destination) it holds
    wanted: dict[int, dict[tuple[int, int], None]] = {}
    for f in alive:
        for gi in [gi for v, gi in zip(top_v[f], top_i[f]) if v > 0] + \
                  [gi for k, gi in zip(smp_k[f], smp_i[f]) if k >= 0]:
            s, p = divmod(gi, S)
            wanted.setdefault(s, {})[(f, p)] = None
    by_seq: dict[int, list[int]] = {}
    for f in alive:
        by_seq.setdefault(top_i[f][0] // S, []).append(f)
    order = sorted(set(wanted) | set(by_seq))
    seqs = _from_kept(scan.kept, tc, order, S, F) if scan.kept is not None else \
        _second_pass(model, sae, tc, order, opts.batch_size)
    seq_tokens: dict[int, list[str]] = {}
    ctx_acts: dict[tuple[int, int], list[float]] = {}                          # (feature, global index) → acts
    dfa_rec: dict[int, dict] = {}
    for s, ids, acts, pattern, v in seqs:
        seq_tokens[s] = model.token_str(ids)
        want = list(wanted.get(s, ()))
        for (f, p), row in zip(want, _windows(acts, want, ctx_left, ctx_right) if want else []):
            ctx_acts[(f, s * S + p)] = row
        feats = by_seq.get(s)
        if feats:
            dfa_rec.update(_dfa_records(model, sae, pattern, v, feats, [top_i[f][0] % S for f in feats],
                                        seq_tokens[s]))

    def example(f: int, gi: int, act: float) -> dict:
        s, p = divmod(gi, S)
        lo, hi = max(0, p - ctx_left), min(S, p + ctx_right + 1)
        return {"seq": s, "pos": p, "doc": doc_of[gi], "act": round(act, 4), "context": seq_tokens[s][lo:hi],
                "index": p - lo, "acts": ctx_acts[(f, gi)]}
    every = sorted({gi for f in alive for gi in [gi for v, gi in zip(top_v[f], top_i[f]) if v > 0] +
                    [gi for k, gi in zip(smp_k[f], smp_i[f]) if k >= 0]})
    # the document of each activating token: position p ≥ 1 of sequence s is stream offset s·(S − 1) + p − 1
    doc_of = dict(zip(every, tc.document_of("heldout", [(gi // S) * (S - 1) + gi % S - 1 for gi in every]).tolist())) \
        if every else {}
    records = {}
    for f in alive:
        mx = top_v[f][0]
        ex = [example(f, gi, v) for v, gi in zip(top_v[f], top_i[f]) if v > 0]
        samp = [(v, gi) for k, v, gi in zip(smp_k[f], smp_v[f], smp_i[f]) if k >= 0]
        bins = [[] for _ in range(4)]
        for v, gi in sorted(samp, reverse=True):
            bins[min(3, int(4 * v / mx)) if mx > 0 else 0].append(example(f, gi, v))
        records[f] = {
            "feature": f, "density": float(counts[f]) / max(1, scan.n_rows), "max_act": round(mx, 4),
            "head_attribution": [round(x, 4) for x in w[f]],
            "examples": ex,
            "quantiles": [{"range": [q / 4, (q + 1) / 4], "examples": bins[q]} for q in range(4)],
            "logits": {"top": logits[f]["top"], "bottom": logits[f]["bottom"]},
            "dfa": dfa_rec.get(f),
        }
    pages = [alive[i:i + page_size] for i in range(0, len(alive), page_size)]
    for pi, page in enumerate(pages):
        _write_page(folder / f"dashboards/page_{pi:03d}.json", {"features": {str(f): records[f] for f in page}})
    index = {"name": name, "layer": sae.cfg.layer, "n_features": sae.cfg.d_sae, "alive": len(alive),
             "n_tokens": scan.n_rows, "n_sequences": scan.n_sequences, "n_documents": scan.n_documents,
             "page_size": page_size, "pages": len(pages),
             "feature_page": {str(f): pi for pi, page in enumerate(pages) for f in page}}
    write_json(folder / "dashboards/index.json", index)
    return index
