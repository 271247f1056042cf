"""Time (and optionally profile) the SAE stages ``sae.analysis`` and ``sae.dashboards`` on an existing run
directory, with the options its study recorded (``RUN/stages/<stage>.json``).

    PYTHONPATH=src python bench/sae_stages.py RUN [--stages sae.analysis,sae.dashboards] [--profile DIR]

RUN must hold ``sae/<name>/`` (e.g. a copy of a demo run: the stages rewrite their outputs there).
Prints one line per stage: wall seconds and CPU seconds; ``--profile`` writes DIR/<stage>.prof (cProfile)
and prints its top 25 functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--stages", default="sae.analysis,sae.dashboards")
    ap.add_argument("--profile", default=None, help="folder for the .prof files")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from headscope.models.load import load_model
    from headscope.registry import stages
    from headscope.runs import RunDir, read_json, run_stage
    by_name = {st.name: st for st in stages()}
    run_path = Path(a.run)
    model = load_model(read_json(run_path / "study.json")["model"]["spec"] if (run_path / "study.json").is_file()
                       else "default")
    run = RunDir(run_path, model.identity())
    for name in a.stages.split(","):
        st = by_name[name]
        rec = read_json(run_path / "stages" / f"{name}.json")
        opts = st.options(**rec["options"])
        prof = cProfile.Profile() if a.profile else None
        t, c = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        run_stage(model, run, st, opts, force=True, progress=False)
        if prof:
            prof.disable()
        print(f"{name}: {time.perf_counter() - t:.2f} s wall, {time.process_time() - c:.2f} s CPU "
              f"({torch.get_num_threads()} threads)", flush=True)
        if prof:
            Path(a.profile).mkdir(parents=True, exist_ok=True)
            prof.dump_stats(Path(a.profile) / f"{name}.prof")
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
            print(s.getvalue(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
