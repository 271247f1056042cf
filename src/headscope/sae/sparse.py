"""Sparse SAE training kernels: the activations of a batch as a list of M (row, col, value) entries
(TopK: M = N·k; BatchTopK: the k·N largest of the batch), never as a dense [N, F] tensor.

Cost per step: one dense matmul (the encoder's pre-activations, needed to choose the entries) plus
O(M·d) work for everything else, where dense training costs five [N, d, F] matmuls:

* decode        ``recon[n] = Σ_{e: row_e = n} v_e · W_dec[col_e]``          (``embedding_bag``)
* its backward  ``∂v_e = g[row_e] · W_dec[col_e]``                            (``sampled_addmm``, SDDMM)
                ``∂W_dec[f] = Σ_{e: col_e = f} v_e · g[row_e]``               (segment sum by feature)
* encode        ``v_e = pre[row_e, col_e]`` (read from the dense pre-activations, no recomputation)
* its backward  ``∂W_enc[:, f] = Σ_{e: col_e = f} ∂v_e · x_c[row_e]``, ``∂b_enc[f] = Σ ∂v_e``,
                ``∂x_c[n] = Σ_{e: row_e = n} ∂v_e · W_enc[:, col_e]``

Segment sums are ``embedding_bag(mode="sum", per_sample_weights=…)`` over entries sorted by feature,
which is deterministic (training stays bit-for-bit resumable).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as Fn

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _stable_argsort(keys: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Stable argsort of small non-negative integer keys. On CPU numpy's radix/tim sort: torch's CPU
    sort of 32k int64 keys took ~0.4 s under load (profiled), numpy's ~10 ms."""
    if keys.device.type != "cpu":
        return keys.argsort(stable=True)
    import numpy as np
    k = keys.numpy().astype(np.int16 if n_keys < 2**15 else np.int32)
    return torch.from_numpy(np.argsort(k, kind="stable"))


class Entries:
    """M active (row, col) pairs of an [N, F] activation matrix, sorted by row; ``by_col`` sorts them
    by feature (computed once, used by every segment sum of the step)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int):
        self.rows, self.cols, self.n_rows, self.n_cols = rows, cols, n_rows, n_cols
        counts = torch.bincount(rows, minlength=n_rows)
        self.row_offsets = torch.zeros(n_rows, dtype=torch.long, device=rows.device)
        self.row_offsets[1:] = counts.cumsum(0)[:-1]
        self.crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        self.crow[1:] = counts.cumsum(0)
        self._by_col = None

    @property
    def by_col(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, rows in feature order, offsets of each feature's segment)."""
        if self._by_col is None:
            order = _stable_argsort(self.cols, self.n_cols)
            counts = torch.bincount(self.cols, minlength=self.n_cols)
            offsets = torch.zeros(self.n_cols, dtype=torch.long, device=self.cols.device)
            offsets[1:] = counts.cumsum(0)[:-1]
            self._by_col = (order, self.rows[order], offsets)
        return self._by_col

    def sum_rows_by_row(self, table: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[N, d]: out[n] = Σ_{e: row_e = n} w_e · table[col_e] (table [F, d])."""
        return Fn.embedding_bag(self.cols, table, self.row_offsets, mode="sum", per_sample_weights=w)

    def sum_rows_by_col(self, src: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[F, d]: out[f] = Σ_{e: col_e = f} w_e · src[row_e] (src [N, d])."""
        order, rows, offsets = self.by_col
        return Fn.embedding_bag(rows, src, offsets, mode="sum", per_sample_weights=w[order])

    def dots(self, a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[M]: a[row_e] · table[col_e] (a [N, d], table [F, d]) — a sampled dense-dense matmul."""
        mask = torch.sparse_csr_tensor(self.crow, self.cols, torch.zeros(self.cols.shape[0], dtype=a.dtype,
                                       device=a.device), size=(self.n_rows, self.n_cols), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, a, table.T, beta=0.0).values()


class SparseDecode(torch.autograd.Function):
    """``recon [N, d] = Σ_e v_e · W_dec[col_e]`` into row_e; gradients to v [M] and W_dec [F, d]."""

    @staticmethod
    def forward(ctx, v, W_dec, ent: Entries):
        ctx.save_for_backward(v, W_dec)
        ctx.ent = ent
        return ent.sum_rows_by_row(W_dec, v)

    @staticmethod
    def backward(ctx, g):
        v, W_dec = ctx.saved_tensors
        ent = ctx.ent
        g = g.contiguous()
        g_v = ent.dots(g, W_dec) if ctx.needs_input_grad[0] else None
        g_W = ent.sum_rows_by_col(g, v) if ctx.needs_input_grad[1] else None
        return g_v, g_W, None


class SparseEncode(torch.autograd.Function):
    """``v_e = pre[row_e, col_e]`` with ``pre = (x − b_dec) · W_enc + b_enc`` already computed (no grad);
    the backward gives W_enc [d, F], b_enc [F] and b_dec [d] their gradients from ∂v [M] alone:
    ∂b_enc = Σ_e by feature, ∂b_dec = −W_enc · ∂b_enc (x itself gets a gradient only if it asks)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre_vals, ent: Entries):
        ctx.save_for_backward(x, b_dec, W_enc)
        ctx.ent = ent
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, g):
        x, b_dec, W_enc = ctx.saved_tensors
        ent = ctx.ent
        g_x = g_W = None
        g_b = torch.zeros(ent.n_cols, dtype=g.dtype, device=g.device).index_add_(0, ent.cols, g)
        if ctx.needs_input_grad[0]:
            g_x = ent.sum_rows_by_row(W_enc.T.contiguous(), g)
        if ctx.needs_input_grad[2]:
            g_W = ent.sum_rows_by_col((x - b_dec).contiguous(), g).T
        g_bdec = -(W_enc @ g_b) if ctx.needs_input_grad[1] else None
        return g_x, g_bdec, g_W, g_b if ctx.needs_input_grad[3] else None, None, None
