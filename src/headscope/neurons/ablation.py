"""Step 6 (``ablate``): the causal check. Zero a head and measure the drop in P(neuron's token).

For each (neuron, head) pair to explain and each of the neuron's prompts: drop = P_clean(t) −
P_ablated(t) at the prompt's last position, t the neuron's token, P from the final softmax. The head
is ablated by zeroing its slice of z at every position (``mode="z"``, default), which equals zeroing
its values at every position as the reference does — except under GQA, where a KV group's values feed
several query heads: ``mode="value"`` zeroes the group's values (z of every query head in the group),
``"z"`` silences the one query head.

:func:`ablation_drops` batches over pairs *and* prompts: every (pair, prompt) row goes into length-sorted
batches of mixed pairs, each row silencing its own head through a per-row mask ([B, 1, H, 1] ``scale``
intervention per layer present in the batch), so the cost is one forward per ``batch_size`` rows whatever
the number of pairs; :func:`ablation_drops_per_pair` is the plain loop (one forward pass per pair), kept
as the reference the batched path is tested against. The statistics are in
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
                     interventions=()) -> torch.Tensor:
    """P(tokens[b]) at position ``last[b]`` of row b of ``ids`` [B, S] → [B] float32 (CPU). The
    unembedding and the softmax run at those positions only (``capture(logit_positions=…)``): the
    other positions' logits — V = 49 152 per token on SmolLM2 — were never used."""
    lp = capture(model, ids.to(model.device), layers=[], what={"logprobs"}, interventions=interventions,
                 logit_positions=torch.tensor(last)).logprobs[:, 0]          # [B, V]
    return lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].exp().float().cpu()


def ablation_drops(model: Model, pairs: list[dict], prompts: list[list[list[int]]], tokens: list[int],
                   batch_size: int = 32, progress: bool = True, mode: str = "z") -> list[torch.Tensor]:
    """For each pair ``{"neuron": i, "layer": k, "head": h}``: drops [P_i] on neuron i's prompts,
    batched over pairs and prompts (see the module docstring)."""
    neurons = sorted({p["neuron"] for p in pairs})
    clean = {i: token_probs(model, prompts[i], [tokens[i]] * len(prompts[i]), None, batch_size) for i in neurons}
    rows, owner = [], []                        # one row per (pair, prompt)
    for r, p in enumerate(pairs):
        for j, ids in enumerate(prompts[p["neuron"]]):
            rows.append(ids); owner.append((r, j))
    H = model.n_heads
    silenced = [ablated_heads(model, p["head"], mode) for p in pairs]
    out = [torch.empty(len(prompts[p["neuron"]])) for p in pairs]
    bar = tqdm(total=len(rows), desc="ablating heads", unit=" prompt", disable=not progress, file=sys.stderr)
    for idx, ids in length_sorted_batches(rows, batch_size):
        pr = [pairs[owner[i][0]] for i in idx]
        ivs = []
        for layer in sorted({p["layer"] for p in pr}):
            mask = torch.ones(len(idx), 1, H, 1)
            for b, i in enumerate(idx):
                if pairs[owner[i][0]]["layer"] == layer:
                    mask[b, 0, silenced[owner[i][0]], 0] = 0.0
            ivs.append(HeadIntervention(layer=layer, heads=None, kind="scale", value=mask))
        ablated = last_token_probs(model, ids, [len(rows[i]) - 1 for i in idx], [tokens[p["neuron"]] for p in pr], ivs)
        for b, i in enumerate(idx):
            r, j = owner[i]
            out[r][j] = clean[pairs[r]["neuron"]][j] - ablated[b]
        bar.update(len(idx))
    bar.close()
    return out


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
