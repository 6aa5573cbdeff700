"""Plain PyTorch reference of VMamba's 2-D cross scan and cross merge.

VMamba: "VMamba: Visual State Space Model" (Liu et al., NeurIPS 2024).
The four routes over an H x W map, as sequences of length L = H*W:
0 row-major, 1 column-major, 2 row-major reversed, 3 column-major reversed.
"""
import torch
from torch import Tensor


def naive_cross_scan(x: Tensor) -> Tensor:
    """``x: [B, C, H, W]`` -> ``[B, 4, C, L]`` along the four routes."""
    b, c, h, w = x.shape
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def naive_cross_merge(y: Tensor, height: int, width: int) -> Tensor:
    """``y: [B, 4, C, L]`` -> ``[B, C, L]`` (row-major): each route mapped
    back to its pixel and the four summed. The adjoint of
    :func:`naive_cross_scan`."""
    b, k, c, length = y.shape
    if k != 4 or length != height * width:
        raise ValueError(f'cross_merge: expected [B, 4, C, {height * width}],'
                         f' got {tuple(y.shape)}')
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    cols = cols.reshape(b, c, width, height).transpose(2, 3).reshape(
        b, c, length)
    return rows + cols
