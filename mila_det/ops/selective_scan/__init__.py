"""Selective scan (S6) with VMamba's grouped B and C: the public function.

Backends (chosen in :mod:`mila_det.ops._dispatch`): Triton kernels on CUDA
(:mod:`.triton`), the chunked PyTorch scan of :mod:`.chunk` on every other
device, and the token-by-token definition of :mod:`.naive`. All accumulate
states and outputs in fp32 (fp64 for fp64 inputs, which the Triton kernels
do not take: ``auto`` runs those in PyTorch); the public function returns
``u``'s dtype on every backend.
"""
from typing import Optional

from torch import Tensor

import torch

from .._dispatch import dispatch
from .chunk import (chunk_selective_scan, chunk_selective_scan_tokens,
                    linear_recurrence)
from .naive import naive_selective_scan

__all__ = ['selective_scan', 'naive_selective_scan', 'chunk_selective_scan',
           'chunk_selective_scan_tokens', 'linear_recurrence']


def triton_selective_scan(u, delta, A, B, C, D=None, delta_bias=None,
                          delta_softplus=False, scale_input=True):
    """The Triton kernels (imported on first use)."""
    from .triton import triton_selective_scan as run
    return run(u, delta, A, B, C, D, delta_bias, delta_softplus, scale_input)


IMPLS = dict(naive=naive_selective_scan, torch=chunk_selective_scan,
             triton=triton_selective_scan)


def selective_scan(u: Tensor,
                   delta: Tensor,
                   A: Tensor,
                   B: Tensor,
                   C: Tensor,
                   D: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False,
                   scale_input: bool = True,
                   backend: Optional[str] = None) -> Tensor:
    """``y_t = <C_t, h_t> + D u_t`` with ``h_t = exp(delta_t A) h_{t-1} +
    delta_t B_t u_t`` per channel (``+ B_t u_t`` with ``scale_input=False``);
    B and C shared within each group.

    Args:
        u (Tensor): ``[B, D_ch, L]``.
        delta (Tensor): ``[B, D_ch, L]``, before ``delta_bias`` / softplus.
        A (Tensor): ``[D_ch, N]``, N >= 1.
        B (Tensor): ``[B, G, N, L]``; G must divide D_ch.
        C (Tensor): ``[B, G, N, L]``.
        D (Tensor, optional): ``[D_ch]``. Defaults to None.
        delta_bias (Tensor, optional): ``[D_ch]``. Defaults to None.
        delta_softplus (bool): Softplus on the step. Defaults to False.
        scale_input (bool): Multiply the input term by the step (Mamba);
            False leaves it unscaled, so the step only sets the decay.
            Defaults to True.
        backend (str, optional): ``'auto'``, ``'torch'``, ``'triton'`` or
            ``'naive'``.
            Defaults to None (the environment's choice, else ``'auto'``).

    Returns:
        Tensor: ``[B, D_ch, L]`` in ``u``'s dtype (computed in fp32).
    """
    batch, channels, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f'selective_scan: delta {tuple(delta.shape)} must '
                         f'match u {tuple(u.shape)}')
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f'selective_scan: A must be [{channels}, N], got '
                         f'{tuple(A.shape)}')
    n_state = A.shape[1]
    for name, t in (('B', B), ('C', C)):
        if (t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n_state
                or t.shape[3] != length or channels % t.shape[1]):
            raise ValueError(
                f'selective_scan: {name} must be [{batch}, G, {n_state}, '
                f'{length}] with G dividing {channels}; got {tuple(t.shape)}')
    if B.shape[1] != C.shape[1]:
        raise ValueError('selective_scan: B and C need the same groups')
    fp64 = 'float64 inputs' if u.dtype == torch.float64 else None
    run = dispatch('selective_scan', u, backend, IMPLS, fp64)
    return run(u, delta, A, B, C, D, delta_bias, delta_softplus,
               scale_input).to(u.dtype)
