"""MILA's linear attention: the public function models call.

The backend is chosen in :mod:`mila_det.ops._dispatch`: Triton kernels
(:mod:`.triton`) on CUDA, else the whole-sequence matmul form of
:mod:`.parallel` (``naive`` runs the definition in :mod:`.naive`); all keep
the d x d state, the token sums and the normaliser in fp32. The Triton
kernels take even head widths and fp32/bf16/fp16; ``auto`` runs other inputs
in PyTorch.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .._dispatch import dispatch
from .naive import apply_rope, build_rope_table, naive_linear_attention
from .parallel import parallel_linear_attention

__all__ = [
    'linear_attention', 'rope_table', 'apply_rope', 'build_rope_table',
    'naive_linear_attention', 'parallel_linear_attention'
]


def triton_linear_attention(q, k, v, num_heads, rope, eps):
    """The Triton kernels (imported on first use)."""
    from .triton import triton_linear_attention as run
    return run(q, k, v, num_heads, rope, eps)


IMPLS = dict(naive=naive_linear_attention, torch=parallel_linear_attention,
             triton=triton_linear_attention)

# A backbone asks for one table per stage and every block of that stage
# shares it. Building one costs (H + W) * C / 4 angles and one write of the
# table (docs/benchmarks.md), so nothing is cached.
rope_table = build_rope_table


def linear_attention(q: Tensor,
                     k: Tensor,
                     v: Tensor,
                     num_heads: int,
                     rope: Union[Tensor, Tuple[int, int]],
                     eps: float = 1e-6,
                     backend: Optional[str] = None) -> Tensor:
    """Non-causal linear attention with 2-D RoPE, as in MILA.

    ``out_t = rope(q_t) . kv / (q_t . mean(k) + eps)`` per head, with
    ``kv = sum_s rope(k_s)^T v_s / N``.

    Args:
        q (Tensor): Queries after ``elu + 1``, ``[B, N, C]``.
        k (Tensor): Keys after ``elu + 1``, ``[B, N, C]``.
        v (Tensor): Values, ``[B, N, C]``.
        num_heads (int): Number of heads; must divide C.
        rope (Tensor | tuple[int, int]): RoPE table ``[N, C/2, 2]`` from
            :func:`rope_table`, or the grid ``(H, W)`` with ``H * W == N``.
        eps (float): Added to the normaliser. Defaults to 1e-6.
        backend (str, optional): ``'auto'``, ``'torch'``, ``'triton'`` or
            ``'naive'``. Defaults to None (the environment's choice, else
            ``'auto'``).

    Returns:
        Tensor: ``[B, N, C]``, the dtype of ``q``.
    """
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError('linear_attention expects q, k and v of one shape '
                         f'[B, N, C]; got {tuple(q.shape)}, '
                         f'{tuple(k.shape)}, {tuple(v.shape)}')
    b, n, c = q.shape
    if c % num_heads != 0:
        raise ValueError(f'linear_attention: C={c} is not divisible by '
                         f'num_heads={num_heads}')
    if isinstance(rope, (tuple, list)):
        if rope[0] * rope[1] != n:
            raise ValueError(f'linear_attention: grid {tuple(rope)} does not '
                             f'hold N={n} tokens')
        rope = rope_table(rope[0], rope[1], c, q.device)
    if rope.shape != (n, c // 2, 2):
        raise ValueError(f'linear_attention: RoPE table of shape '
                         f'{tuple(rope.shape)} does not fit N={n}, C={c}; '
                         f'expected {(n, c // 2, 2)}')
    unsupported = None
    if (c // num_heads) % 2:
        unsupported = ('the kernel rotates channel pairs within a head, so '
                       f'the head width must be even (got {c // num_heads})')
    elif c // num_heads > 128:
        unsupported = ('the kernels hold a head in registers, up to 128 '
                       f'channels wide (got {c // num_heads})')
    elif q.dtype == torch.float64:
        unsupported = 'float64 inputs'
    run = dispatch('linear_attention', q, backend, IMPLS, unsupported)
    return run(q, k, v, num_heads, rope, eps)
