"""One sampler for every stage: which packed sequences of a split a stage reads.

``Windows(corpus, split, seed)`` cuts the split's token stream into its disjoint packed sequences
(S − 1 tokens each, read as ``[BOS] + window``, see :mod:`headscope.data`) and orders them by a seeded
permutation, so any prefix of the plan is a uniform random sample of the split's sequences — spread
over all its documents instead of the first few. ``seqs`` [n] are the packed-sequence indices in plan
order (``corpus.sequence(split, seqs[i])`` is window i), ``docs`` [n] the document each one starts in,
for standard errors clustered by document and for the ``n_documents`` every artifact records.

Every stage that reads corpus text draws from here (never "the first N tokens"): SAE training
(:mod:`headscope.sae.store`), evaluation and mean-ablation means (:mod:`headscope.sae.evaluate`),
dashboards (:mod:`headscope.sae.dashboards`), random feature contexts (:mod:`headscope.explain.features`),
neuron mining (:mod:`headscope.neurons.mining`) and the lens data (:mod:`headscope.lens.train`,
:mod:`headscope.lens.evaluate`).
"""

from __future__ import annotations

import numpy as np
import torch

from .data import TokenCorpus
from .errors import HeadscopeError


class Windows:
    """The packed sequences of a split in a seeded random order (see the module docstring).

    ``seqs`` [n] packed-sequence indices, ``offsets`` [n] their stream offsets, ``docs`` [n] the document
    index of each one's first token; ``ids(i, j)`` → [j − i, S] the sequences of plan entries i … j − 1."""

    def __init__(self, corpus: TokenCorpus, split: str, seed: int = 0):
        self.corpus, self.split = corpus, split
        w = corpus.seq_len - 1
        n = corpus.n_tokens(split) // w
        if n == 0:
            raise HeadscopeError(
                f"corpus '{corpus.spec}' is too small: its {split} split has {corpus.n_tokens(split)} tokens, "
                f"fewer than one sequence of {corpus.seq_len}; use a larger corpus or a smaller --seq-len")
        rng = np.random.default_rng(seed)
        self.seqs = rng.permutation(n)
        self.offsets = self.seqs * w
        self.docs = corpus.document_of(split, self.offsets)

    def __len__(self) -> int:
        return len(self.offsets)

    def need(self, n: int, what: str) -> None:
        """One-line error when the split has fewer than ``n`` windows."""
        if n > len(self):
            S = self.corpus.seq_len
            raise HeadscopeError(
                f"the {self.split} split of corpus '{self.corpus.spec}' has {len(self)} sequences of {S} tokens, "
                f"too few for {what} ({n} sequences); lower the token count or use a larger corpus")

    def ids(self, i: int, j: int) -> torch.Tensor:
        """[j − i, S] the sequences of plan entries i … j − 1."""
        j = min(j, len(self))
        return torch.stack([self.corpus.window(self.split, int(o)) for o in self.offsets[i:j]])

    def batches(self, batch_size: int, n: int, start: int = 0):
        """Yield (ids [B, S], docs [B]) for plan entries start … start + n − 1."""
        end = min(len(self), start + n)
        for a in range(start, end, batch_size):
            b = min(end, a + batch_size)
            yield self.ids(a, b), self.docs[a:b]

    def n_documents(self, n: int | None = None, start: int = 0) -> int:
        """Distinct documents the plan entries start … start + n − 1 start in."""
        end = len(self) if n is None else min(len(self), start + n)
        return int(len(np.unique(self.docs[start:end])))


def sample_sequences(corpus: TokenCorpus, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (at most all) entries of ``Windows(corpus, split, seed)``: (packed-sequence
    indices [n], the document each starts in [n])."""
    w = Windows(corpus, split, seed)
    n = max(1, min(int(n), len(w)))
    return w.seqs[:n].copy(), w.docs[:n].copy()


def n_documents(docs) -> int:
    """Distinct documents in ``docs``."""
    return int(len(np.unique(np.asarray(docs))))
