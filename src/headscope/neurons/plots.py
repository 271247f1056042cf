"""PNG histograms (matplotlib, Agg backend): explanation scores, ablation drops."""

from __future__ import annotations

import io
from pathlib import Path

from ..runs import atomic_write_bytes


def histogram_png(path: Path, series: dict[str, list[float]], title: str, xlabel: str, bins: int = 20) -> None:
    """Overlaid histograms of the named series (density), written atomically to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    vals = [v for s in series.values() for v in s]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    for name, s in series.items():
        if s:
            ax.hist(s, bins=bins, range=(lo, hi), alpha=0.5, density=True, label=f"{name} (n={len(s)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if vals:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
