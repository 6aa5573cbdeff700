"""VMamba's four-route selective scan, token-major, on the chunked scan of
:mod:`mila_det.ops.selective_scan.chunk`.

The four routes read two sequences, the pixels by rows and by columns,
each forwards (routes 0, 1) and backwards (routes 2, 3). The sequences are
held once, ``[B, 2, L, Di]`` with every token a contiguous row, and the
backward routes are scanned from the end rather than flipped, so their
outputs need no flip either. Both routes of a sequence share one projection
matmul, and the four skip terms ``D_k * u`` read the same pixel, so they
are added once as ``(sum_k D_k) * u`` on the merged map.
"""
import torch
from torch import Tensor

from ..selective_scan.chunk import chunk_selective_scan_tokens
from .naive import scan_parameters


def chunk_cross_selective_scan(x: Tensor, x_proj_weight: Tensor,
                               dt_projs_weight: Tensor, dt_projs_bias: Tensor,
                               A_logs: Tensor, Ds: Tensor) -> Tensor:
    """Same arguments and result as
    :func:`~.naive.naive_cross_selective_scan` (``x`` in channels-last
    memory avoids a copy)."""
    b, inner, h, w = x.shape
    length = h * w
    n_state, rank = A_logs.shape[-1], dt_projs_weight.shape[-1]
    grid = x.permute(0, 2, 3, 1)  # a view when x is channels-last
    seqs = torch.stack([grid.reshape(b, length, inner),
                        grid.transpose(1, 2).reshape(b, length, inner)],
                       dim=1)  # [B, 2, L, Di]: rows, columns

    def per_seq(weight: Tensor) -> Tensor:  # [2, ...] -> [B * 2, ...]
        return weight.expand(b, *weight.shape).flatten(0, 1)

    # Route k reads sequence k % 2; one matmul for both of its routes.
    proj = x_proj_weight.view(2, 2, -1, inner).transpose(0, 1)
    x_dbl = torch.bmm(seqs.view(b * 2, length, inner),
                      per_seq(proj.flatten(1, 2).transpose(1, 2)))
    A, D, bias = scan_parameters(A_logs, Ds, dt_projs_bias)
    A, bias = A.view(2, 2 * inner, n_state), bias.view(2, 2, 1, inner)
    dt_proj = dt_projs_weight.view(2, 2, inner, rank)
    y = None
    for way in (0, 1):  # 0: routes 0, 1 forwards; 1: routes 2, 3
        width = rank + 2 * n_state
        part = x_dbl[..., way * width:(way + 1) * width]
        dt_low, Bs, Cs = torch.split(part, [rank, n_state, n_state], dim=-1)
        weight = per_seq(dt_proj[way].transpose(1, 2))
        if dt_low.dtype == bias.dtype:
            # The step bias is added by the matmul (one pass fewer).
            dts = torch.baddbmm(per_seq(bias[way]), dt_low, weight)
            step_bias = None
        else:  # bf16/fp16 steps: the bias is added in fp32 by the scan
            dts = torch.bmm(dt_low, weight)
            step_bias = bias[way].reshape(-1)
        y_way = chunk_selective_scan_tokens(
            seqs, dts.view(b, 2, length, inner), A[way],
            Bs.reshape(b, 2, length, n_state),
            Cs.reshape(b, 2, length, n_state), delta_bias=step_bias,
            delta_softplus=True, reverse=bool(way))
        y = y_way if y is None else y + y_way
    y = y[:, 0].view(b, h, w, inner) + y[:, 1].view(
        b, w, h, inner).transpose(1, 2)
    return y.addcmul_(grid, D.view(4, inner).sum(0))
