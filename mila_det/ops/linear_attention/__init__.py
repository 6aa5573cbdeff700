"""MILA's linear attention: the public function models call.

The backend is chosen in :mod:`mila_det.ops._dispatch`: Triton kernels
(:mod:`.triton`) on CUDA, else the whole-sequence matmul form of
:mod:`.parallel` (``naive`` runs the definition in :mod:`.naive`); all keep
the d x d state, the token sums and the normaliser in fp32. The Triton
kernels take even head widths and fp32/bf16/fp16; ``auto`` runs other inputs
in PyTorch.
"""
from collections import OrderedDict
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .._dispatch import dispatch
from .naive import apply_rope, build_rope_table, naive_linear_attention
from .parallel import parallel_linear_attention

__all__ = [
    'linear_attention', 'rope_table', 'apply_rope', 'build_rope_table',
    'RopeTableCache', 'ROPE_CACHE',
    'naive_linear_attention', 'parallel_linear_attention',
    'dispatch_linear_attention'
]


def triton_linear_attention(q, k, v, num_heads, rope, eps):
    """The Triton kernels (imported on first use)."""
    from .triton import LinearAttentionFunction
    return LinearAttentionFunction.apply(q, k, v, num_heads, rope, eps)


IMPLS = dict(naive=naive_linear_attention, torch=parallel_linear_attention,
             triton=triton_linear_attention)


class RopeTableCache:
    """Least-recently-used RoPE tables, bounded by their total size in bytes.

    One table per ``(H, W, C, device)``; every block of a stage shares its
    stage's table. A miss is cheap: the cosines and sines are computed per
    axis (``(H + W) * C / 4`` angles) and expanded over the grid in one
    write, so multi-scale training, which visits many grid sizes, pays one
    pass over a stage's tokens per new size instead of evicting tables it
    is about to reuse. ``hits`` and ``misses`` count lookups.

    Args:
        max_bytes (int): Budget for all cached tables. Defaults to 256 MiB
            (a 1333 x 800 input's four MILA-B tables take about 50 MiB).
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.tables: 'OrderedDict[tuple, Tensor]' = OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables.values())

    def clear(self) -> None:
        self.tables.clear()
        self.hits = self.misses = 0

    def get(self, height: int, width: int, channels: int,
            device: torch.device) -> Tensor:
        key = (height, width, channels, device)
        table = self.tables.get(key)
        if table is not None:
            self.hits += 1
            self.tables.move_to_end(key)
            return table
        self.misses += 1
        table = build_rope_table(height, width, channels, device=device)
        size = table.numel() * table.element_size()
        if size > self.max_bytes:  # used once, evicting nothing
            return table
        total = self.nbytes + size
        while total > self.max_bytes:
            _, old = self.tables.popitem(last=False)
            total -= old.numel() * old.element_size()
        self.tables[key] = table
        return table


ROPE_CACHE = RopeTableCache()


def rope_table(height: int, width: int, channels: int,
               device: Union[torch.device, str, None] = None) -> Tensor:
    """The 2-D RoPE table ``[H*W, C/2, 2]`` for a grid, from
    :data:`ROPE_CACHE` (see :class:`RopeTableCache`).

    A backbone asks for one per stage and every block of that stage shares
    it.
    """
    device = torch.device(device if device is not None else 'cpu')
    if torch.compiler.is_compiling():
        # Traced from the (possibly symbolic) grid size with real
        # arithmetic: the cache keys by Python ints and would specialise.
        return build_rope_table(height, width, channels, device=device)
    # Built outside inference mode so a table first made during inference
    # can still be used by a later training step.
    with torch.inference_mode(False), torch.no_grad():
        return ROPE_CACHE.get(int(height), int(width), int(channels), device)


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
    if torch.compiler.is_compiling():
        # One node for torch.compile / torch.export (see ops/_custom_ops).
        return torch.ops.mila_det.linear_attention(q, k, v, rope, num_heads,
                                                   eps, backend)
    return dispatch_linear_attention(q, k, v, num_heads, rope, eps, backend)


def dispatch_linear_attention(q: Tensor, k: Tensor, v: Tensor,
                              num_heads: int, rope: Tensor, eps: float,
                              backend: Optional[str]) -> Tensor:
    """:func:`linear_attention` on checked inputs and a RoPE table: the
    implementation :mod:`~mila_det.ops._dispatch` picks, run eagerly."""
    c = q.shape[-1]
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
