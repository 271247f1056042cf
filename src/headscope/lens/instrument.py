"""The Attention Lens instrument: ``headscope lens train|eval|show|scan|steer`` and the study's
``[lens.train]`` / ``[lens.eval]`` tables. Options are declared once in lens/options.py (CLI flags, TOML keys,
checks); the commands' bodies are in lens/commands.py."""

from __future__ import annotations

from ..registry import Instrument
from ..runs import Command, Stage
from .options import EvalOptions, ScanOptions, ShowOptions, SteerEvalOptions, SteerOptions, TrainOptions
from .results import LensEvalResult, LensTrainResult


def stage_train(model, run, opts: TrainOptions, progress: bool = True) -> LensTrainResult:
    """lens.train: train the lenses of ``opts.layers``/``opts.heads`` into RUN/lens (torchrun-aware)."""
    from ..distributed import Distributed
    from ..sites import parse_layers, parse_sites
    from .train import run_train
    lens, cfg = opts.configs()
    sites = parse_sites(opts.heads, model) if "." in opts.heads else \
        parse_sites(opts.heads, model, layers=parse_layers(opts.layers, model.n_layers))
    s = run_train(model, run, sites, lens, cfg, fresh=False, progress=progress, dist=Distributed())
    return LensTrainResult(sites=len(sites), steps=s.get("steps"), tokens_seen=s.get("tokens_seen"))


def stage_eval(model, run, opts: EvalOptions, progress: bool = True) -> LensEvalResult:
    """lens.eval: held-out KL and information gain of every lens in RUN/lens."""
    from .evaluate import run_eval
    out = run_eval(model, run, opts, progress=progress)
    keys = ("tokens", "documents", "n_heads", "n_positive_gain", "n_informative", "n_informative_2se", "median_gain",
            "median_gain_se")
    return LensEvalResult(**{k: out.get(k) for k in keys},
                          control_gain=[c["gain"] for c in out["control"].values()])


def report_eval(summary, opts: EvalOptions, run) -> None:
    from ..runs import read_json
    out = read_json(run / "lens" / "eval.json")
    print(f"held-out tokens: {out['tokens']} (position 0 left out) in {out['windows']} windows from {out['documents']} "
          f"documents; null lens KL {out['kl_null']:.3f} bits/token")
    print(f"{'head':>9} {'lens':>7} {'unembed':>8} {'gain':>7} {'±se':>6} {'p':>8}")

    def row(name, v, flag=""):
        se = v["gain_se"] if v["gain_se"] is not None else float("nan")
        p = v["p_value"] if v["p_value"] is not None else float("nan")
        ku = v["kl_unembed"] if v["kl_unembed"] is not None else float("nan")
        print(f"{name:>9} {v['kl_lens']:7.3f} {ku:8.3f} {v['gain']:+7.3f} {se:6.3f} {p:8.2g}{flag}")
    for name, v in sorted(out["per_head"].items(), key=lambda kv: -kv[1]["gain"]):
        row(name, v, "" if v["informative"] else "  (not informative)")
    for name, c in out["control"].items():
        row(name, c, f"  (control: scrambled output of {c['source']}; what 'no information' gives)")
    ctrl = ", ".join(f"{c['gain']:+.3f} ± {c['gain_se'] or float('nan'):.3f}" for c in out["control"].values())
    se = out.get("median_gain_se")
    print(f"{out['n_informative']}/{out['n_heads']} heads informative (one-sided test, Benjamini-Hochberg q = {out['q']}); "
          f"{out['n_informative_2se']} by the gain > 2 SE rule; {out['n_positive_gain']} with a gain above zero; "
          f"median gain {out['median_gain']:+.3f}" + (f" ± {se:.3f}" if se is not None else "") + " bits/token; "
          f"control lens {ctrl}")
    print(f"→ {run / 'lens' / 'eval.json'}")


def load(model, run, allow_other_checkpoint: bool = False):
    """The run's lens bank (:class:`headscope.lens.lenses.LensBank`, its sites in ``bank.sites``) for the
    model; lenses made for another model are refused unless ``allow_other_checkpoint`` (same shapes, other
    unembedding)."""
    from ..errors import HeadscopeError
    from .lenses import load_bank
    if model is None:
        raise HeadscopeError(f"loading lenses needs the model: open_run('{run.path}', model=...)")
    if not (run / "lens" / "lenses.json").is_file():
        raise HeadscopeError(f"no lenses in {run.path}: run `run.lens.train()` first")
    return load_bank(model, run / "lens", allow_other_checkpoint=allow_other_checkpoint)[0]


def _steer_result():
    from .steer_eval import SteerEvalResult
    return SteerEvalResult


LENS_FILES = ["lens/lenses.json", "lens/lenses.safetensors", "lens/null.safetensors", "lens/train.json"]
"""The bank, its null lens and its training summary (train.json is written last)."""

INSTRUMENT = Instrument(
    name="lens",
    help="Attention Lens: train, evaluate and apply a lens for every head",
    description="Read each attention head's output as tokens through a learned lens (arXiv 2310.16270), "
                "judged against the unembedding and a null lens.",
    stages=(
        Stage("lens.train", TrainOptions, "headscope.lens.instrument:stage_train",
              writes=lambda o: LENS_FILES, result=LensTrainResult,
              doc="per-head lenses (closed-form start + KL refinement)"),
        Stage("lens.eval", EvalOptions, "headscope.lens.instrument:stage_eval",
              reads=lambda o: LENS_FILES, writes=lambda o: ["lens/eval.json"], result=LensEvalResult,
              doc="held-out KL of each lens against the unembedding baseline and the null lens",
              report="headscope.lens.instrument:report_eval"),
        Stage("lens.steer-eval", SteerEvalOptions, "headscope.lens.steer_eval:stage_steer_eval",
              reads=lambda o: LENS_FILES + ([] if o.heads else ["lens/eval.json"]),
              writes=lambda o: ["lens/steer_eval.json"],
              doc="steering through heads against a random direction and residual-stream steering",
              report="headscope.lens.steer_eval:report_steer_eval", result=_steer_result()),
    ),
    commands=(
        Command("lens.show", ShowOptions, "headscope.lens.commands:show_cmd",
                doc="per position, the top-k tokens of each head's lens"),
        Command("lens.scan", ScanOptions, "headscope.lens.commands:scan_cmd",
                doc="how often each head's lens puts listed tokens in its top-k"),
        Command("lens.steer", SteerOptions, "headscope.lens.commands:steer_cmd",
                doc="add a token direction to a head, or scale/ablate heads; generations before/after", new_run=True),
    ),
    atlas_data="headscope.lens.atlas_data:atlas_data",
    loaders=(("load", "headscope.lens.instrument:load"),),
)
