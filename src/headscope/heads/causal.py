"""Causal checks of head roles: an attribution-patching screen of every head, and real ablations.

Three tasks, each a small batch disjoint from the data the role scores were measured on:

* ``repeat``: repeated random tokens ``[BOS, r, r]``. Metrics per sequence: the loss on the second copy
  (predictions of r_2..r_L from the second copy; induction and prefix induction), and the mean induction
  score of given "reader" heads (previous-token heads feed induction heads: their ablation should lower it).
* ``text``: held-out natural-text windows. Metrics per sequence: KL(clean ‖ ablated) of the next-token
  distribution (sink heads: should stay below a bound), and for each head the centred logit of the token it
  attends to most in the clean run (copying: falls when the head is ablated; copy suppression: rises).
* ``successor``: runs of consecutive ordinal tokens (`` Monday Tuesday Wednesday …``). Metric per prompt:
  the log-probability of the next item, from the third item on.
* ``ioi``: indirect-object prompts (Wang et al. 2022; the templates and names of :mod:`headscope.sae.ioi`),
  "When Mary and John went to the store, John gave a drink to", each with its ABC twin whose subject is not
  repeated ("…, Kate gave a drink to"). Metric per prompt: the logit difference logit(IO) − logit(S) at the
  last token (duplicate-token heads: falls when the head is ablated); the same difference on the twin is the
  control (no repeated name, nothing for a duplicate-token head to find). Prompts differ in length by
  template: rows are right-padded (causal attention: padding never reaches the last real token), ``ends``
  holds each row's last real position, the mean z is taken over real positions only and resampling pairs a
  prompt with another of the same template.

The ``text`` task's next-token loss is also the local role's metric (ablating a local head should raise it).

**Ablation** (positions ≥ 1; BOS is left alone): ``mean`` replaces the head's z by its mean over the task's
positions; ``resample`` by its z at the same position of another sequence of the batch (row b − 1 mod n, or
``Task.partner``).

**Screen** (:func:`atp`): z ← z + α·(z_ablated − z) with α = 0 for every head of every layer, one forward and
one backward per metric: ∂metric/∂α_h = (z_ablated − z)·∂metric/∂z_h summed over positions, the first-order
effect of ablating head h (AtP, Kramár et al. 2024), every head at once. KL has zero gradient at the clean
run, so the sink screen uses the next-token loss; the copying screen is the head's direct path only (each head
has its own target token): (z_ablated − z)·W_O^h·P·diag(γ_f)·W_Uc[x]ᵀ/σ.

**Real ablation** (:func:`ablate`): one pass per head that starts at the head's layer (``capture(resume=…)``
with the clean run's residual stream there), so its cost is the layers from the head's on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture import HeadIntervention, capture
from ..errors import HeadscopeError
from ..models.load import Model
from .battery import attended_sources, final_scale
from ..sae.ioi import TEMPLATES, ioi_prompts, single_token_names
from .ov import W_O_folded, ordinal_tasks, readout


@dataclass
class Task:
    """One causal task: ids [n, S], clusters [n] (documents or sequences), and what its metrics need."""

    name: str
    ids: torch.Tensor
    clusters: np.ndarray
    half_len: int = 0
    """repeat task: length of each half"""
    readers: list[tuple[int, int]] = field(default_factory=list)
    """repeat task: the (layer, head) whose induction score is the previous-token metric"""
    answers: torch.Tensor | None = None
    """ioi task: [n, 2] token ids of (IO, S) per row"""
    ends: torch.Tensor | None = None
    """ioi task: [n] the last real position of each (right-padded) row, where the metric is read"""
    control: np.ndarray | None = None
    """ioi task: [n] bool, True for the ABC twins (the control rows); the metric rows are the others"""
    partner: np.ndarray | None = None
    """resample-ablation: row b takes its z from row partner[b] (default b − 1 mod n)"""
    clean: dict = field(default_factory=dict)
    """filled by :func:`run_clean`: resid_pre, z, mean_z (per layer), logprobs, metrics, targets"""

    def metric_rows(self) -> "Task":
        """The task without its control rows (ioi: the prompts without their ABC twins), sharing the clean
        run's mean z and z (what an ablation needs); the task itself when it has no control rows."""
        if self.control is None:
            return self
        keep = np.flatnonzero(~self.control)
        idx = torch.as_tensor(keep)
        where = {int(k): i for i, k in enumerate(keep)}
        partner = None if self.partner is None else np.array([where[int(self.partner[k])] for k in keep])
        c = self.clean
        clean = {"mean_z": c["mean_z"], "z": {l: z[idx] for l, z in c["z"].items()}} if c else {}
        return Task(self.name, self.ids[idx], self.clusters[keep], answers=self.answers[idx], ends=self.ends[idx],
                    partner=partner, clean=clean)

    def valid(self) -> torch.Tensor:
        """[n, S] bool: real tokens (all, except right padding of the ioi task)."""
        n, S = self.ids.shape
        if self.ends is None:
            return torch.ones(n, S, dtype=torch.bool)
        return torch.arange(S)[None] <= self.ends[:, None]


def repeat_loss(logprobs: torch.Tensor, ids: torch.Tensor, half: int) -> torch.Tensor:
    """Loss on the second copy per sequence, [n]: −log p(r_{i+1}) predicted at positions half + 1 .. 2·half − 1."""
    t = torch.arange(half + 1, 2 * half)
    return -logprobs[:, t].gather(-1, ids[:, t + 1, None]).squeeze(-1).mean(-1)


def induction_attention(patterns: dict[int, torch.Tensor], readers, half: int) -> torch.Tensor:
    """Mean over ``readers`` of their induction score per sequence, [n] (patterns[layer] [n, H, S, S])."""
    t = torch.arange(half + 1, 2 * half + 1)
    vals = [patterns[l][:, h][:, t, t - half + 1].mean(-1) for l, h in readers]
    return torch.stack(vals).mean(0)


def kl_per_seq(clean_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ ablated) in nats, mean over positions ≥ 1, per sequence [n] (log-probs [n, S, V])."""
    c = clean_lp[:, 1:].float()
    return (c.exp() * (c - lp[:, 1:].float())).sum(-1).mean(-1)


def attended_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Centred logit (minus the mean over the vocabulary) of targets [n, S] per sequence, mean over t ≥ 2, [n]."""
    lg = logits.float()
    c = lg.gather(-1, targets[..., None]).squeeze(-1) - lg.mean(-1)
    return c[:, 2:].mean(-1)


def successor_prompts(model: Model, n_items: int = 5, max_prompts: int = 48, seed: int = 0):
    """Prompts [BOS, t_i … t_{i+n_items−1}] of consecutive single-token ordinal items, [P, n_items + 1], and
    the ordinal set of each prompt (its cluster), [P]. None when the tokenizer spells no run that long."""
    rows, names = [], []
    for name, ids, cyclic in ordinal_tasks(model):
        n = len(ids)
        for i in range(n if cyclic else n - n_items + 1):
            run = [ids[(i + k) % n] for k in range(n_items)]
            if all(t is not None for t in run):
                rows.append([model.bos_id] + run)
                names.append(name)
    if not rows:
        return None
    g = np.random.default_rng(seed)
    keep = np.sort(g.permutation(len(rows))[:max_prompts])
    return torch.tensor([rows[i] for i in keep]), np.array([names[i] for i in keep])


def successor_logprob(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the next ordinal item from the third item on, per prompt [n]."""
    t = torch.arange(2, ids.shape[1] - 1)
    return logprobs[:, t].gather(-1, ids[:, t + 1, None]).squeeze(-1).mean(-1)


def next_token_loss(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss per sequence, mean over positions 1 .. S − 2, [n] (the sink screen's metric)."""
    t = torch.arange(1, ids.shape[1] - 1)
    return -logprobs[:, t].gather(-1, ids[:, t + 1, None]).squeeze(-1).mean(-1)


def ioi_task(model: Model, n_prompts: int, seed: int = 0) -> Task | None:
    """The ioi task: ``n_prompts`` IOI prompts (half ABBA, half BABA, templates in turn; :func:`headscope.sae.ioi.
    ioi_prompts`) followed by their ABC twins (S2 replaced by a third name, drawn with ``seed``), right-padded;
    clusters: the unordered {IO, S} name pair. None when the tokenizer spells fewer than 3 names as single
    tokens (no ABC twin can be built)."""
    try:
        names = single_token_names(model)
    except HeadscopeError:
        return None
    if len(names) < 3:
        return None
    prompts = ioi_prompts(model, n_prompts, seed)
    rng = np.random.default_rng(seed + 7)
    tok = model.tokenizer

    def one(name: str) -> int:
        return tok(" " + name, add_special_tokens=False)["input_ids"][0]

    rows, answers, clusters = [], [], []
    twins = []
    for p in prompts:
        a, b = (p["io"], p["s"]) if p["order"] == "ABBA" else (p["s"], p["io"])
        c = str(rng.choice([x for x in names if x not in (p["io"], p["s"])]))
        rows.append([model.bos_id] + tok(p["text"], add_special_tokens=False)["input_ids"])
        twins.append([model.bos_id] + tok(TEMPLATES[p["template"]].format(A=a, B=b, C=c),
                                          add_special_tokens=False)["input_ids"])
        answers.append([one(p["io"]), one(p["s"])])
        clusters.append("|".join(sorted((p["io"], p["s"]))))
    rows += twins
    S = max(len(r) for r in rows)
    ids = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rows])
    ends = torch.tensor([len(r) - 1 for r in rows])
    control = np.arange(len(rows)) >= len(prompts)
    # resample partner: the next row of the same template and half (cyclic)
    partner = np.arange(len(rows))
    groups: dict = {}
    for i in range(len(rows)):
        groups.setdefault((int(ends[i]), bool(control[i]), prompts[i % len(prompts)]["template"]), []).append(i)
    for g in groups.values():
        partner[g] = np.roll(g, 1)
    return Task("ioi", ids, np.array(clusters * 2), answers=torch.tensor(answers * 2), ends=ends,
                control=control, partner=partner)


def logit_diff(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """logit(IO) − logit(S) per row, [n], from logits at the last real token [n, V] (or [n, 1, V]) and
    answers [n, 2] = (IO, S) token ids."""
    lg = logits.reshape(logits.shape[0], -1)
    lg = lg if lg.dtype == torch.float64 else lg.float()
    return lg.gather(-1, answers[:, :1]).squeeze(-1) - lg.gather(-1, answers[:, 1:]).squeeze(-1)


def reader_induction(task: Task, patterns: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
    """The previous-token metric after ablating a head of ``layer``: mean induction score of the reader heads,
    those at or below ``layer`` read from the clean run (an ablation cannot reach them), [n]."""
    total = torch.zeros(task.ids.shape[0])
    for i, (l, h) in enumerate(task.readers):
        total = total + (induction_attention(patterns, [(l, h)], task.half_len) if l > layer
                         else task.clean["reader_each"][:, i])
    return total / len(task.readers)


@torch.no_grad()
def run_clean(model: Model, task: Task) -> None:
    """The clean pass of a task: residual stream entering every layer (for resumed ablations), z, mean z over
    positions ≥ 1 per layer [H, Dh], log-probs and the clean metrics."""
    L = model.n_layers
    what = {"resid_pre", "z", "logits"} if task.name == "ioi" else {"resid_pre", "z", "logprobs"}
    if task.name == "text":
        what |= {"pattern", "logits", "resid_post"}
    reduce = {}
    if task.name == "text":
        reduce["pattern"] = lambda l, p: attended_sources(p).cpu()
        reduce["resid_post"] = lambda l, x: x if l == L - 1 else x[:, :0]
    if task.name == "repeat" and task.readers:
        what.add("pattern")
    out = capture(model, task.ids, what=what, reduce=reduce, logit_positions=task.ends)
    c = task.clean
    c["resid_pre"] = out["resid_pre"]
    c["z"] = out["z"]
    # the mean over the task's real positions ≥ 1 (ioi: of the metric rows, not the control twins)
    w = task.valid().clone()
    w[:, 0] = False
    if task.control is not None:
        w[torch.as_tensor(task.control)] = False
    w = w.float()[..., None, None]
    c["mean_z"] = {l: (z.float() * w).sum((0, 1)) / w.sum() for l, z in out["z"].items()}
    c["logprobs"] = out.logprobs
    if task.name == "ioi":
        c["logit_diff"] = logit_diff(out.logits, task.answers)
    elif task.name == "repeat":
        c["loss"] = repeat_loss(out.logprobs, task.ids, task.half_len)
        if task.readers:
            each = [induction_attention({l: out["pattern"][l]}, [(l, h)], task.half_len) for l, h in task.readers]
            c["reader_each"] = torch.stack(each, -1)  # [n, R]
            c["induction"] = c["reader_each"].mean(-1)
    elif task.name == "text":
        ids = task.ids
        H = model.n_heads
        c["targets"] = torch.stack([torch.gather(ids[:, None, :].expand(-1, H, -1), 2, out["pattern"][l])
                                    for l in range(L)])  # [L, n, H, S]
        c["sigma"] = final_scale(model, out["resid_post"][L - 1])
        c["loss"] = next_token_loss(out.logprobs, ids)
        c["attended"] = torch.stack([torch.stack([attended_logit(out.logits, c["targets"][l, :, h])
                                                  for h in range(H)], -1) for l in range(L)])  # [L, n, H]
    else:
        c["logprob"] = successor_logprob(out.logprobs, task.ids)


def ablated_z(task: Task, layer: int, ablation: str):
    """(kind, value) of the intervention that ablates heads of ``layer`` on ``task``."""
    if ablation == "resample":
        z = task.clean["z"][layer]
        return "patch", z.roll(1, dims=0) if task.partner is None else z[torch.as_tensor(task.partner)]
    return "mean", task.clean["mean_z"][layer]


def atp(model: Model, task: Task, metric, ablation: str = "mean", what=("logprobs",), layers=(),
        stop_after: int | None = None, logit_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Attribution-patching estimate of every head's ablation effect on ``metric(out) -> [n]`` (its mean over
    the task's sequences), [L, H]: one forward and one backward (heads above ``stop_after`` get 0: the metric
    is read below them)."""
    L, H = model.n_layers, model.n_heads
    alpha = torch.zeros(L, 1, 1, H, 1, requires_grad=True)
    ivs = []
    for l in range(L):
        kind, value = ablated_z(task, l, ablation)
        ivs.append(HeadIntervention(l, None, kind, value, positions=slice(1, None), mix=alpha[l]))
    out = capture(model, task.ids, what=what, layers=layers, interventions=ivs, grad=True, stop_after=stop_after,
                  logit_positions=logit_positions)
    value = metric(out).float().mean()
    if not value.requires_grad:  # no head below the metric (e.g. every reader head in layer 0): no first-order effect
        return torch.zeros(L, H)
    value.backward()
    return torch.zeros(L, H) if alpha.grad is None else alpha.grad.reshape(L, H).clone()


def copy_screen(model: Model, task: Task, ablation: str = "mean") -> torch.Tensor:
    """Direct-path estimate of each head's ablation effect on the centred logit of the token it attends to,
    [L, H] (the copying screen; see the module docstring)."""
    L, H = model.n_layers, model.n_heads
    B, sigma = readout(model), task.clean["sigma"]
    out = torch.zeros(L, H)
    for l in range(L):
        z = task.clean["z"][l].float()  # [n, S, H, Dh]
        kind, value = ablated_z(task, l, ablation)
        dz = (value[None, None] if kind == "mean" else value.float()) - z
        dz[:, 0] = 0
        r = torch.einsum("bshk,hkd->bhsd", dz, W_O_folded(model, l).float())
        u = B.T[task.clean["targets"][l]]  # [n, H, S, d]
        out[l] = ((r * u).sum(-1) / sigma[:, None, :])[..., 2:].mean((0, 2))
    return out


@torch.no_grad()
def ablate(model: Model, task: Task, layer: int, head: int, ablation: str = "mean") -> dict[str, torch.Tensor]:
    """Real ablation of one head on ``task``: per-sequence effects (ablated − clean) of the task's metrics,
    each [n] ("induction" only when some reader head is above ``layer``; "attended": the head's own attended
    token; text: also "loss", the next-token loss; ioi: "logit_diff" on the prompts [n_prompts] and
    "logit_diff_control" on their ABC twins, row for row)."""
    kind, value = ablated_z(task, layer, ablation)
    iv = HeadIntervention(layer, [head], kind, value, positions=slice(1, None))
    what = {"logits"} if task.name == "ioi" else {"logprobs"}
    layers: list[int] = []
    if task.name == "text":
        what.add("logits")
    if task.name == "repeat":
        layers = sorted({l for l, _ in task.readers if l > layer})
        if layers:
            what.add("pattern")
    out = capture(model, task.ids, what=what, layers=layers, interventions=[iv], logit_positions=task.ends,
                  resume=(layer, task.clean["resid_pre"][layer]) if layer > 0 else None)
    c = task.clean
    if task.name == "ioi":
        d = logit_diff(out.logits, task.answers) - c["logit_diff"]
        ctl = torch.as_tensor(task.control)
        return {"logit_diff": d[~ctl], "logit_diff_control": d[ctl]}
    if task.name == "repeat":
        eff = {"loss": repeat_loss(out.logprobs, task.ids, task.half_len) - c["loss"]}
        if layers:
            eff["induction"] = reader_induction(task, out["pattern"], layer) - c["induction"]
        return eff
    if task.name == "text":
        return {"kl": kl_per_seq(c["logprobs"], out.logprobs),
                "loss": next_token_loss(out.logprobs, task.ids) - c["loss"],
                "attended": attended_logit(out.logits, c["targets"][layer, :, head]) - c["attended"][layer, :, head]}
    return {"logprob": successor_logprob(out.logprobs, task.ids) - c["logprob"]}
