"""The forget gate of the linear-attention design space: the public function.

"Demystify Mamba in Vision: A Linear Attention Perspective" (Han et al.,
NeurIPS 2024), Table 1 "+ forget gate": causal linear attention whose
per-head state decays by Mamba's ``exp(delta_t A)``, one decay per state
index and channel; the normaliser is the plain causal key sum. It is a
selective scan with ``u = v``, ``B = k``, ``C = q`` and groups = heads
(docs/design_space.md states this reading of the paper).

Backends (chosen in :mod:`mila_det.ops._dispatch`): Triton kernels on CUDA
(:mod:`.triton`), the chunked PyTorch path of :mod:`.chunk` elsewhere, and
the token-by-token definition of :mod:`.naive`. States and normalisers are
kept in fp32 (fp64 for fp64 inputs, which ``auto`` runs in PyTorch); the
result has ``q``'s dtype on every backend.
"""
from typing import Optional

import torch
from torch import Tensor

from .._dispatch import dispatch
from .chunk import chunk_forget_gate_attention
from .naive import naive_forget_gate_attention

__all__ = ['forget_gate_attention', 'naive_forget_gate_attention',
           'chunk_forget_gate_attention', 'IMPLS']

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_forget_gate_attention(q, k, v, delta, A, num_heads, eps,
                                 normalize, scale_input):
    """The Triton path (imported on first use)."""
    from .triton import triton_forget_gate_attention as run
    return run(q, k, v, delta, A, num_heads, eps, normalize, scale_input)


IMPLS = dict(naive=naive_forget_gate_attention,
             torch=chunk_forget_gate_attention,
             triton=triton_forget_gate_attention)


def _check(q: Tensor, k: Tensor, v: Tensor, delta: Tensor, A: Tensor,
           num_heads: int) -> None:
    """Raise ``ValueError`` naming the argument that does not fit."""
    op = 'forget_gate_attention'
    for name, t in (('q', q), ('k', k), ('v', v), ('delta', delta),
                    ('A', A)):
        if not isinstance(t, Tensor):
            raise TypeError(f'{op}: {name} must be a Tensor, got '
                            f'{type(t).__name__}')
        if t.dtype not in DTYPES:
            raise ValueError(f'{op}: {name} has dtype {t.dtype}; expected '
                             'float16, bfloat16, float32 or float64')
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) \
            or num_heads < 1:
        raise ValueError(f'{op}: num_heads must be a positive int, got '
                         f'{num_heads!r}')
    if q.dim() != 3:
        raise ValueError(f'{op}: q must be [B, L, H * dk], got '
                         f'{tuple(q.shape)}')
    if k.shape != q.shape:
        raise ValueError(f'{op}: k {tuple(k.shape)} must match q '
                         f'{tuple(q.shape)}')
    batch, length, qk_ch = q.shape
    if v.dim() != 3 or v.shape[:2] != (batch, length):
        raise ValueError(f'{op}: v must be [{batch}, {length}, H * dv] like '
                         f'q {tuple(q.shape)}, got {tuple(v.shape)}')
    if delta.shape != v.shape:
        raise ValueError(f'{op}: delta {tuple(delta.shape)} must match v '
                         f'{tuple(v.shape)}')
    if qk_ch % num_heads or v.shape[2] % num_heads:
        raise ValueError(f'{op}: num_heads={num_heads} must divide the '
                         f'channels of q/k ({qk_ch}) and of v '
                         f'({v.shape[2]})')
    if qk_ch == 0 or v.shape[2] == 0:
        raise ValueError(f'{op}: q and v need at least one channel per head, '
                         f'got {qk_ch} and {v.shape[2]}')
    want = (v.shape[2], qk_ch // num_heads)
    if tuple(A.shape) != want:
        raise ValueError(f'{op}: A must be [H * dv, dk] = {list(want)}, got '
                         f'{tuple(A.shape)}')
    devices = {t.device for t in (q, k, v, delta, A)}
    if len(devices) > 1:
        raise ValueError(f'{op}: q, k, v, delta and A must be on one '
                         f'device, got {sorted(map(str, devices))}')


def forget_gate_attention(q: Tensor,
                          k: Tensor,
                          v: Tensor,
                          delta: Tensor,
                          A: Tensor,
                          num_heads: int,
                          eps: float = 1e-6,
                          normalize: bool = True,
                          scale_input: bool = False,
                          backend: Optional[str] = None) -> Tensor:
    """Causal linear attention with Mamba's forget gate, per head.

    For head ``h``, channel ``c`` of that head (global index into
    ``H * dv``) and state index ``s < dk``::

        S_t[s, c] = exp(delta_t[c] A[c, s]) S_{t-1}[s, c]
                    + k_t[h, s] (delta_t[c] if scale_input else 1) v_t[c]
        Z_t       = Z_{t-1} + k_t[h]
        y_t[c]    = q_t[h] . S_t[:, c] / (q_t[h] . Z_t + eps)

    (only the numerator when ``normalize`` is False). Tokens run in raster
    order, one direction.

    Args:
        q (Tensor): Queries after ``elu + 1`` (positive), ``[B, L, H * dk]``.
        k (Tensor): Keys after ``elu + 1`` (positive), ``[B, L, H * dk]``.
        v (Tensor): Values ``[B, L, H * dv]``.
        delta (Tensor): Positive steps, softplus already applied,
            ``[B, L, H * dv]``.
        A (Tensor): Negative decay rates ``-exp(A_log)``, ``[H * dv, dk]``.
        num_heads (int): Number of heads ``H``; must divide both widths.
        eps (float): Added to the normaliser. Defaults to 1e-6.
        normalize (bool): Divide by ``q . Z``. Defaults to True.
        scale_input (bool): Multiply each state input by ``delta`` as
            Mamba's kernel does (which adds the input gate as well).
            Defaults to False.
        backend (str, optional): ``'auto'``, ``'torch'``, ``'triton'`` or
            ``'naive'``. Defaults to None (the environment's choice, else
            ``'auto'``).

    Returns:
        Tensor: ``[B, L, H * dv]`` in ``q``'s dtype.
    """
    _check(q, k, v, delta, A, num_heads)
    unsupported = None
    if any(t.dtype == torch.float64 for t in (q, k, v, delta, A)):
        unsupported = 'float64 inputs'
    run = dispatch('forget_gate', q, backend, IMPLS, unsupported)
    return run(q, k, v, delta, A, num_heads, eps, normalize,
               scale_input).to(q.dtype)
