"""Plain PyTorch reference of VMamba's 2-D selective scan (SS2D's core).

VMamba: "VMamba: Visual State Space Model" (Liu et al., NeurIPS 2024),
``forward_type="v05_noz"``: the map is unrolled along four routes
(:func:`~mila_det.ops.cross_scan.cross_scan`), every route gets its own
step, B and C projections and runs the selective scan
(:func:`~mila_det.ops.selective_scan.selective_scan`, with the skip term
``D * u``), and the four outputs are mapped back to their pixels and summed
(:func:`~mila_det.ops.cross_scan.cross_merge`). Written as that composition,
step by step, it is the definition the fast paths are tested against.
"""
from typing import Callable

import torch
from torch import Tensor

from ..cross_scan.naive import naive_cross_merge, naive_cross_scan
from ..selective_scan.naive import naive_selective_scan


def scan_parameters(A_logs: Tensor, Ds: Tensor, dt_projs_bias: Tensor):
    """``A = -exp(A_logs)``, ``D`` and the step bias (flattened) in the
    scan's dtype: fp32, or fp64 for a float64 model."""
    ct = torch.promote_types(A_logs.dtype, torch.float32)
    return (-torch.exp(A_logs.to(ct)), Ds.to(ct),
            dt_projs_bias.to(ct).reshape(-1))


def compose_cross_selective_scan(x: Tensor, x_proj_weight: Tensor,
                                 dt_projs_weight: Tensor,
                                 dt_projs_bias: Tensor, A_logs: Tensor,
                                 Ds: Tensor, cross_scan: Callable,
                                 selective_scan: Callable,
                                 cross_merge: Callable) -> Tensor:
    """Cross scan, projections, selective scan and merge on the
    channel-first ``[B, 4, Di, L]`` sequences, with the three given
    operator implementations (see :func:`naive_cross_selective_scan`)."""
    b, inner, h, w = x.shape
    length = h * w
    rank = dt_projs_weight.shape[-1]
    n_state = A_logs.shape[-1]
    xs = cross_scan(x)  # [B, 4, Di, L]
    x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, x_proj_weight)
    dt_low, Bs, Cs = torch.split(x_dbl, [rank, n_state, n_state], dim=2)
    dts = torch.einsum('bkrl,kdr->bkdl', dt_low, dt_projs_weight)
    A, D, bias = scan_parameters(A_logs, Ds, dt_projs_bias)
    y = selective_scan(xs.reshape(b, 4 * inner, length),
                       dts.reshape(b, 4 * inner, length), A,
                       Bs.contiguous(), Cs.contiguous(), D, bias, True)
    y = cross_merge(y.view(b, 4, inner, length), h, w)
    return y.view(b, inner, h, w).permute(0, 2, 3, 1)


def naive_cross_selective_scan(x: Tensor, x_proj_weight: Tensor,
                               dt_projs_weight: Tensor, dt_projs_bias: Tensor,
                               A_logs: Tensor, Ds: Tensor) -> Tensor:
    """VMamba's four-route selective scan, by its definition.

    For route ``k`` with sequence ``u_k = cross_scan(x)[:, k]``::

        [dt_low, B_k, C_k] = x_proj_weight[k] @ u_k
        delta_k            = dt_projs_weight[k] @ dt_low   (+ dt_projs_bias[k],
                                                            softplus)
        y_k                = selective_scan(u_k, delta_k, -exp(A_logs_k),
                                            B_k, C_k, Ds_k)
        y                  = cross_merge(y_0, ..., y_3)

    Arguments and shapes as for the public
    :func:`~mila_det.ops.cross_selective_scan.cross_selective_scan`.

    Returns:
        Tensor: ``[B, H, W, Di]`` (a permuted view) in fp32, or fp64 for
        float64 parameters.
    """
    return compose_cross_selective_scan(
        x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
        naive_cross_scan, naive_selective_scan, naive_cross_merge)
