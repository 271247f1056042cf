"""``headscope export neuronpedia|hf``: files for Neuronpedia's importer and a Hugging Face SAE repo."""

from __future__ import annotations

from pathlib import Path

from ..cli import add_out_arg


def register(sub) -> None:
    from ..explain.cli import _dataclass_args
    from .hf import HFOptions
    from .neuronpedia import NeuronpediaOptions
    p = sub.add_parser("export", help="write results in other tools' layouts (files only, nothing uploaded)")
    es = p.add_subparsers(dest="export_command", metavar="SUBCOMMAND", required=True)
    n = es.add_parser("neuronpedia", help="feature dashboards + explanations in Neuronpedia's import layout")
    _dataclass_args(n, NeuronpediaOptions); add_out_arg(n)
    n.add_argument("--to", required=True, help="folder to write <model_id>/<source_id>/ into")
    n.set_defaults(func=_neuronpedia)
    h = es.add_parser("hf", help="an SAE folder ready to upload as a Hugging Face repo (SAELens format + README)")
    _dataclass_args(h, HFOptions); add_out_arg(h)
    h.add_argument("--to", required=True, help="the repository folder to create")
    h.set_defaults(func=_hf)


def _run(args):
    from ..runs import RunDir
    return RunDir(args.out)


def _neuronpedia(args) -> int:
    from ..explain.cli import _opts
    from .neuronpedia import NeuronpediaOptions, export_neuronpedia
    r = export_neuronpedia(_run(args), Path(args.to), _opts(args, NeuronpediaOptions))
    print(f"{r['features']} features, {r['activations']} activations, {r['explanations']} explanations -> {r['folder']}")
    return 0


def _hf(args) -> int:
    from ..explain.cli import _opts
    from .hf import HFOptions, export_hf
    r = export_hf(_run(args), Path(args.to), _opts(args, HFOptions))
    print(f"{', '.join(r['files'])} + README.md -> {r['folder']} (sae_id {r['sae_id']})")
    return 0
