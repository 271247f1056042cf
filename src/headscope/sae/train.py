"""Training an attention-output SAE: ``run_train(model, run, opts: TrainOptions, progress) -> dict``.

Loop: batches from :class:`~headscope.sae.store.ShuffledBatches` (a pure function of (seed, step)),
inputs scaled by one constant ``c = sqrt(d_in) / E‖z‖`` (estimated on the first block, so L1
coefficients carry across models; folded out of the weights when saving), Adam (β = 0.9, 0.99 as the
reference code), linear warm-up then linear decay over the last ``decay_frac`` of steps, L1
coefficient warm-up, decoder rows kept at unit norm with the parallel gradient removed.

Checkpoints (``sae/<name>/checkpoint/state.safetensors``, one file replaced atomically) hold the parameters, the
Adam moments, the dead-feature counters, the step and the history; a second run with the same options
continues from the step after the checkpoint and gives the same weights as an uninterrupted run.

Under ``torchrun`` (gloo on CPU, nccl on GPU) each rank streams its own blocks, gradients and
feature-firing counts are averaged/summed over ranks, rank 0 writes files.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data import TokenCorpus
from ..distributed import Distributed
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, read_checkpoint, write_checkpoint, write_json
from ..schedule import lr_at
from .options import TrainOptions
from .io import save_sae
from .model import AttnSAE, SAEConfig
from .store import CacheSource, ModelSource, ShuffledBatches


def _lr(cfg: TrainOptions, step: int, n_steps: int) -> float:
    """Learning rate at ``step``: linear warm-up, constant, linear decay over the last ``decay_frac``."""
    return lr_at(cfg.lr, step, n_steps, cfg.warmup_steps, cfg.decay_frac)


def sae_dir(run: RunDir, name: str) -> Path:
    """Folder of SAE ``name`` in a run directory."""
    return run / f"sae/{name}"


def _make_source(model: Model, cfg: TrainOptions):
    if cfg.cache:
        return CacheSource(cfg.cache, [cfg.layer], model)
    corpus = TokenCorpus(model, cfg.corpus, seq_len=cfg.seq_len)
    return ModelSource(model, corpus, [cfg.layer], buffer_tokens=cfg.buffer_tokens, batch_size=cfg.model_batch)


CHECKPOINT = "state.safetensors"
"""The checkpoint file in ``sae/<name>/checkpoint/``: tensors and the JSON state in one file, replaced
atomically (:func:`headscope.runs.write_checkpoint`), so a kill at any moment resumes."""


def _save_checkpoint(path: Path, sae: AttnSAE, opt: torch.optim.Optimizer, state: dict, since_fired: torch.Tensor):
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(v).reshape(-1) if key == "step" else v
    tensors["since_fired"] = since_fired
    tensors["fired_window"] = state.pop("_fired_window")
    write_checkpoint(path / CHECKPOINT, tensors, state)
    (path / "state.json").unlink(missing_ok=True)  # the two-file format of earlier versions


def _read_checkpoint(path: Path, device) -> tuple[dict, dict] | None:
    """``(tensors, state)`` of the checkpoint in ``path``; None when there is none (or only a checkpoint of
    the earlier two-file format, which a kill could leave inconsistent: training starts over)."""
    return read_checkpoint(path / CHECKPOINT, device=str(device))


def _load_checkpoint(t: dict, state: dict, sae: AttnSAE, opt: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
    sd = opt.state_dict()
    new_state = {}
    for key, v in t.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            new_state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    sd["state"] = new_state
    opt.load_state_dict(sd)
    return t["since_fired"], t["fired_window"]


@torch.no_grad()
def _resample(sae: AttnSAE, rows: torch.Tensor, dead: torch.Tensor, opt: torch.optim.Optimizer, g: torch.Generator) -> int:
    """Anthropic/Kissane resampling: dead features get the direction of inputs sampled ∝ loss²;
    encoder rows are scaled to 0.2 × the mean alive encoder norm; their Adam moments are reset."""
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    pool = rows[torch.randperm(rows.shape[0], generator=g)[:8192]].to(sae.W_dec.device)
    loss = (sae(pool).recon - pool).pow(2).sum(-1)
    p = loss.pow(2)
    if not torch.isfinite(p).all() or p.sum() <= 0:
        return 0
    pick = torch.multinomial(p.cpu(), idx.numel(), replacement=idx.numel() > pool.shape[0], generator=g)
    x = pool[pick] - sae.b_dec
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[idx] = x
    sae.W_enc[:, idx] = (x * 0.2 * enc_norm).T
    sae.b_enc[idx] = 0.0
    for p_ in (sae.W_enc, sae.b_enc, sae.W_dec):
        st = opt.state.get(p_, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                if p_ is sae.W_enc:
                    st[key][:, idx] = 0
                else:
                    st[key][idx] = 0
    return int(idx.numel())


@dataclass
class _Trainer:
    """Everything one training run holds: the SAE and its optimizer, the batches, and the state a
    checkpoint saves (step, input scale, history, firing counters, resamples, elapsed time)."""

    cfg: TrainOptions
    scfg: SAEConfig
    sae: AttnSAE
    opt: torch.optim.Optimizer
    batches: ShuffledBatches
    dist: Distributed
    n_steps: int
    dead_tokens: int
    step0: int = 0
    scale: float = 1.0
    history: list = field(default_factory=list)
    n_resampled: int = 0
    elapsed: float = 0.0
    since_fired: torch.Tensor | None = None
    """[F] tokens since each feature fired."""
    fired_window: torch.Tensor | None = None
    """[F] firings since the last resample."""


def _build(model: Model, layer: int, cfg: TrainOptions, source, dist: Distributed) -> _Trainer:
    """Check the options against the model and set up the SAE, its optimizer and the batches."""
    model.check_layer(layer)
    try:
        widths = [int(v) for v in cfg.matryoshka_widths.split(",") if v.strip()]
    except ValueError:
        raise HeadscopeError(f"matryoshka widths must be comma-separated integers, got '{cfg.matryoshka_widths}'") from None
    device = model.device
    dist.init(str(device))
    d_in = model.n_heads * model.d_head
    scfg = SAEConfig(d_in=d_in, d_sae=cfg.resolved_d_sae(d_in), n_heads=model.n_heads, d_head=model.d_head,
                     layer=layer, architecture=cfg.architecture, k=cfg.k, model=model.identity(),
                     context_size=cfg.seq_len, dataset=cfg.corpus, matryoshka_widths=widths,
                     bandwidth=cfg.bandwidth)
    source = source if source is not None else _make_source(model, cfg)
    if source.d_in != d_in:
        raise HeadscopeError(f"activations have width {source.d_in}, but z of {model.name} has d_in {d_in}")
    batches = ShuffledBatches(source, layer, cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    sae = AttnSAE(scfg, seed=cfg.seed).to(device)
    # fused Adam: one pass over each parameter per step instead of ~8 (profiled: the foreach Adam was
    # ~20 % of a TopK step on CPU)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), fused=True)
    return _Trainer(cfg, scfg, sae, opt, batches, dist, n_steps=cfg.n_steps(dist.world_size),
                    dead_tokens=cfg.dead_tokens or max(cfg.batch_size * 20, min(10_000_000, cfg.n_tokens // 10)),
                    since_fired=torch.zeros(scfg.d_sae, dtype=torch.long, device=device),
                    fired_window=torch.zeros(scfg.d_sae, dtype=torch.long, device=device))


def _start(t: _Trainer, ck: Path, out: Path, layer: int, device) -> None:
    """Resume from the checkpoint ``ck`` when it holds this training, else initialise: the input scale
    (E‖x‖ = sqrt(d_in) on the first block) and b_dec, broadcast to every rank."""
    cfg, dist = t.cfg, t.dist
    saved = _read_checkpoint(ck, device)
    if saved is None and ck.exists():
        shutil.rmtree(ck, ignore_errors=True)  # an old-format or empty checkpoint folder
    if saved is not None and saved[1].get("config") != cfg.result_keys():
        # a checkpoint resumes only the same training; the stage contract reruns us when the options changed
        print(f"headscope: note: {ck} was made with other options: starting over", file=sys.stderr)
        shutil.rmtree(ck, ignore_errors=True)
        saved = None
    if saved is not None:
        tensors, state = saved
        since_fired, t.fired_window = _load_checkpoint(tensors, state, t.sae, t.opt)
        if state.get("world_size", 1) != dist.world_size:
            raise HeadscopeError(f"{out} holds a checkpoint made with {state.get('world_size', 1)} processes, not "
                                 f"{dist.world_size}: resume with the same number of processes")
        t.since_fired = since_fired.to(device)
        t.step0, t.scale, t.history = int(state["step"]), float(state["scale"]), state["history"]
        t.n_resampled, t.elapsed = int(state.get("resamples", 0)), float(state.get("elapsed_s", 0.0))
        return
    first = t.batches.block_rows(0).to(device)
    if not torch.isfinite(first).all():
        raise HeadscopeError(f"non-finite z activations at layer {layer} in the first block (before step 0)")
    d_in = t.scfg.d_in
    scale_t = torch.tensor(math.sqrt(d_in) / first.norm(dim=1).mean().clamp_min(1e-12).item(), device=device)
    dist.broadcast(scale_t)
    t.scale = float(scale_t)
    if cfg.init_b_dec == "mean":
        with torch.no_grad():
            t.sae.b_dec.copy_(first.mean(0) * t.scale)
    for p in t.sae.parameters():
        dist.broadcast(p.data)


def _step(t: _Trainer, step: int, x: torch.Tensor, layer: int):
    """One optimisation step on the scaled batch ``x`` [N, d_in]; returns (losses, forward output)."""
    cfg, sae, opt, dist = t.cfg, t.sae, t.opt, t.dist
    for pg in opt.param_groups:
        pg["lr"] = _lr(cfg, step, t.n_steps)
    ramp = min(1.0, (step + 1) / max(1, int(cfg.l1_warmup_frac * t.n_steps)))
    o = sae.train_forward(x)
    losses = sae.loss(x, o, l1_coeff=cfg.l1_coeff * ramp, dead=t.since_fired >= t.dead_tokens, k_aux=cfg.k_aux,
                      aux_coeff=cfg.aux_coeff, l0_coeff=cfg.l0_coeff * ramp)
    if not torch.isfinite(losses["loss"]):   # checked on the loss: one scalar, not a pass over x
        if not torch.isfinite(x).all():
            raise HeadscopeError(f"non-finite z activations at layer {layer} in the batch of step {step}")
        raise HeadscopeError(f"SAE loss became {losses['loss'].item()} at step {step}; lower --lr")
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    dist.all_reduce_grads(sae.parameters())
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()
    sae.after_step(o, cfg.threshold_lr)
    with torch.no_grad():
        fired = o.fired()
        dist.all_reduce(fired, "sum")
        t.since_fired = torch.where(fired > 0, torch.zeros_like(t.since_fired),
                                    t.since_fired + x.shape[0] * dist.world_size)
        t.fired_window += fired
    return losses, o


def _maybe_resample(t: _Trainer, step: int) -> None:
    """Standard SAEs: resample dead features every ``resample_every`` steps, at most ``resample_max`` times."""
    cfg = t.cfg
    if t.sae.arch.resamples_dead and cfg.resample_every and (step + 1) % cfg.resample_every == 0 \
            and t.n_resampled < cfg.resample_max and step + 1 < t.n_steps:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        n_dead = _resample(t.sae, t.batches.block_rows(step) * t.scale, t.fired_window == 0, t.opt, g)
        for p in t.sae.parameters():
            t.dist.broadcast(p.data)
        t.fired_window.zero_()
        t.n_resampled += 1
        t.history.append({"step": step + 1, "resampled": n_dead})


def _summary(t: _Trainer, name: str, layer: int, final: AttnSAE, seconds: float) -> dict:
    """train.json: the weights' fingerprint, the configuration, throughput and the history."""
    import hashlib
    cfg, dist = t.cfg, t.dist
    fp = hashlib.sha1(b"".join(getattr(final, k).detach().contiguous().numpy().tobytes()
                               for k in final.param_names())).hexdigest()[:16]
    return {"weights_sha1": fp, "name": name, "layer": layer, "sae": t.scfg.to_dict() | {"model": None},
            "config": asdict(cfg), "n_steps": t.n_steps, "tokens": t.n_steps * cfg.batch_size * dist.world_size,
            "world_size": dist.world_size, "input_scale": t.scale, "elapsed_s": t.elapsed,
            "tokens_per_s": ((t.n_steps - t.step0) * cfg.batch_size * dist.world_size / max(1e-9, seconds))
            if t.n_steps > t.step0 else None,   # None: everything came from the checkpoint
            "n_documents": _documents_read(t),
            "final": next((h for h in reversed(t.history) if "l0" in h), {}), "history": t.history}


def _documents_read(t: _Trainer) -> int | None:
    """Distinct corpus documents the training blocks came from (None for a cache or in-memory source)."""
    src = t.batches.source
    if not hasattr(src, "n_documents"):
        return None
    blocks = -(-t.n_steps // t.batches.bpb) * t.dist.world_size
    return src.n_documents(blocks)


def run_train(model: Model, run: RunDir, opts: TrainOptions, progress: bool = True, *,
              stop_at_step: int | None = None, dist: Distributed | None = None, source=None) -> dict:
    """Train (or resume) the SAE ``opts`` describes on z of ``opts.layer``.

    Writes ``sae/<name>/`` (SAELens format: ``cfg.json``, ``sae_weights.safetensors``), ``train.json``
    (config, history, throughput) and the checkpoint folder. ``stop_at_step`` stops after that many
    steps with a checkpoint, as an interrupt would (used by the resume test). ``dist``: the torchrun
    process group (default: from the environment). ``source``: any block source (``ModelSource``,
    ``CacheSource``, ``MemorySource``) to use instead of the one the options name. Returns train.json's
    dict. The pieces: :func:`_build`, :func:`_start`, :func:`_step`, :func:`_maybe_resample`, :func:`_summary`.
    """
    from tqdm import tqdm
    cfg, layer, name = opts, opts.layer, opts.sae_name
    dist = dist or Distributed()
    out = sae_dir(run, name)
    ck = out / "checkpoint"
    t = _build(model, layer, cfg, source, dist)
    _start(t, ck, out, layer, model.device)
    bar = tqdm(total=t.n_steps, initial=t.step0, desc=f"SAE {name} (layer {layer})", unit=" step", file=sys.stderr,
               disable=not (progress and dist.primary))
    t0 = time.time()
    stop = t.n_steps if stop_at_step is None else min(t.n_steps, stop_at_step)
    acc = {"loss": 0.0, "mse": 0.0, "l0": 0.0, "fve": 0.0, "n": 0}
    step = t.step0
    for step, x in t.batches.iterate(t.step0, stop):
        x = x.to(model.device) * t.scale
        losses, o = _step(t, step, x, layer)
        with torch.no_grad():
            acc["loss"] += losses["loss"].item()
            acc["mse"] += losses["mse"].item()
            acc["l0"] += o.l0()
            acc["n"] += 1
            if (step + 1) % 10 == 0 or step + 1 == stop:   # FVE of the logged step's batch (a pass over x)
                var = x.var(0, unbiased=False).sum() * x.shape[0]
                acc["fve"] = 1 - (losses["mse"].item() * x.shape[0] / var.clamp_min(1e-12)).item()
        _maybe_resample(t, step)
        if (step + 1) % 10 == 0 or step + 1 == stop:
            n = max(1, acc["n"])
            rec = {"step": step + 1, "loss": acc["loss"] / n, "mse": acc["mse"] / n, "l0": acc["l0"] / n,
                   "fve": acc["fve"], "dead_frac": float((t.since_fired >= t.dead_tokens).float().mean()),
                   "lr": _lr(cfg, step, t.n_steps)}
            t.history.append(rec)
            acc = {k: 0.0 for k in acc} | {"n": 0}
            bar.set_postfix(L0=f"{rec['l0']:.1f}", MSE=f"{rec['mse']:.3g}", FVE=f"{rec['fve']:.3f}",
                            dead=f"{rec['dead_frac']:.2f}")
        bar.update(1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop:
            if dist.primary:
                _save_checkpoint(ck, t.sae, t.opt, {"step": step + 1, "scale": t.scale, "history": t.history,
                                                    "resamples": t.n_resampled, "config": cfg.result_keys(),
                                                    "world_size": dist.world_size,
                                                    "elapsed_s": t.elapsed + time.time() - t0,
                                                    "_fired_window": t.fired_window}, t.since_fired)
            dist.barrier()
    bar.close()
    seconds = time.time() - t0
    t.elapsed += seconds
    done_steps = step + 1 if stop > t.step0 else t.step0
    if done_steps < t.n_steps:
        return {"name": name, "stopped_at_step": done_steps, "n_steps": t.n_steps}
    final = fold_scale(t.sae, t.scale)
    summary = _summary(t, name, layer, final, seconds)
    if dist.primary:
        save_sae(final, out)
        write_json(out / "train.json", summary)
    dist.barrier()
    return summary


@torch.no_grad()
def fold_scale(sae: AttnSAE, scale: float) -> AttnSAE:
    """An SAE on raw z equivalent to ``sae`` trained on ``scale · z`` (ReLU, TopK and JumpReLU are
    positively homogeneous once the threshold scales too, so f_raw = f / scale with W unchanged,
    b_enc, b_dec and threshold / scale)."""
    new = AttnSAE(sae.cfg).to(sae.W_dec.device)
    new.load_state_dict(sae.state_dict())
    new.b_enc.div_(scale)
    new.b_dec.div_(scale)
    if hasattr(new, "threshold"):
        new.threshold.div_(scale)
    return new.cpu()
