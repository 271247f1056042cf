"""The shared sampler: every stage reads sequences spread over the split's documents, never the first N."""

import json

import numpy as np
import torch

from headscope.data import TokenCorpus
from headscope.neurons import mining
from headscope.sae.store import ModelSource
from headscope.sampling import Windows, n_documents, sample_sequences
from headscope.testing.tiny import tiny_model

SEQ = 16


def _corpus(tmp_path, model, n_docs=80):
    """n_docs documents of 3-6 sequences each: the first 10 packed sequences span only a few documents."""
    docs = [{"text": f"Document number {i}. " + " ".join(["the value of a thing is here"] * (8 + i % 5))}
            for i in range(n_docs)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    return TokenCorpus(model, str(path), seq_len=SEQ, holdout=0.0, progress=False)


def _doc_by_eos(corpus, split, seq):
    """Independent count: EOS tokens before the first body token of packed sequence ``seq``."""
    stream = np.asarray(corpus._stream(split))
    return int((stream[:seq * (SEQ - 1)] == corpus.eos).sum())


def test_sample_spans_documents_and_tags_them(tmp_path):
    model = tiny_model("gpt2")
    c = _corpus(tmp_path, model)
    seqs, docs = sample_sequences(c, "train", 10, seed=0)
    first = [_doc_by_eos(c, "train", s) for s in range(10)]        # the old "first N sequences"
    assert len(set(first)) <= 4
    assert n_documents(docs) >= 8                                   # the sample spans many documents
    assert [int(d) for d in docs] == [_doc_by_eos(c, "train", int(s)) for s in seqs]
    assert len(set(seqs.tolist())) == 10                           # no sequence twice
    again, _ = sample_sequences(c, "train", 10, seed=0)
    other, _ = sample_sequences(c, "train", 10, seed=1)
    assert again.tolist() == seqs.tolist() and other.tolist() != seqs.tolist()
    w = Windows(c, "train", seed=0)
    assert sorted(w.seqs.tolist()) == list(range(c.n_sequences("train")))     # a permutation of the split
    assert w.n_documents(10) == n_documents(docs)
    torch.testing.assert_close(w.ids(0, 3), torch.stack([c.sequence("train", int(s)) for s in seqs[:3]]))


def test_sae_training_blocks_and_mining_draw_from_the_sampler(tmp_path):
    model = tiny_model("llama_gqa")
    c = _corpus(tmp_path, model)
    src = ModelSource(model, c, [1], buffer_tokens=8 * SEQ, batch_size=3)
    plan = Windows(c, "train", seed=0)
    from headscope.sae.store import z_rows
    want = z_rows(model, torch.stack([c.sequence("train", int(s)) for s in plan.seqs[8:16]]), [1])[1]
    torch.testing.assert_close(src.block(1)[1], want)                 # block 1 = plan entries 8 … 15
    assert src.n_documents(1) >= 6
    neurons = [{"layer": 1, "neuron": 2}, {"layer": 0, "neuron": 5}]
    state = mining.top_sequences(model, c, neurons, "train", 3, batch_size=4, max_tokens=12 * SEQ, progress=False)
    assert set(state["seq"].flatten().tolist()) <= set(plan.seqs[:12].tolist())
    assert int(state["documents"]) == plan.n_documents(12) and int(state["documents"]) >= 8
