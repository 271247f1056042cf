"""Corpora: files, folders, JSONL, packing, split, caching, bad input."""

import json

import numpy as np
import pytest
import torch

from headscope import HeadscopeError
from headscope.data import TokenCorpus, iter_documents
from headscope.testing import tiny_model

PROSE = ("The quick brown fox jumps over the lazy dog. " * 40).strip()


@pytest.fixture
def model():
    return tiny_model("gpt2")


def _docs(n):
    return [f"Document number {i}. " + PROSE for i in range(n)]


def test_text_folder_and_jsonl_corpora(model, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(_docs(30)):
        (folder / f"{i:02d}.txt").write_text(d)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d}) for d in _docs(30)) + "\n")
    a = TokenCorpus(model, str(folder), seq_len=32, holdout=0.2, progress=False)
    b = TokenCorpus(model, str(jl), seq_len=32, holdout=0.2, progress=False)
    assert a.n_tokens("train") + a.n_tokens("heldout") == b.n_tokens("train") + b.n_tokens("heldout")
    # the stream is exactly the documents' tokens, each followed by EOS
    ref = []
    for d in _docs(30):
        ref += model.tokenizer(d, add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]
    got = np.concatenate([np.asarray(b._stream("train")), np.asarray(b._stream("heldout"))])
    assert sorted(got.tolist()) == sorted(ref)


def test_packing_split_and_resume(model, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in _docs(60)))
    c = TokenCorpus(model, str(f), seq_len=16, holdout=0.25, progress=False)
    assert c.n_sequences("heldout") > 0 and c.n_sequences("train") > c.n_sequences("heldout")
    batches = list(c.batches("train", batch_size=4, max_tokens=16 * 10))
    assert sum(len(b) for b in batches) == 10
    assert all(b.shape[1] == 16 and (b[:, 0] == model.bos_id).all() for b in batches)
    # stream continuity: sequence i+1 continues where sequence i ended
    s0, s1 = c.sequence("train", 0), c.sequence("train", 1)
    stream = np.asarray(c._stream("train"))
    assert s0[1:].tolist() == stream[:15].tolist() and s1[1:].tolist() == stream[15:30].tolist()
    # resuming from sequence 4 yields the same batches as an uninterrupted run
    full = torch.cat(list(c.batches("train", batch_size=2, max_tokens=16 * 8)))
    rest = torch.cat(list(c.batches("train", batch_size=2, max_tokens=16 * 4, start=4)))
    assert torch.equal(full[4:], rest)


def test_split_is_by_document_and_deterministic(model, tmp_path, monkeypatch):
    """Each document lands whole in one split, chosen by the SHA-1 of its text (recomputed here), in
    corpus order; a build from scratch (a fresh cache) gives the same streams."""
    import hashlib
    docs = [f"Document number {i}: " + " ".join(["word"] * (5 + i % 7)) for i in range(60)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    c = TokenCorpus(model, str(f), seq_len=16, holdout=0.25, progress=False)
    eos = model.tokenizer.eos_token_id
    expect = {"train": [], "heldout": []}
    for d in docs:
        h = int(hashlib.sha1(d.encode()).hexdigest()[:8], 16) / 2 ** 32
        expect["heldout" if h < 0.25 else "train"] += model.tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    assert 0 < len(expect["heldout"]) < len(expect["train"])          # both splits hold documents
    for split in ("train", "heldout"):
        assert np.asarray(c._stream(split)).tolist() == expect[split]
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "fresh-cache"))
    again = TokenCorpus(model, str(f), seq_len=16, holdout=0.25, progress=False)
    assert again.dir != c.dir and str(again.dir).startswith(str(tmp_path / "fresh-cache"))
    for split in ("train", "heldout"):
        assert np.array_equal(np.asarray(again._stream(split)), np.asarray(c._stream(split)))


def test_non_utf8_is_replaced_with_a_warning(model, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes(("caf\xe9 " * 200).encode("latin-1"))
    c = TokenCorpus(model, str(f), seq_len=16, holdout=0.0, progress=False)
    assert c.n_tokens("train") > 0
    assert "not UTF-8" in capsys.readouterr().err


def test_bad_corpora(model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(HeadscopeError, match="contains no text"):
        TokenCorpus(model, str(empty), progress=False)
    with pytest.raises(HeadscopeError, match="corpus path does not exist"):
        TokenCorpus(model, str(tmp_path / "nope.txt"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(HeadscopeError, match="bad.jsonl:2: not valid JSON"):
        TokenCorpus(model, str(bad), progress=False)
    small = tmp_path / "small.txt"
    small.write_text("Just a few words here.")
    c = TokenCorpus(model, str(small), seq_len=64, holdout=0.0, progress=False)
    with pytest.raises(HeadscopeError, match="too small"):
        next(c.batches("heldout"))
    with pytest.raises(HeadscopeError, match="exceeds the context"):
        TokenCorpus(model, str(small), seq_len=4096, progress=False)


def test_default_corpus_is_large_english_prose():
    docs = list(iter_documents("default"))
    text = "".join(docs)
    assert len(docs) > 500 and len(text) > 1_000_000
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "is", "to"} for w in words) / len(words) > 0.05
