"""VMamba's 2-D selective scan as one operator: cross scan, the per-route
projections, the selective scan with its skip term, and cross merge.

Backends (chosen in :mod:`mila_det.ops._dispatch`): the Triton kernels of
the cross scan and the selective scan (:mod:`.triton`) on CUDA, the
token-major chunked scan of :mod:`.chunk` elsewhere, and the composition of
the references in :mod:`.naive`. All compute the scan in fp32 (fp64 for
float64 parameters, which ``auto`` runs in PyTorch).
"""
from typing import Optional

import torch
from torch import Tensor

from .._dispatch import dispatch
from .chunk import chunk_cross_selective_scan
from .naive import naive_cross_selective_scan

__all__ = ['cross_selective_scan', 'naive_cross_selective_scan',
           'chunk_cross_selective_scan']


def triton_cross_selective_scan(*args: Tensor) -> Tensor:
    """The Triton kernels (imported on first use)."""
    from .triton import triton_cross_selective_scan as run
    return run(*args)


IMPLS = dict(naive=naive_cross_selective_scan,
             torch=chunk_cross_selective_scan,
             triton=triton_cross_selective_scan)


def cross_selective_scan(x: Tensor,
                         x_proj_weight: Tensor,
                         dt_projs_weight: Tensor,
                         dt_projs_bias: Tensor,
                         A_logs: Tensor,
                         Ds: Tensor,
                         backend: Optional[str] = None) -> Tensor:
    """VMamba's four-route selective scan (``forward_type="v05_noz"``).

    Route ``k`` of ``cross_scan(x)`` is projected to its step, B and C by
    ``x_proj_weight[k]`` and ``dt_projs_weight[k]`` (plus
    ``dt_projs_bias[k]``, softplus), scanned with ``A = -exp(A_logs)`` and
    the skip ``D``, and the four outputs are merged back onto the grid
    (see :func:`~.naive.naive_cross_selective_scan`).

    Args:
        x (Tensor): ``[B, Di, H, W]``.
        x_proj_weight (Tensor): ``[4, R + 2N, Di]``.
        dt_projs_weight (Tensor): ``[4, Di, R]``.
        dt_projs_bias (Tensor): ``[4, Di]``.
        A_logs (Tensor): ``[4 * Di, N]``.
        Ds (Tensor): ``[4 * Di]``.
        backend (str, optional): ``'auto'``, ``'torch'``, ``'triton'`` or
            ``'naive'``. Defaults to None (the environment's choice, else
            ``'auto'``).

    Returns:
        Tensor: ``[B, H, W, Di]`` in fp32 (fp64 for float64 parameters) on
        every backend, whatever ``x``'s dtype: VMamba normalises the scan's
        output (``out_norm``) before rounding it to the model's dtype.
    """
    if x.dim() != 4:
        raise ValueError('cross_selective_scan expects x [B, Di, H, W], got '
                         f'{tuple(x.shape)}')
    inner = x.shape[1]
    if dt_projs_weight.dim() != 3 or dt_projs_weight.shape[:2] != (4, inner):
        raise ValueError(f'cross_selective_scan: dt_projs_weight must be '
                         f'[4, {inner}, R], got '
                         f'{tuple(dt_projs_weight.shape)}')
    rank = dt_projs_weight.shape[2]
    if A_logs.dim() != 2 or A_logs.shape[0] != 4 * inner:
        raise ValueError(f'cross_selective_scan: A_logs must be '
                         f'[{4 * inner}, N], got {tuple(A_logs.shape)}')
    n_state = A_logs.shape[1]
    expected = dict(x_proj_weight=(4, rank + 2 * n_state, inner),
                    dt_projs_bias=(4, inner), Ds=(4 * inner, ))
    for name, t in (('x_proj_weight', x_proj_weight),
                    ('dt_projs_bias', dt_projs_bias), ('Ds', Ds)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f'cross_selective_scan: {name} must be '
                             f'{list(expected[name])}, got {tuple(t.shape)}')
    fp64 = ('float64 parameters' if torch.float64 in (x.dtype, A_logs.dtype)
            else None)
    run = dispatch('cross_selective_scan', x, backend, IMPLS, fp64)
    return run(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
