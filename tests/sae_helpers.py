"""Shared fixtures-as-functions for the SAE tests (a small text corpus, tiny models)."""

from __future__ import annotations

from pathlib import Path


def small_corpus(tmp_path: Path, n_topics: int = 40) -> str:
    """A small text corpus file (Python's doc topics) for tiny-model runs; returns its path."""
    from pydoc_data import topics
    import json
    p = tmp_path / "corpus.jsonl"
    if not p.exists():
        keys = sorted(topics.topics)[:n_topics]
        p.write_text("\n".join(json.dumps({"text": topics.topics[k]}) for k in keys) + "\n")
    return str(p)
