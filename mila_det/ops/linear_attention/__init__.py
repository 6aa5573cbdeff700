"""MILA's linear attention: the public function models call.

The backend is chosen in :mod:`mila_det.ops._dispatch`: Triton kernels
(:mod:`.triton`) on CUDA, else the PyTorch path of :mod:`.cpu` (``naive``
runs the step-by-step reference of :mod:`.naive`); all keep the d x d state,
the token sums and the normaliser in fp32.
"""
import functools
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .._dispatch import resolve_backend
from .cpu import linear_attention_torch
from .naive import apply_rope, build_rope_table, linear_attention_naive

__all__ = [
    'linear_attention', 'rope_table', 'apply_rope', 'build_rope_table',
    'linear_attention_naive', 'linear_attention_torch'
]


@functools.lru_cache(maxsize=64)
def _rope_table_cached(height: int, width: int, channels: int,
                       device: torch.device) -> Tensor:
    return build_rope_table(height, width, channels, device=device)


def rope_table(height: int, width: int, channels: int,
               device: Union[torch.device, str, None] = None) -> Tensor:
    """The 2-D RoPE table ``[H*W, C/2, 2]`` for a grid, built once and cached.

    Tables depend only on ``(H, W, C, device)``, so a backbone asks for one
    per stage and every block of that stage shares it. The cache keeps the
    64 most recent sizes (multi-scale training visits a few dozen).
    """
    device = torch.device(device if device is not None else 'cpu')
    # Built outside inference mode so a table first made during inference
    # can still be used by a later training step.
    with torch.inference_mode(False), torch.no_grad():
        return _rope_table_cached(int(height), int(width), int(channels),
                                  device)


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
    backend = resolve_backend('linear_attention', q, backend)
    if backend == 'triton':
        from .triton import LinearAttentionFunction
        if (c // num_heads) % 2:
            raise ValueError('linear_attention: the Triton kernel rotates '
                             'channel pairs within a head, so the head dim '
                             f'must be even (got {c // num_heads})')
        return LinearAttentionFunction.apply(q, k, v, num_heads, rope, eps)
    if backend == 'naive':
        return linear_attention_naive(q, k, v, num_heads, rope, eps)
    return linear_attention_torch(q, k, v, num_heads, rope, eps)
