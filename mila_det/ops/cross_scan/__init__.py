"""VMamba's cross scan / cross merge: the public functions models call.

``cross_scan`` unrolls a ``[B, C, H, W]`` map along four routes into
``[B, 4, C, L]``; ``cross_merge`` maps four sequences back to their pixels
and sums them. Each is the other's adjoint, hence its backward. The backend
is chosen in :mod:`mila_det.ops._dispatch`.
"""
from typing import Optional

from torch import Tensor

from .._dispatch import dispatch
from .naive import naive_cross_merge, naive_cross_scan

__all__ = ['cross_scan', 'cross_merge', 'naive_cross_scan',
           'naive_cross_merge']


def triton_cross_scan(x: Tensor) -> Tensor:
    """The Triton kernel (imported on first use)."""
    from .triton import cross_scan_triton
    return cross_scan_triton(x)


def triton_cross_merge(y: Tensor, height: int, width: int) -> Tensor:
    """The Triton kernel (imported on first use)."""
    from .triton import cross_merge_triton
    return cross_merge_triton(y, height, width)


# The reference is also the PyTorch path (it is a few views and one copy).
SCAN_IMPLS = dict(naive=naive_cross_scan, torch=naive_cross_scan,
                  triton=triton_cross_scan)
MERGE_IMPLS = dict(naive=naive_cross_merge, torch=naive_cross_merge,
                   triton=triton_cross_merge)


def cross_scan(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """``x: [B, C, H, W]`` -> ``[B, 4, C, H*W]`` (routes: rows, columns, rows
    reversed, columns reversed)."""
    if x.dim() != 4:
        raise ValueError(f'cross_scan expects [B, C, H, W], got '
                         f'{tuple(x.shape)}')
    return dispatch('cross_scan', x, backend, SCAN_IMPLS)(x)


def cross_merge(y: Tensor, height: int, width: int,
                backend: Optional[str] = None) -> Tensor:
    """``y: [B, 4, C, H*W]`` -> ``[B, C, H*W]``, row-major."""
    if y.dim() != 4 or y.shape[1] != 4 or y.shape[-1] != height * width:
        raise ValueError(f'cross_merge expects [B, 4, C, {height * width}], '
                         f'got {tuple(y.shape)}')
    return dispatch('cross_merge', y, backend, MERGE_IMPLS)(y, height, width)
