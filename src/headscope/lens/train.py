"""Train a bank of lenses: closed-form start, then batched gradient refinement, resumable, DDP-ready.

``run_train(model, run, sites, ...)`` writes into ``run/lens/``:

* ``lenses.safetensors`` + ``lenses.json`` — the trained bank (see :mod:`headscope.lens.lenses`);
* ``null.safetensors`` — ``null_logits`` [V], the null lens c0 = log mean p over **every** training
  position the lenses saw (closed-form pass and refinement; position 0 left out);
* ``train.json`` — options, per-step mean KL history, final per-site training loss;
* ``checkpoint/state.safetensors`` — parameters, optimizer and generator state, null-lens sums, and (in its
  metadata) step and options, every ``checkpoint_every`` steps as ONE file replaced atomically, so a kill at
  any moment resumes; removed when training finishes.

Sequences come from :class:`~headscope.sampling.Windows` (the train split cut into windows in a
seeded random order, so they spread over all documents); the closed-form pass reads the first ones,
step k of the refinement reads windows [I + k·B·W + rank·B, … + B) after them (W ranks, I = windows of
the closed-form pass), so a resumed run continues exactly where it stopped. Position 0 (and any
position whose context is identical across the batch) is left out of every statistic; a control lens
(source: the middle site, scrambled across sequences and positions) is trained alongside (sampling.py).
One optimisation step = one global batch of ``batch_size`` sequences per rank. The model runs once per
batch (no grad); every site's lens logits [K, n, V] are computed together in chunks of ``chunk_tokens``
positions and backpropagated chunk by chunk (gradient accumulation), so memory is bounded by
K·chunk_tokens·V floats.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict

import torch

from ..data import TokenCorpus
from ..distributed import Distributed
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, read_checkpoint, read_json, read_tensors, write_checkpoint, write_json, write_tensors
from ..schedule import lr_at
from .closed_form import Moments, calibrate_scale
from .collect import site_batch
from .lenses import LensBank, LensConfig, save_bank, softcap
from ..sampling import Windows
from .objectives import LN2, loss, next_tokens, shortlist
from .options import LensTrainConfig
from .sampling import select_positions


def _dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _make_optimizer(bank: LensBank, cfg: LensTrainConfig):
    params = [p for p in bank.parameters()]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)


def _global_batch(windows: Windows, step: int, cfg: LensTrainConfig, dist: Distributed, first_seq: int = 0) -> torch.Tensor | None:
    """The ids [B, S] this rank reads at ``step`` (None when the split is used up)."""
    start = first_seq + (step * dist.world_size + dist.rank) * cfg.batch_size
    end = min(start + cfg.batch_size, len(windows))
    if start >= end:
        return None
    return windows.ids(start, end)


def control_generator(cfg: LensTrainConfig, dist: Distributed, step: int, phase: int = 1) -> torch.Generator:
    """The generator that scrambles the control rows of one batch (phase 0: closed-form pass, 1: step)."""
    return torch.Generator().manual_seed(((cfg.seed * 2 + phase) * 1_000_003 + step) * 64 + dist.rank)


def control_sites(sites: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The control lens' source head: the middle site of the bank."""
    return [tuple(sites[len(sites) // 2])]


# -- checkpoints --------------------------------------------------------------------------------------
def _save_checkpoint(folder, bank: LensBank, opt, gen: torch.Generator, step: int, key: dict, history: list,
                     null_sums: dict, init_sums: dict) -> None:
    """One file, replaced atomically (:func:`headscope.runs.write_checkpoint`): a kill at any moment
    leaves the previous step's checkpoint or this one."""
    tensors = {f"param.{k}": v for k, v in bank.state_dict().items()}
    tensors.update({f"null.{k}": v for k, v in null_sums.items()})
    tensors.update({f"init.{k}": v for k, v in init_sums.items()})
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    write_checkpoint(folder / "state.safetensors", tensors,
                     {"step": step, "key": key, "param_groups": sd["param_groups"], "history": history})
    for old in ("state.json", "null.safetensors"):  # the multi-file format of earlier versions
        (folder / old).unlink(missing_ok=True)


def _load_checkpoint(saved: tuple, folder, bank: LensBank, opt, gen: torch.Generator, key: dict):
    """Restore a checkpoint read by :func:`headscope.runs.read_checkpoint`; returns (step, history,
    refinement null sums, closed-form null sums)."""
    t, info = saved
    if info.get("key") != key:
        raise HeadscopeError(f"checkpoint in {folder} was made with other training options; "
                             "rerun with the same options, or pass --fresh to start over")
    try:
        bank.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")})
        state = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        gen.set_state(t["rng.generator"])
        torch.set_rng_state(t["rng.torch"])
        null_sums = {"psum": t["null.psum"], "n": t["null.n"]}
        init_sums = {"psum": t["init.psum"], "n": t["init.n"]}
    except (KeyError, RuntimeError, ValueError) as e:
        raise HeadscopeError(f"corrupt lens checkpoint in {folder}: {str(e).splitlines()[0]}; pass --fresh") from None
    return int(info["step"]), list(info.get("history", [])), null_sums, init_sums


# -- training -----------------------------------------------------------------------------------------
def train_step(bank: LensBank, R: torch.Tensor, logp: torch.Tensor, nxt: torch.Tensor, cfg: LensTrainConfig,
               gen: torch.Generator) -> torch.Tensor:
    """Accumulate gradients of the per-site loss for one batch (R [K,N,d], logp [N,V], nxt [N]);
    returns the per-site mean loss [K] (nats). Positions are processed in chunks of ``chunk_tokens``."""
    N = R.shape[1]
    cdt = _dtype(cfg.compute_dtype)
    total = torch.zeros(R.shape[0])
    for a in range(0, N, cfg.chunk_tokens):
        b = min(N, a + cfg.chunk_tokens)
        lp = logp[a:b]
        vocab = None
        if cfg.objective == "fkl_shortlist":
            vocab = shortlist(lp, cfg.shortlist_top_k, cfg.shortlist_negatives, gen)
            lp = lp[:, vocab]
        logits = bank(R[:, a:b], vocab=vocab, compute_dtype=cdt)
        per = loss(cfg.objective, logits, lp, nxt[a:b])
        (per.sum() * (b - a) / N).backward()
        total += per.detach().cpu() * (b - a) / N
    return total


def run_train(model: Model, run: RunDir, sites: list[tuple[int, int]], lens: LensConfig | None = None,
              cfg: LensTrainConfig | None = None, fresh: bool = False, progress: bool = True,
              dist: Distributed | None = None, stop_at_step: int | None = None) -> dict:
    """Train lenses for ``sites`` [(layer, head)] and write them under ``run/lens`` (see module
    docstring). Resumes from ``run/lens/checkpoint`` unless ``fresh``. ``stop_at_step`` stops early
    after writing a checkpoint at that step (used to test that resuming equals an uninterrupted run).
    Returns the summary written to ``train.json``."""
    from tqdm import tqdm
    lens = lens or LensConfig()
    cfg = cfg or LensTrainConfig()
    dist = dist or Distributed()
    if not sites:
        raise HeadscopeError("no heads to train lenses for")
    folder = run / "lens"
    ck = folder / "checkpoint"
    key = {"sites": [list(s) for s in sites], "lens": asdict(lens), "train": asdict(cfg),
           "world_size": dist.world_size}
    corpus = TokenCorpus(model, cfg.corpus, seq_len=cfg.seq_len, progress=progress and dist.primary)
    windows = Windows(corpus, "train", seed=cfg.seed)
    total_steps = cfg.steps(dist.world_size)
    first = _init_sequences(cfg, dist)
    windows.need(first + total_steps * cfg.batch_size * dist.world_size,
                 f"{cfg.init_tokens} statistics tokens + {total_steps} refinement step(s) of --batch-size "
                 f"{cfg.batch_size} × {dist.world_size} process(es)")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * dist.rank)
    bank = LensBank(model, sites, lens, seed=cfg.seed, controls=control_sites(sites)).to(model.device)
    n_control = len(bank.control_sites)
    opt = _make_optimizer(bank, cfg)
    step, history = 0, []
    resumed = False
    saved = None if fresh else read_checkpoint(ck / "state.safetensors")
    if saved is not None:
        step, history, ref, init_sums = _load_checkpoint(saved, ck, bank, opt, gen, key)
        resumed = True
    else:
        init_sums = _initialise(model, bank, windows, cfg, dist, progress)
        ref = {"psum": torch.zeros_like(init_sums["psum"]), "n": torch.zeros((), dtype=torch.float64)}
        if dist.primary:
            _save_checkpoint(ck, bank, opt, gen, 0, key, history, ref, init_sums)
        dist.barrier()
    bar = tqdm(total=total_steps, initial=step, desc=f"lens train ({len(sites)} heads)", unit="step",
               disable=not (progress and dist.primary), file=sys.stderr)
    last = None
    while step < total_steps:
        ids = _global_batch(windows, step, cfg, dist, first_seq=first)
        R, logp = site_batch(model, ids.to(model.device), bank.all_sites)
        R, logp, keep = select_positions(R, logp, ids, n_control, control_generator(cfg, dist, step))
        sums = torch.cat([logp.exp().sum(0).double().cpu(), torch.tensor([float(logp.shape[0])], dtype=torch.float64)])
        dist.all_reduce(sums, "sum")  # every rank keeps the global sums: the checkpoint needs no gather
        ref["psum"] += sums[:-1]
        ref["n"] += sums[-1]
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg.lr, step, total_steps, cfg.warmup, decay_frac=1.0)  # decay over every step
        opt.zero_grad(set_to_none=True)
        per = train_step(bank, R, logp, next_tokens(ids).to(model.device)[keep], cfg, gen)
        dist.all_reduce_grads(bank.parameters())
        if cfg.clip:
            bank.clip_per_lens(cfg.clip)
        opt.step()
        dist.all_reduce(per, "mean")
        if not torch.isfinite(per).all():
            raise HeadscopeError(f"lens training diverged at step {step + 1} (non-finite loss): lower --lr; "
                                 "the last finite checkpoint is kept")
        last = per
        step += 1
        history.append({"step": step, "loss_bits": float(per.mean()) / LN2})
        bar.set_postfix(loss=f"{float(per.mean()) / LN2:.3f} bits")
        bar.update(1)
        if dist.primary and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == stop_at_step):
            _save_checkpoint(ck, bank, opt, gen, step, key, history, ref, init_sums)
        if stop_at_step is not None and step >= stop_at_step and step < total_steps:
            bar.close()
            if dist.primary and not cfg.checkpoint_every:
                _save_checkpoint(ck, bank, opt, gen, step, key, history, ref, init_sums)
            dist.barrier()
            return {"stopped_at": step}
    bar.close()
    n_null = float(init_sums["n"]) + float(ref["n"])
    null = torch.log(((init_sums["psum"] + ref["psum"]) / n_null).clamp_min(1e-30)).float()
    summary = {"key": key, "sites": [list(s) for s in sites], "lens": asdict(lens), "train": asdict(cfg),
               "steps": total_steps, "tokens_seen": total_steps * cfg.batch_size * cfg.seq_len * dist.world_size,
               "resumed": resumed, "history": history, "controls": [list(s) for s in bank.control_sites],
               "null_positions": int(n_null), "positions_left_out_per_sequence": 1,
               "init_documents": int(len(set(windows.docs[:first].tolist()))),
               "documents": int(len(set(windows.docs[:first + total_steps * cfg.batch_size * dist.world_size].tolist()))),
               "final_loss_bits": {f"{l}.{h}": float(last[i]) / LN2 for i, (l, h) in enumerate(sites)}
               if last is not None else {},
               "final_loss_bits_control": {f"{l}.{h}": float(last[len(sites) + i]) / LN2
                                           for i, (l, h) in enumerate(bank.control_sites)} if last is not None else {}}
    if dist.primary:
        save_bank(bank, folder, {k: v for k, v in asdict(cfg).items()})
        write_tensors(folder / "null.safetensors", {"null_logits": null})
        write_json(folder / "train.json", summary)
        for f in ("state.safetensors", "state.json", "null.safetensors"):
            if (ck / f).exists():
                (ck / f).unlink()
        if ck.exists() and not any(ck.iterdir()):
            ck.rmdir()
    dist.barrier()
    return summary


def _init_batches(cfg: LensTrainConfig, dist: Distributed) -> int:
    return max(1, math.ceil(cfg.init_tokens / (cfg.batch_size * cfg.seq_len * dist.world_size)))


def _init_sequences(cfg: LensTrainConfig, dist: Distributed) -> int:
    """Sequences read by the closed-form pass; the refinement reads the sequences after them."""
    return _init_batches(cfg, dist) * cfg.batch_size * dist.world_size


def _initialise(model: Model, bank: LensBank, windows: Windows, cfg: LensTrainConfig,
                dist: Distributed, progress: bool) -> dict:
    """Closed-form / base-rate start (``cfg.init``); returns the null's sums {"psum" [V], "n"} over the
    positions read (float64; the refinement adds its own)."""
    from tqdm import tqdm
    moments = Moments(bank)
    n_batches = _init_batches(cfg, dist)
    calib = []
    n_calib = max(1, cfg.calib_tokens // dist.world_size)  # this rank's share of the calibration positions
    bar = tqdm(total=n_batches, desc="lens init (sufficient statistics)", unit="batch",
               disable=not (progress and dist.primary), file=sys.stderr)
    for i in range(n_batches):
        ids = _global_batch(windows, i, cfg, dist)
        if ids is None:
            break
        R, logp = site_batch(model, ids.to(model.device), bank.all_sites, space="z" if moments.z else "result")
        R, logp, _ = select_positions(R, logp, ids, len(bank.control_sites), control_generator(cfg, dist, i, phase=0))
        moments.update(R, logp)
        if sum(c[1].shape[0] for c in calib) < n_calib:  # calibration positions: spread over the batch
            stride = max(1, logp.shape[0] // n_calib)
            calib.append((R[:, ::stride].clone(), logp[::stride].clone()))
        del R, logp
        bar.update(1)
    bar.close()
    moments.all_reduce(dist)
    c0 = moments.null_logits().to(model.device)
    if cfg.init == "lstsq":
        moments.solve()
        calibrate_scale(bank, torch.cat([c[0] for c in calib], 1)[:, :n_calib],
                        torch.cat([c[1] for c in calib])[:n_calib], c0, dist=dist,
                        progress=progress and dist.primary, z=moments.z)
    elif cfg.init == "base" and bank.cfg.kind != "full":
        b_U = model.b_U.detach().float() if model.b_U is not None else torch.zeros_like(c0)
        b_U = softcap(b_U, model.logit_softcap)
        if bank.cfg.vocab_bias:
            with torch.no_grad():
                bank.c.copy_((c0 - b_U).expand_as(bank.c))
    elif cfg.init == "base":
        with torch.no_grad():
            bank.beta.copy_(c0.expand_as(bank.beta))
    return {"psum": moments.psum.clone(), "n": moments.n.clone()}


def load_null(run_or_folder) -> torch.Tensor:
    """The null lens logits [V] saved by :func:`run_train`."""
    from pathlib import Path
    p = Path(run_or_folder)
    if not (p.name == "lens" or (p / "lenses.json").exists() or (p / "null.safetensors").exists()):
        p = p / "lens"
    p = p / "null.safetensors"
    return read_tensors(p)["null_logits"]
