"""The measured figures of a run, as docs/readings.md: every number README/docs quote comes from here.

    PYTHONPATH=src python bench/readings.py RUN [--out docs/readings.md]

Reads every stage record ``RUN/stages/<stage>.json`` (:func:`headscope.runs.run_stage` writes them: the
stage's options, seconds and summary) and ``RUN/study.json`` when there is one (``study.wall_seconds``, and the
seconds of steps without a record, e.g. ``atlas.seconds``), and writes one table row per number:
``<stage>.seconds`` and ``<stage>.<path in its summary>`` (e.g. ``explain.score.by_neuron.mean``), each with an HTML anchor
(dots → dashes), followed by the options of every stage (the run's config). README and docs cite a
figure as a link to its row, ``[0.088](docs/readings.md#explain-score-features-detection-difference-mean)``,
and ``tests/test_readings.py`` fails when a cited figure is not the value in readings.md (or its row is
missing), so a rerun that changes a number shows up as a failing test until the text is updated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def fmt(v) -> str:
    """How a reading is written (and must be cited): ints as they are; floats with 3 decimals below 1,
    2 below 100, none above."""
    if isinstance(v, bool) or isinstance(v, int):
        return str(int(v))
    a = abs(v)
    return f"{v:.3f}" if a < 1 else (f"{v:.2f}" if a < 100 else f"{v:.0f}")


def anchor(key: str) -> str:
    return key.replace(".", "-").replace("_", "-").lower()


def flatten(obj, prefix: str, out: dict) -> None:
    """Numbers of a JSON value under dotted keys (lists by index, at most 8 entries)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, list) and len(obj) <= 8:
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}", out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == obj:
        out[prefix] = obj


def readings(run: Path) -> tuple[dict, dict]:
    """({key: number}, {stage: options}) from the stage records of ``run``."""
    recs = sorted((run / "stages").glob("*.json"))
    if not recs:
        raise SystemExit(f"no stage records in {run / 'stages'}: run a study (headscope demo / study) first")
    values, config = {}, {}
    for p in recs:
        r = json.loads(p.read_text())
        name = r.get("stage", p.stem)
        config[name] = r.get("options", {})
        if "seconds" in r:
            values[f"{name}.seconds"] = r["seconds"]
        flatten(r.get("result") or r.get("summary") or {}, name, values)
    study = run / "study.json"                   # the study's wall time and the steps without a record (atlas)
    if study.is_file():
        s = json.loads(study.read_text())
        if isinstance(s.get("wall_seconds"), (int, float)):
            values["study.wall_seconds"] = s["wall_seconds"]
        for name, st in (s.get("stages") or {}).items():
            if f"{name}.seconds" not in values and isinstance(st, dict) and isinstance(st.get("seconds"), (int, float)):
                values[f"{name}.seconds"] = st["seconds"]
    return values, config


def render(run: Path, values: dict, config: dict) -> str:
    lines = ["# Readings", "", f"Measured by `bench/readings.py {run}` from the run's stage records; README and docs "
             "cite these rows (tests/test_readings.py checks every citation). Regenerate after a new demo run.", "",
             "| reading | value |", "|---|---|"]
    lines += [f'| <a id="{anchor(k)}"></a>`{k}` | {fmt(v)} |' for k, v in sorted(values.items())]
    lines += ["", "## Config", "", "The options of every stage of the run:", "", "```json",
              json.dumps(config, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def parse(text: str) -> dict[str, str]:
    """{anchor: value as written} of a readings.md."""
    import re
    return {m.group(1): m.group(2).strip() for m in re.finditer(r'<a id="([\w-]+)"></a>`[^`]*` \| ([^|]+)\|', text)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "readings.md"))
    a = ap.parse_args(argv)
    run = Path(a.run)
    values, config = readings(run)
    Path(a.out).write_text(render(run, values, config))
    print(f"{len(values)} readings of {len(config)} stages -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
