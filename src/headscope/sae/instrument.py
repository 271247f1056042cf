"""The attention-SAE instrument: ``headscope sae train|eval|analysis|dashboards|ioi|cache|sweep|dfa`` and the
study's ``[sae.*]`` tables (``[sae] name = …`` is shared by all of them)."""

from __future__ import annotations

import json

from ..registry import Instrument
from ..runs import Command, Stage
from .options import (AnalysisOptions, CacheOptions, DashboardOptions, DfaOptions, EvalOptions, ImportOptions,
                      IoiOptions, SweepOptions, TrainOptions, eval_outputs)
from .results import (SAEAnalysisResult, SAEDashboardsResult, SAEEvalResult, SAEImportResult, SAEIoiResult,
                      SAETrainResult)


def _sae_files(name: str) -> list[str]:
    return [f"sae/{name}/cfg.json", f"sae/{name}/sae_weights.safetensors"]


def stage_train(model, run, opts: TrainOptions, progress: bool = True) -> SAETrainResult:
    """sae.train: :func:`headscope.sae.train.run_train` (torchrun-aware), its summary typed."""
    from ..distributed import Distributed
    from .train import run_train
    dist = Distributed()
    if dist.enabled:
        model.hf.to(dist.device(str(model.device)))
    res = run_train(model, run, opts, progress, dist=dist)
    return SAETrainResult(name=res.get("name", opts.sae_name), layer=opts.layer,
                          **{k: res[k] for k in ("n_steps", "tokens", "tokens_per_s", "final") if k in res})


def stage_import(model, run, opts: ImportOptions, progress: bool = True) -> SAEImportResult:
    from .io import import_sae
    sae = import_sae(opts.path, run / f"sae/{opts.name}", model, layer=opts.layer)
    c = sae.cfg
    return SAEImportResult(name=opts.name, layer=c.layer, architecture=c.architecture, d_sae=c.d_sae,
                           head_index=c.head_index)


def stage_eval(model, run, opts: EvalOptions, progress: bool = True) -> SAEEvalResult:
    """sae.eval: :func:`headscope.sae.evaluate.run_eval`, its summary typed."""
    from .evaluate import run_eval
    return SAEEvalResult(**run_eval(model, run, opts, progress=progress))


def stage_dashboards(model, run, opts: DashboardOptions, progress: bool = True) -> SAEDashboardsResult:
    from .dashboards import run_dashboards
    idx = run_dashboards(model, run, opts, progress)
    return SAEDashboardsResult(alive=idx.get("alive"))


def stage_ioi(model, run, opts: IoiOptions, progress: bool = True) -> SAEIoiResult:
    from .ioi import run_ioi
    res = run_ioi(model, run, opts, progress=progress)
    return SAEIoiResult(**{k: v for k, v in res.items() if k != "features"})


def report_json(summary, opts, run) -> None:
    from ..results import Result
    print(json.dumps(summary.to_json() if isinstance(summary, Result) else summary, indent=1, default=str))


def load(model, run, name: str):
    """The SAE ``name`` of the run (:class:`headscope.sae.model.AttnSAE`), checked against the model when
    there is one."""
    from ..errors import HeadscopeError
    from .io import load_sae
    if not (run / "sae" / name).is_dir():
        have = sorted(p.parent.name for p in (run / "sae").glob("*/cfg.json"))
        raise HeadscopeError(f"no SAE '{name}' in {run.path}; SAEs here: {', '.join(have) or 'none'}")
    return load_sae(run / "sae" / name, model)


INSTRUMENT = Instrument(
    name="sae",
    help="sparse autoencoders on attention outputs (z): train, evaluate, attribute",
    stages=(
        Stage("sae.train", TrainOptions, "headscope.sae.instrument:stage_train", result=SAETrainResult,
              writes=lambda o: _sae_files(o.sae_name) + [f"sae/{o.sae_name}/train.json"],
              doc="one attention-output SAE", report="headscope.sae.instrument:report_json"),
        Stage("sae.import", ImportOptions, "headscope.sae.instrument:stage_import", result=SAEImportResult,
              writes=lambda o: _sae_files(o.name),
              doc="a pretrained SAELens / Gemma Scope attention SAE, checked against the model",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.eval", EvalOptions, "headscope.sae.instrument:stage_eval", result=SAEEvalResult,
              reads=lambda o: _sae_files(o.name), writes=lambda o: eval_outputs(o.name),
              doc="SAE metrics: L0, explained variance, KL/CE recovered with bootstrap CIs, density",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.analysis", AnalysisOptions, "headscope.sae.analysis:run_analysis", result=SAEAnalysisResult,
              reads=lambda o: _sae_files(o.name),
              writes=lambda o: [f"sae/{o.name}/attribution.safetensors", f"sae/{o.name}/heads.json"],
              doc="head attribution of the features; polysemanticity of each head against two nulls",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.dashboards", DashboardOptions, "headscope.sae.instrument:stage_dashboards",
              result=SAEDashboardsResult,
              reads=lambda o: _sae_files(o.name), writes=lambda o: [f"sae/{o.name}/dashboards"],
              doc="feature pages: max-activating examples, DFA, logits, density",
              report="headscope.sae.instrument:report_json"),
        Stage("sae.ioi", IoiOptions, "headscope.sae.instrument:stage_ioi", result=SAEIoiResult,
              reads=lambda o: _sae_files(o.name), writes=lambda o: [f"sae/{o.name}/ioi.json"],
              doc="IOI worked example: logit difference when each live feature is ablated at S2",
              report="headscope.sae.instrument:report_json"),
    ),
    commands=(
        Command("sae.cache", CacheOptions, "headscope.sae.commands:cmd_cache",
                doc="run the model once and cache z of several layers to disk shards", new_run=True),
        Command("sae.sweep", SweepOptions, "headscope.sae.commands:cmd_sweep",
                doc="train SAEs of several architectures from one cache; plot the L0 vs CE-recovered frontier",
                new_run=True),
        Command("sae.dfa", DfaOptions, "headscope.sae.commands:cmd_dfa",
                doc="direct feature attribution of one feature on a prompt (and recursive DFA)"),
    ),
    atlas_data="headscope.sae.atlas_data:atlas_data",
    loaders=(("load", "headscope.sae.instrument:load"),),
)
