"""Step 6 (``ablate``): the causal check. Zero a head and measure the drop in P(neuron's token).

For each (neuron, head) pair to explain and each of the neuron's prompts: drop = P_clean(t) −
P_ablated(t) at the prompt's last position, t the neuron's token, P from the final softmax. The head
is ablated by zeroing its slice of z at every position (``mode="z"``, default), which equals zeroing
its values at every position as the reference does — except under GQA, where a KV group's values feed
several query heads: ``mode="value"`` zeroes the group's values (z of every query head in the group),
``"z"`` silences the one query head.

:func:`ablation_drops` batches over pairs *and* prompts: the (pair, prompt) rows of one layer go into
length-sorted batches, each row silencing its own head through a per-row mask ([B, 1, H, 1] ``scale``
intervention, across pairs and neurons), and each pass resumes at that layer from the clean pass's residual
stream (``capture(resume=…)``): an ablation at layer ℓ costs the layers from ℓ on;
:func:`ablation_drops_per_pair` is the plain loop (one forward pass per pair), kept as the reference the
batched path is tested against. The statistics are in
:func:`headscope.neurons.stages.run_ablate` (unit: the neuron).
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..capture import HeadIntervention, capture
from ..models.load import Model
from .mining import length_sorted_batches


MODES = ("z", "value")


def ablated_heads(model: Model, head: int, mode: str = "z") -> list[int]:
    """Query heads silenced by ablating ``head``: itself (``z``), or every query head reading its KV
    group (``value``: zeroing the group's values zeroes z of all those heads)."""
    if mode == "z":
        return [head]
    if mode == "value":
        g = model.kv_group(head)
        return [h for h in range(model.n_heads) if model.kv_group(h) == g]
    from ..errors import HeadscopeError
    raise HeadscopeError(f"unknown ablation mode '{mode}' (choose from {', '.join(MODES)})")


def token_probs(model: Model, rows: list[list[int]], tokens: list[int], heads: tuple[int, int] | None = None,
                batch_size: int = 32, mode: str = "z") -> torch.Tensor:
    """P(tokens[i]) at the last position of ``rows[i]`` → [P] float32; with ``heads = (layer, head)``
    that head's z is zeroed at every position (``mode="value"``: its KV group's values)."""
    out = torch.empty(len(rows))
    ivs = [] if heads is None else [HeadIntervention(layer=heads[0], heads=ablated_heads(model, heads[1], mode),
                                                     kind="zero")]
    for idx, ids in length_sorted_batches(rows, batch_size):
        out[torch.tensor(idx)] = last_token_probs(model, ids, [len(rows[i]) - 1 for i in idx],
                                                  [tokens[i] for i in idx], ivs)
    return out


def last_token_probs(model: Model, ids: torch.Tensor, last: list[int], tokens: list[int],
                     interventions=(), resume: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """P(tokens[b]) at position ``last[b]`` of row b of ``ids`` [B, S] → [B] float32 (CPU). The
    unembedding and the softmax run at those positions only (``capture(logit_positions=…)``): the
    other positions' logits — V = 49 152 per token on SmolLM2 — were never used."""
    lp = capture(model, ids.to(model.device), layers=[], what={"logprobs"}, interventions=interventions,
                 logit_positions=torch.tensor(last), resume=resume).logprobs[:, 0]          # [B, V]
    return lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].exp().float().cpu()


RESID_BYTES = 512 * 2**20
"""Bound on the clean residual streams kept at once for the resumed ablations (neurons are taken in groups
whose streams fit; the demo's all fit in one)."""


def ablation_drops(model: Model, pairs: list[dict], prompts: list[list[list[int]]], tokens: list[int],
                   batch_size: int = 32, progress: bool = True, mode: str = "z",
                   resid_bytes: int = RESID_BYTES) -> list[torch.Tensor]:
    """For each pair ``{"neuron": i, "layer": k, "head": h}``: drops [P_i] on neuron i's prompts
    (see the module docstring). For a group of neurons whose streams fit in ``resid_bytes``: one clean
    pass over all their prompts (length-sorted batches across neurons) keeps P(token) and the residual
    stream entering each layer the prompt's pairs ablate; then the (pair, prompt) rows of one layer go in
    length-sorted batches across pairs and neurons, each row silencing its own head, each pass resuming
    at that layer from the clean streams (the blocks below the ablated head are not run again)."""
    out = [torch.empty(len(prompts[p["neuron"]])) for p in pairs]
    H, d = model.n_heads, model.d_model
    esize = torch.empty((), dtype=model.dtype).element_size()
    silenced = [ablated_heads(model, p["head"], mode) for p in pairs]
    layers_of: dict[int, set[int]] = {}
    for p in pairs:
        layers_of.setdefault(p["neuron"], set()).add(p["layer"])
    groups, group, size = [], [], 0          # neurons whose kept streams fit in resid_bytes together
    for i in sorted(layers_of):
        need = len(layers_of[i]) * sum(len(r) for r in prompts[i]) * d * esize
        if group and size + need > resid_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(i)
        size += need
    if group:
        groups.append(group)
    bar = tqdm(total=sum(len(prompts[p["neuron"]]) for p in pairs), desc="ablating heads", unit=" prompt",
               disable=not progress, file=sys.stderr)
    for group in groups:
        rows = [(i, j) for i in group for j in range(len(prompts[i]))]          # (neuron, prompt)
        clean, resid = _clean_pass(model, [prompts[i][j] for i, j in rows], [tokens[i] for i, _ in rows],
                                   [sorted(layers_of[i]) for i, _ in rows], batch_size)
        at = {r: k for k, r in enumerate(rows)}
        for layer in sorted({l for i in group for l in layers_of[i]}):
            todo = [(r, j) for r, p in enumerate(pairs) if p["neuron"] in group and p["layer"] == layer
                    for j in range(len(prompts[p["neuron"]]))]                    # (pair, prompt)
            for idx, ids in length_sorted_batches([prompts[pairs[r]["neuron"]][j] for r, j in todo], batch_size):
                mask = torch.ones(len(idx), 1, H, 1)
                h = torch.zeros(len(idx), ids.shape[1], d, dtype=model.dtype)
                last, toks = [], []
                for b, k in enumerate(idx):
                    r, j = todo[k]
                    i = pairs[r]["neuron"]
                    mask[b, 0, silenced[r], 0] = 0.0
                    h[b, : len(prompts[i][j])] = resid[at[(i, j)]][layer]   # after the last token: padding, never read
                    last.append(len(prompts[i][j]) - 1)
                    toks.append(tokens[i])
                ablated = last_token_probs(model, ids, last, toks,
                                           [HeadIntervention(layer=layer, heads=None, kind="scale", value=mask)],
                                           resume=(layer, h))
                for b, k in enumerate(idx):
                    r, j = todo[k]
                    out[r][j] = clean[at[(pairs[r]["neuron"], j)]] - ablated[b]
                bar.update(len(idx))
    bar.close()
    return out


def _clean_pass(model: Model, rows: list[list[int]], tokens: list[int], layers: list[list[int]], batch_size: int
                ) -> tuple[torch.Tensor, list[dict[int, torch.Tensor]]]:
    """P(tokens[k]) at the last position of every row [P], and the residual stream entering each of
    ``layers[k]`` on row k ([{layer: [len_k, d]}]), from length-sorted batched clean passes."""
    probs = torch.empty(len(rows))
    resid: list[dict[int, torch.Tensor]] = [{} for _ in rows]
    for idx, ids in length_sorted_batches(rows, batch_size):
        want = sorted({l for k in idx for l in layers[k]})
        cap = capture(model, ids.to(model.device), layers=want, what={"resid_pre", "logprobs"},
                      logit_positions=torch.tensor([len(rows[k]) - 1 for k in idx]))
        lp = cap.logprobs[:, 0]
        probs[torch.tensor(idx)] = lp[torch.arange(len(idx)), torch.tensor([tokens[k] for k in idx])].exp().float().cpu()
        for b, k in enumerate(idx):
            for l in layers[k]:
                resid[k][l] = cap["resid_pre"][l][b, : len(rows[k])].cpu()
    return probs, resid


def ablation_drops_per_pair(model: Model, pairs: list[dict], prompts: list[list[list[int]]], tokens: list[int],
                            batch_size: int = 32, progress: bool = True, mode: str = "z") -> list[torch.Tensor]:
    """The same drops as :func:`ablation_drops`, one forward pass per pair (batched over its prompts)."""
    clean: dict[int, torch.Tensor] = {}
    out = []
    for p in tqdm(pairs, desc="ablating heads", unit=" pair", disable=not progress, file=sys.stderr):
        i = p["neuron"]
        rows = prompts[i]
        toks = [tokens[i]] * len(rows)
        if i not in clean:
            clean[i] = token_probs(model, rows, toks, None, batch_size)
        out.append(clean[i] - token_probs(model, rows, toks, (p["layer"], p["head"]), batch_size, mode))
    return out
