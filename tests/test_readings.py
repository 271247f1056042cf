"""Numbers that cannot drift: every figure README/docs cite as a link to docs/readings.md#row must be
the value in that row; bench/readings.py writes the rows from a run's stage records."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"\[([^\]]+)\]\((?:docs/)?readings\.md#([\w-]+)\)")


def _readings():
    spec = importlib.util.spec_from_file_location("readings", ROOT / "bench" / "readings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def citations(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in CITE.finditer(text)]


def test_cited_figures_are_the_readings():
    r = _readings()
    docs = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    cited = [(p, v, a) for p in docs if p.name != "readings.md" for v, a in citations(p.read_text())]
    path = ROOT / "docs" / "readings.md"
    table = r.parse(path.read_text()) if path.is_file() else {}
    bad = [f"{p.name}: [{v}] → #{a} is {table.get(a, 'missing')}" for p, v, a in cited if table.get(a) != v]
    assert not bad, "figures that are not in docs/readings.md:\n" + "\n".join(bad)


def test_readings_from_stage_records_and_the_check_catches_drift(tmp_path):
    """bench/readings.py flattens the stage records; a citation of another value, or of a missing row,
    is caught by the same comparison the docs test makes."""
    r = _readings()
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "stages/explain.score.json").write_text(json.dumps({
        "stage": "explain.score", "options": {"max_per_class": 20}, "seconds": 69.41,
        "summary": {"by_neuron": {"mean": 0.59312, "low": 0.55, "n": 12}, "note": "text"}}))
    (run / "study.json").write_text(json.dumps({"wall_seconds": 543.2, "stages": {
        "explain.score": {"seconds": 70.0}, "atlas": {"seconds": 20.1}}}))    # the record's own seconds win
    out = tmp_path / "readings.md"
    assert r.main([str(run), "--out", str(out)]) == 0
    table = r.parse(out.read_text())
    assert table == {"explain-score-by-neuron-low": "0.550", "explain-score-by-neuron-mean": "0.593",
                     "explain-score-by-neuron-n": "12", "explain-score-seconds": "69.41",
                     "study-wall-seconds": "543", "atlas-seconds": "20.10"}
    assert '"max_per_class": 20' in out.read_text()                 # the run's config travels with it
    doc = "E per neuron [0.593](readings.md#explain-score-by-neuron-mean), [0.60](readings.md#explain-score-by-neuron-mean)"
    got = [(v, table.get(a)) for v, a in citations(doc)]
    assert got == [("0.593", "0.593"), ("0.60", "0.593")]          # the second one has drifted
    assert r.fmt(110.4) == "110" and r.fmt(1.5) == "1.50" and r.fmt(True) == "1"
    with pytest.raises(SystemExit):
        r.main([str(tmp_path / "empty"), "--out", str(out)])


MEASURED = re.compile(r"(?<![\w.#-])[+−-]?\d+\.\d{3,}(?![\w.])|\[[+−-]?\d+\.\d+, [+−-]?\d+\.\d+\]")
"""A measured figure as the README prints one: three or more decimals (0.556), or an interval [0.52, 0.59]."""
RUN_SECTIONS = ("### `headscope sae", "### `headscope neurons", "### `headscope explain features")
"""README sections that report what the demo run measured: their figures must be cited from readings.md."""


def uncited(text: str) -> list[str]:
    """The measured-looking figures of ``text`` outside citations of docs/readings.md."""
    return MEASURED.findall(CITE.sub("", text))


VERDICT_QUOTE = re.compile(r'Head (\d+\.\d+)\'s verdict, as its atlas page leads with it: \*"(.+?)"\*', re.S)
"""The README's quote of one head's verdict: checked against the run itself (test below), not the readings."""


def test_run_figures_in_the_readme_are_cited():
    """Issue 21: the README's "What the run reads" and instrument sections quote no figure that is not a cited
    reading (they once quoted old reduced runs); a figure typed by hand there fails this test."""
    text = (ROOT / "README.md").read_text()
    start = text.index("**What the run reads**")
    bad = [f"What the run reads: {f}" for f in uncited(VERDICT_QUOTE.sub("", text[start:text.index("\n### ", start)]))]
    for head in RUN_SECTIONS:
        start = text.index(head)
        end = text.find("\n### ", start + 1)
        bad += [f"{head}…: {f}" for f in uncited(text[start:end])]
    assert not bad, "figures not cited from docs/readings.md:\n" + "\n".join(bad)
    assert uncited("E 0.516 [0.481, 0.553] vs [0.556](readings.md#x) at q = 0.05") == ["0.516", "[0.481, 0.553]"]


def test_the_readme_verdict_quote_is_the_runs_verdict():
    """The verdict the README quotes is the one the demo run gives that head (its first sentence, figures
    included); needs the run: ``HEADSCOPE_DEMO_RUN=RUN`` (skipped otherwise)."""
    import os
    run = os.environ.get("HEADSCOPE_DEMO_RUN")
    if not run or not (Path(run) / "heads" / "roles.json").is_file():
        pytest.skip("HEADSCOPE_DEMO_RUN does not name a demo run with heads/roles.json")
    from headscope.heads.verdict import run_verdicts
    m = VERDICT_QUOTE.search((ROOT / "README.md").read_text())
    assert m, "the README quotes no head's verdict"
    quoted = " ".join(m.group(2).split())
    verdict = run_verdicts(Path(run))[m.group(1)]
    assert " ".join(verdict.text.split()).startswith(quoted), (quoted, verdict.text)
