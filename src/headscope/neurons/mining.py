"""Step 2 (``mine``): max-activating prompts per neuron, one forward pass over the corpus for all neurons.

The sequences read are the first ``max_tokens // seq_len`` of the shared sampler's seeded plan
(:mod:`headscope.sampling`: a uniform sample of the split's sequences, spread over its documents; the
state records how many ``documents`` it drew from). For each packed corpus sequence (which starts with
BOS) and each selected neuron we keep the maximum
activation over positions ≥ 1 (one maximum per sequence, as the reference keeps one per document),
and a running top-k over sequences per neuron — vectorised over neurons, [k, N] state. Activations are
the neuron activations (the input of W_out, ``mlp_post``).

A prompt ends at the activating token. Trimming: the prompt ``[BOS] + seq[s : pos + 1]`` with the
shortest suffix whose activation is still ≥ ``keep`` × the full-context activation, found for all
prompts at once (one batched forward pass per search step): galloping from the short end (suffix
lengths 1, 2, 4, …) to the first length that keeps enough, then bisection between it and the last
length that did not — so one token shorter than the result always loses too much, and the cost is a
few times the *trimmed* length (the reference bisects from the full length).
Prompts longer than ``max_prompt_tokens`` after trimming are dropped (the reference drops > 100); the
search never tries a longer suffix, so such a prompt is dropped as soon as the longest allowed one
loses too much. Each kept prompt's per-token activations come from the search step that accepted its
length (a final pass runs only the prompts kept at their full context, which the search never runs).

Train prompts come from the corpus's train split, test prompts from its held-out split (split by
document, see :mod:`headscope.data`), so explanations are scored on prompts they never saw.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..capture import capture
from ..data import TokenCorpus
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import read_tensors, write_tensors
from ..sampling import Windows


def _layer_index(neurons: list[dict]) -> tuple[list[int], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Layers, and per layer: the neuron ids [n_l] and their column in the neuron order [n_l]."""
    layers = sorted({n["layer"] for n in neurons})
    ids = {l: torch.tensor([n["neuron"] for n in neurons if n["layer"] == l]) for l in layers}
    cols = {l: torch.tensor([i for i, n in enumerate(neurons) if n["layer"] == l]) for l in layers}
    return layers, ids, cols


def neuron_acts(model: Model, ids: torch.Tensor, neurons: list[dict]) -> torch.Tensor:
    """Activations of all ``neurons`` at every position of ``ids`` [B, S] → [B, S, N] float32."""
    layers, lids, cols = _layer_index(neurons)
    cap = capture(model, ids, layers=layers, what={"mlp_post"}, stop_after=max(layers),
                  reduce={"mlp_post": lambda l, t: t[..., lids[l].to(t.device)].float().cpu()})
    out = torch.empty(ids.shape[0], ids.shape[1], len(neurons))
    for l in layers:
        out[..., cols[l]] = cap["mlp_post"][l]
    return out


SLACK = 0.25
"""Default padding bound of :func:`length_sorted_batches`: a row at most 25 % (+ 2 tokens) longer than
its batch's shortest row."""


def length_sorted_batches(rows: list[list[int]], batch_size: int, slack: float | None = SLACK):
    """Prompts of similar length batched together: yields (idx, ids [B, n]), ``idx`` the prompts' indices
    in ``rows``. Each row is right-padded with its batch's first token; padding sits after every prompt's
    last token, so causal attention never reads it.

    Rows go in order of length, at most ``batch_size`` per batch; a batch also ends before a row longer
    than ``(1 + slack)`` × its shortest row + 2, so padding stays a small part of the forward tokens
    (a search step mixes prompts of 2 and 100 tokens: with row counts alone, most of the forward pass
    was padding). ``slack=None``: row counts only."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or
                      (slack is not None and len(rows[i]) > (1 + slack) * len(rows[batch[0]]) + 2)):
            yield batch, _padded(rows, batch)
            batch = []
        batch.append(i)
    if batch:
        yield batch, _padded(rows, batch)


def _padded(rows: list[list[int]], idx: list[int]) -> torch.Tensor:
    n = max(len(rows[i]) for i in idx)
    ids = torch.full((len(idx), n), rows[idx[0]][0], dtype=torch.long)
    for j, i in enumerate(idx):
        ids[j, : len(rows[i])] = torch.tensor(rows[i])
    return ids


def acts_at(model: Model, rows: list[list[int]], layer_of: list[int], neuron_of: list[int],
            batch_size: int = 64) -> list[list[float]]:
    """Per-token activation of neuron ``neuron_of[i]`` (layer ``layer_of[i]``) on prompt ``rows[i]``.
    Prompts are batched per layer, each batch's forward pass stopping at that layer."""
    out: list[list[float]] = [None] * len(rows)  # type: ignore[list-item]
    for layer in sorted(set(layer_of)):
        sub = [i for i in range(len(rows)) if layer_of[i] == layer]
        for idx, ids in length_sorted_batches([rows[i] for i in sub], batch_size, SLACK):  # similar lengths
            rid = [sub[j] for j in idx]
            nrn = torch.tensor([neuron_of[i] for i in rid])
            cap = capture(model, ids.to(model.device), layers=[layer], what={"mlp_post"}, stop_after=layer,
                          reduce={"mlp_post": lambda l, t: t[torch.arange(t.shape[0], device=t.device), :,
                                                              nrn.to(t.device)].float().cpu()})   # [B, S]
            acts = cap["mlp_post"][layer]
            for j, i in enumerate(rid):
                out[i] = acts[j, : len(rows[i])].tolist()
    return out


def top_sequences(model: Model, corpus: TokenCorpus, neurons: list[dict], split: str, top_k: int,
                  batch_size: int = 16, max_tokens: int | None = None, state_path=None,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Running top-k over the sequences of ``split``: ``{"act": [k, N], "seq": [k, N], "pos": [k, N]}``
    (sorted by activation, descending; ``seq = -1`` where fewer than k sequences exist).

    ``state_path``: a safetensors file the state is saved to after every batch group, so an
    interrupted pass resumes where it stopped."""
    return _running_top(model, corpus, split, top_k, len(neurons),
                        lambda ids: neuron_acts(model, ids, neurons), batch_size, max_tokens, state_path, progress)


def layer_top_sequences(model: Model, corpus: TokenCorpus, layers: list[int], split: str, top_k: int,
                        batch_size: int = 16, max_tokens: int | None = None, state_path=None,
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """:func:`top_sequences` for *every* neuron of ``layers`` at once: the same state with
    N = len(layers) · d_mlp columns, column ``i · d_mlp + n`` = neuron n of ``layers[i]``. The forward
    pass computes whole layers anyway, so this costs the same pass; :func:`select_neurons` then gives
    the top-k of any neuron set in these layers (e.g. random neurons) with no forward pass."""
    layers = sorted(layers)

    def acts(ids: torch.Tensor) -> torch.Tensor:
        cap = capture(model, ids, layers=layers, what={"mlp_post"}, stop_after=max(layers),
                      reduce={"mlp_post": lambda l, t: t.float().cpu()})
        return torch.cat([cap["mlp_post"][l] for l in layers], dim=-1)
    return _running_top(model, corpus, split, top_k, len(layers) * model.d_mlp, acts, batch_size, max_tokens,
                        state_path, progress)


def select_neurons(state: dict[str, torch.Tensor], layers: list[int], d_mlp: int, neurons: list[dict],
                   top_k: int) -> dict[str, torch.Tensor]:
    """The [top_k, N] state of ``neurons`` from a :func:`layer_top_sequences` state of ``layers``
    (its k ≥ top_k: the first top_k rows of a sorted top-k are the top-top_k)."""
    layers = sorted(layers)
    if top_k > state["act"].shape[0]:
        raise HeadscopeError(f"internal: cached top-{state['act'].shape[0]} cannot serve top-{top_k}")
    cols = torch.tensor([layers.index(n["layer"]) * d_mlp + n["neuron"] for n in neurons], dtype=torch.long)
    return {k: state[k][:top_k, cols] for k in ("act", "seq", "pos")}


SAMPLER_VERSION = 1
"""Saved states from another sequence order (0: the first sequences of the split) are not resumed."""


def _running_top(model: Model, corpus: TokenCorpus, split: str, top_k: int, N: int, acts_fn, batch_size: int,
                 max_tokens: int | None, state_path, progress: bool) -> dict[str, torch.Tensor]:
    """The running top-k of :func:`top_sequences`; ``acts_fn(ids [B, S]) -> [B, S, N]``."""
    n_seq = corpus.n_sequences(split)
    if max_tokens is not None:
        n_seq = min(n_seq, max(1, max_tokens // corpus.seq_len))
    state = {"act": torch.full((top_k, N), -float("inf")), "seq": torch.full((top_k, N), -1, dtype=torch.long),
             "pos": torch.zeros((top_k, N), dtype=torch.long), "next": torch.tensor(0),
             "sampler": torch.tensor(SAMPLER_VERSION)}
    if state_path is not None and state_path.is_file():
        saved = read_tensors(state_path)
        if saved["act"].shape == state["act"].shape and int(saved.get("sampler", torch.tensor(-1))) == SAMPLER_VERSION:
            state = saved
    start = int(state["next"])
    bar = tqdm(total=n_seq, initial=min(start, n_seq), desc=f"mining {split}", unit=" seq", disable=not progress,
               file=sys.stderr)
    seq_i = start
    plan = Windows(corpus, split, seed=0)
    batches = plan.batches(batch_size, n_seq - start, start) if start < n_seq else []
    for k, (batch, _) in enumerate(batches):
        acts = acts_fn(batch.to(model.device))                           # [B, S, N]
        acts[:, 0] = -float("inf")                                       # position 0 is BOS
        mx, pos = acts.max(dim=1)                                        # [B, N]
        seqs = torch.from_numpy(plan.seqs[seq_i:seq_i + batch.shape[0]]).long()[:, None].expand_as(mx)
        allv = torch.cat([state["act"], mx]); alls = torch.cat([state["seq"], seqs]); allp = torch.cat([state["pos"], pos])
        top = torch.topk(allv, top_k, dim=0)
        state = {"act": top.values, "seq": alls.gather(0, top.indices), "pos": allp.gather(0, top.indices),
                 "next": torch.tensor(seq_i + batch.shape[0]), "sampler": torch.tensor(SAMPLER_VERSION)}
        seq_i += batch.shape[0]
        bar.update(batch.shape[0])
        if state_path is not None and k % 20 == 19:
            write_tensors(state_path, state)
    bar.close()
    state["documents"] = torch.tensor(plan.n_documents(n_seq))
    if state_path is not None:
        write_tensors(state_path, state)
    return state


def trim_prompts(model: Model, corpus: TokenCorpus, split: str, neurons: list[dict], state: dict,
                 keep: float = 0.8, max_prompt_tokens: int = 100, batch_size: int = 64,
                 progress: bool = True, tolerance: float = 0.0) -> list[list[dict]]:
    """Trimmed prompts per neuron (list over neurons of lists of prompt dicts with ``ids``, ``act``,
    ``full_act``, ``seq``, ``pos``, ``start``, ``doc``), ``ids`` = [BOS] + seq[start : pos + 1], ``doc`` the
    document of the activating token.

    ``tolerance`` τ ≥ 0: the bisection stops once the last length that lost too much (lo) and the
    shortest that kept enough (hi) satisfy hi − lo ≤ max(1, τ·hi), so the kept suffix is at most ~τ of its
    length longer than the exact shortest one (τ = 0: exact); each bisection step saved costs one forward
    pass of the prompt."""
    items = []  # (neuron index, seq tokens, pos, full act)
    for n in range(len(neurons)):
        for r in range(state["act"].shape[0]):
            s, a = int(state["seq"][r, n]), float(state["act"][r, n])
            if s < 0 or not a > -float("inf"):
                continue
            items.append((n, corpus.sequence(split, s).tolist(), int(state["pos"][r, n]), a, s))
    bos = model.bos_id
    layer_of = [neurons[it[0]]["layer"] for it in items]
    neuron_of = [neurons[it[0]]["neuron"] for it in items]
    full = [it[3] for it in items]
    # search over the suffix length ℓ = pos + 1 − start ∈ [1, pos]; ℓ = pos is the full context (ok).
    # Gallop from the short end (ℓ = 1, 2, 4, …) to the first ok length, then bisect between the last
    # bad and the first ok length: cost ≈ a few times the trimmed length, not the full one. No length
    # above ℓ_max = max_prompt_tokens − 1 is tried: a prompt that needs more is dropped as soon as ℓ_max
    # loses too much (it would be dropped at the end anyway).
    lmax = max(1, max_prompt_tokens - 1)
    pos = [it[2] for it in items]
    lo = [0] * len(items)                     # longest length known to lose too much (0: none tested)
    hi = list(pos)                            # shortest length known to keep enough
    nxt = [1 if full[i] > 0 else None for i in range(len(items))]  # next gallop length; None: bisecting
    todo = [i for i in range(len(items)) if full[i] > 0]  # a non-positive maximum cannot be "kept"
    kept_acts: dict[int, list[float]] = {}   # per-token activations of the prompt at length hi (when tested)
    dropped: set[int] = set()
    bar = tqdm(desc=f"trimming {split} prompts", unit=" step", disable=not progress, file=sys.stderr)
    while True:
        active = []
        for i in todo:
            if i in dropped:
                continue
            if lo[i] >= lmax:                 # every length ≤ ℓ_max loses too much: too long a prompt
                dropped.add(i)
                continue
            if nxt[i] is not None and nxt[i] >= hi[i]:
                nxt[i] = None
            if nxt[i] is not None or hi[i] - lo[i] > max(1, int(tolerance * hi[i])):
                active.append(i)
        if not active:
            break
        length = {i: min(lmax, nxt[i] if nxt[i] is not None else (lo[i] + hi[i]) // 2) for i in active}
        rows = [[bos] + items[i][1][pos[i] + 1 - length[i]: pos[i] + 1] for i in active]
        acts = acts_at(model, rows, [layer_of[i] for i in active], [neuron_of[i] for i in active], batch_size)
        for i, a in zip(active, acts):
            ok = a[-1] >= keep * full[i]
            if ok:
                hi[i], nxt[i] = length[i], None
                kept_acts[i] = a
            else:
                lo[i] = length[i]
                if nxt[i] is not None:
                    nxt[i] *= 2
        bar.update(1)
    bar.close()
    lo = [pos[i] + 1 - hi[i] for i in range(len(items))]  # the start index of the kept suffix
    rows = [[bos] + it[1][lo[i]: it[2] + 1] for i, it in enumerate(items)]
    # prompts kept at their full context (never shortened) were not run yet: one pass for those
    rest = [i for i in range(len(items)) if i not in kept_acts and i not in dropped and len(rows[i]) <= max_prompt_tokens]
    for i, a in zip(rest, acts_at(model, [rows[i] for i in rest], [layer_of[i] for i in rest],
                                  [neuron_of[i] for i in rest], batch_size)):
        kept_acts[i] = a
    out: list[list[dict]] = [[] for _ in neurons]
    W = corpus.seq_len - 1      # position p ≥ 1 of sequence s is stream offset s·W + p − 1
    docs = corpus.document_of(split, [it[4] * W + it[2] - 1 for it in items]).tolist() if items else []
    for i, it in enumerate(items):
        if i in dropped or len(rows[i]) > max_prompt_tokens:
            continue
        out[it[0]].append({"ids": rows[i], "acts": [round(float(a), 5) for a in kept_acts[i]],
                           "act": float(kept_acts[i][-1]), "full_act": full[i], "seq": it[4], "pos": it[2],
                           "start": lo[i], "doc": int(docs[i])})
    return out


def check_corpus(corpus: TokenCorpus, top_k: int, top_k_test: int) -> None:
    """Refuse a corpus whose splits hold fewer sequences than the prompts asked for."""
    for split, k in (("train", top_k), ("heldout", top_k_test)):
        n = corpus.n_sequences(split)
        if n < k:
            raise HeadscopeError(
                f"corpus '{corpus.spec}' is too small for the split: its {split} part has {n} sequences of "
                f"{corpus.seq_len} tokens but {k} prompts per neuron were asked; use a larger corpus, a "
                f"smaller --seq-len, or fewer prompts (--top-k/--top-k-test)")
