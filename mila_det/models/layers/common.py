"""Layers the backbones share: the token projection, the MLP, LayerNorm on
channel-first maps, depthwise convolutions on tokens, and Mamba's
initialisation of the step projection and the decay rates.

Tokens are ``[..., C]`` with C innermost: MILA's ``[B, N, C]`` and VMamba's
``[B, H, W, C]`` (the channels-last memory of its NCHW maps, viewed). Every
layer computes the plain PyTorch composition unless the CPU switch of
:mod:`.fused` gives it a faster route to the same numbers.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .fused import (ACTIVATIONS, can_fold, conv2d_act, conv2d_add,
                    use_onednn_projection)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of every pixel of ``[B, C, H, W]``."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


def _as_map(t: Tensor) -> Tensor:
    """Tokens as a channels-last map (a view when they are contiguous):
    ``[B, H, W, C]`` as ``[B, C, H, W]``, other ``[..., C]`` as ``[1, C, T,
    1]``. Keeping a map's own shape keeps its gradient channels-last too
    (oneDNN returns that of a ``[1, C, T, 1]`` map channel-major, which
    costs a transposing copy per projection in the backward)."""
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2)
    return t.reshape(1, -1, 1, t.shape[-1]).permute(0, 3, 1, 2)


class TokenLinear(nn.Linear):
    """``nn.Linear`` on tokens ``[..., C]``, with an activation or a residual
    add.

    Same parameters as ``nn.Linear`` (a checkpoint that stores the weight as
    a 1x1 conv's ``[out, in, 1, 1]`` loads too). On CPU, with the switch of
    :mod:`.fused` on, it runs as a oneDNN 1x1 convolution on a channels-last
    view of the tokens (no copy), with the activation or the add fused in
    where no gradient is needed.
    """

    def forward(self, x: Tensor, act: Optional[str] = None,
                residual: Optional[Tensor] = None,
                drop_path: Optional[nn.Module] = None) -> Tensor:
        """``act(linear(x))``, or ``residual + drop_path(linear(x))``.

        Args:
            x (Tensor): ``[..., in_features]``.
            act (str, optional): ``'relu'``, ``'gelu'`` or ``'silu'``.
                Defaults to None.
            residual (Tensor, optional): ``[..., out_features]``; may be
                overwritten with the sum when no gradient is needed.
                Defaults to None.
            drop_path (nn.Module, optional): Stochastic depth applied to
                the projection before the add. Defaults to None.

        Returns:
            Tensor: ``[..., out_features]``.
        """
        if act is not None and residual is not None:
            raise ValueError('TokenLinear: give act or residual, not both')
        if act is not None and act not in ACTIVATIONS:
            raise ValueError(f'TokenLinear: act must be one of '
                             f'{sorted(ACTIVATIONS)} or None, got {act!r}')
        dropping = drop_path is not None and drop_path.training
        if residual is not None and dropping:
            return residual + drop_path(self(x))
        if not use_onednn_projection(x):
            y = F.linear(x, self.weight, self.bias)
            if residual is not None:
                return residual + y
            return y if act is None else ACTIVATIONS[act][0](y)
        weight = self.weight[:, :, None, None]
        if residual is None:
            y = conv2d_act(_as_map(x), weight, self.bias, act)
        else:
            y = conv2d_add(_as_map(residual), _as_map(x), weight, self.bias)
        return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1],
                                             self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'weight'
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Mlp(nn.Module):
    """Two token projections with exact GELU between (``fc1``: C -> hidden,
    ``fc2``: hidden -> C)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = TokenLinear(dim, hidden_dim)
        self.fc2 = TokenLinear(hidden_dim, dim)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                drop_path: Optional[nn.Module] = None) -> Tensor:
        """``x: [..., C]`` -> ``[..., C]``; with ``residual``, ``residual +
        drop_path(mlp(x))`` (see :meth:`TokenLinear.forward`)."""
        return self.fc2(self.fc1(x, act='gelu'), residual=residual,
                        drop_path=drop_path)


def dwconv_tokens(conv: nn.Conv2d, x: Tensor, hw: Tuple[int, int],
                  residual: bool = False, act: Optional[str] = None,
                  add_to: Optional[Tensor] = None) -> Tensor:
    """A depthwise conv on tokens ``x: [B, N, C]`` laid out on an ``H x W``
    grid: ``act(conv(x))``, ``x + conv(x)`` with ``residual``, or ``add_to +
    conv(x)`` with ``add_to: [B, N, C]``.

    The tokens reach the conv as a channels-last view and its output is read
    back as tokens, so nothing is copied. Where :func:`~.fused.can_fold`,
    ``x + conv(x)`` is the conv with the identity added to its centre tap.
    ``add_to + conv(x)`` is written into ``add_to``'s memory where no
    gradient is needed (see :func:`~.fused.conv2d_add`): pass a tensor that
    nothing else reads afterwards.
    """
    b, n, c = x.shape
    if conv.dilation != (1, 1):
        raise ValueError('dwconv_tokens: dilated convs are not supported')
    x_map = x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)
    weight = conv.weight
    if add_to is not None:
        if residual or act is not None:
            raise ValueError('dwconv_tokens: give add_to alone, without '
                             'residual or act')
        c_out = add_to.shape[-1]
        sum_map = conv2d_add(
            add_to.reshape(b, hw[0], hw[1], c_out).permute(0, 3, 1, 2),
            x_map, weight, conv.bias, conv.stride, conv.padding, conv.groups)
        return sum_map.permute(0, 2, 3, 1).reshape(b, n, c_out)
    if residual:
        kh, kw = weight.shape[-2:]
        if (conv.groups != c or conv.stride != (1, 1)
                or conv.padding != (kh // 2, kw // 2)
                or weight.shape[1] != 1 or not kh % 2 or not kw % 2):
            raise ValueError('dwconv_tokens: the residual form needs a '
                             'same-size depthwise conv with an odd kernel')
        if act is not None:
            raise ValueError('dwconv_tokens: give act or residual, not both')
        if not can_fold(x):
            y = F.conv2d(x_map, weight, conv.bias, 1, conv.padding, 1,
                         conv.groups)
            return x + y.permute(0, 2, 3, 1).reshape(b, n, c)
        weight = weight.clone()
        weight[:, 0, kh // 2, kw // 2] += 1.0
    y = conv2d_act(x_map, weight, conv.bias, act, conv.stride, conv.padding,
                   conv.groups)
    return y.permute(0, 2, 3, 1).reshape(b, n, c)


@torch.no_grad()
def init_mamba_step(weight: Tensor, bias: Tensor, rank: int,
                    dt_min: float = 1e-3, dt_max: float = 0.1,
                    dt_floor: float = 1e-4) -> None:
    """Mamba's initialisation of the step projection ``Delta = softplus(W r
    + b)`` (Gu and Dao, "Mamba", 2023; VMamba keeps it): ``W`` uniform in
    ``+-rank^-0.5``, ``b`` the inverse softplus of a step drawn log-uniformly
    in ``[dt_min, dt_max]`` (at least ``dt_floor``), one per element of
    ``b``.

    Args:
        weight (Tensor): ``W``, any shape; set in place.
        bias (Tensor): ``b``, any shape; set in place.
        rank (int): Width of the low-rank input ``r`` (``dt_rank``).
        dt_min (float): Smallest initial step. Defaults to 1e-3.
        dt_max (float): Largest initial step. Defaults to 0.1.
        dt_floor (float): Lower clamp of the drawn steps. Defaults to 1e-4.
    """
    std = rank**-0.5
    nn.init.uniform_(weight, -std, std)
    dt = torch.exp(torch.rand(bias.shape) *
                   (math.log(dt_max) - math.log(dt_min)) +
                   math.log(dt_min)).clamp(min=dt_floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))


@torch.no_grad()
def init_mamba_decay(A_log: Tensor) -> None:
    """Mamba's decay rates ``A = -exp(A_log) = -[1, 2, ..., N]`` for every
    channel: ``A_log: [..., N]`` set in place to ``log(1..N)``."""
    d_state = A_log.shape[-1]
    A_log.copy_(torch.arange(1, d_state + 1, dtype=torch.float32).log()
                .expand_as(A_log))
