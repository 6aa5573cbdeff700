"""Stems and downsampling layers, on channels-last NCHW maps.

Two of each, one per macro design:

- MILA's (Han et al., "Demystify Mamba in Vision: A Linear Attention
  Perspective", NeurIPS 2024): :class:`ConvStem`, a stride-4 stack of 3x3
  convolutions with BatchNorm, and :class:`ConvDownsample`, a 1x1 expansion,
  a stride-2 depthwise 3x3 convolution and a 1x1 projection. Parameter names
  follow the official MILA checkpoints.
- Swin's (Liu et al., "Swin Transformer", ICCV 2021), which the MILA
  paper's design space keeps: :class:`PatchEmbed`, a 4x4 stride-4
  convolution and a LayerNorm, and :class:`PatchMerging2x2`, each 2x2
  neighbourhood concatenated and projected.

All take and return ``[B, C, H, W]`` maps (channels-last memory, so stages
read them as tokens without copies) and accept any size: the stems pad the
image to a multiple of 4 and the downsampling layers pad odd maps, at the
right and bottom (:func:`pad_to_multiple`), and only maps that need it: a
pad of zero would copy the map.
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .common import LayerNorm2d
from .fused import can_fold, conv2d_act


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """``x: [B, C, H, W]`` zero-padded at the bottom and right to ``H`` and
    ``W`` that divide by ``multiple``; ``x`` itself when they already do (a
    pad of zero would copy it). Under symbolic sizes that are multiples of
    32, as the ONNX tool exports, the test is decided without a guard."""
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        return F.pad(x, (0, -w % multiple, 0, -h % multiple))
    return x


class ConvLayer(nn.Module):
    """Conv2d, then a norm (``norm``, BatchNorm2d unless ``norm_cfg`` says
    otherwise) and ReLU (``act``) if asked.

    In eval mode the norm is an affine map; where
    :func:`~.fused.can_fold` it is folded into the conv's weight and bias on
    the fly (the FLOP counter, tracing the model, still sees the BatchNorm),
    and the ReLU runs inside the conv where :func:`~.fused.conv2d_act` can.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Defaults to 3.
        stride (int): Defaults to 1.
        padding (int): Defaults to 0.
        groups (int): Defaults to 1.
        bias (bool): Bias on the conv. Defaults to True.
        norm (bool): Whether a norm follows. Defaults to True.
        act (bool): Whether a ReLU follows. Defaults to True.
        norm_cfg (dict, optional): The norm. Defaults to BatchNorm2d.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int = 3,
                 stride: int = 1,
                 padding: int = 0,
                 groups: int = 1,
                 bias: bool = True,
                 norm: bool = True,
                 act: bool = True,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              padding, groups=groups, bias=bias)
        self.norm = (build_norm_layer(norm_cfg or dict(type='BN'),
                                      out_channels)[1] if norm else None)
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: Tensor) -> Tensor:
        norm, conv = self.norm, self.conv
        act = 'relu' if self.act is not None else None
        if (isinstance(norm, _BatchNorm) and not norm.training
                and norm.running_var is not None and can_fold(x)):
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            bias = norm.bias - norm.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            return conv2d_act(x, conv.weight * scale.view(-1, 1, 1, 1), bias,
                              act, conv.stride, conv.padding, conv.groups)
        if norm is None:
            return conv2d_act(x, conv.weight, conv.bias, act, conv.stride,
                              conv.padding, conv.groups)
        x = norm(conv(x))
        return x if self.act is None else self.act(x)


class ConvStem(nn.Module):
    """MILA's convolutional stem, stride 4:
    ``[B, 3, H, W] -> [B, C, ceil(H/4), ceil(W/4)]``.

    ``conv1`` (3x3 stride 2 to C/2), a residual pair of 3x3 convs
    (``conv2``), ``conv3`` (3x3 stride 2 to 4C, 1x1 to C), each with a norm.

    Args:
        in_channels (int): Image channels.
        embed_dims (int): Output width C.
        norm_cfg (dict, optional): Norm of every conv. Defaults to
            BatchNorm2d.
    """

    def __init__(self, in_channels: int, embed_dims: int,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        half = embed_dims // 2
        conv = partial(ConvLayer, bias=False, norm_cfg=norm_cfg)
        self.conv1 = conv(in_channels, half, 3, 2, 1)
        self.conv2 = nn.Sequential(conv(half, half, 3, 1, 1),
                                   conv(half, half, 3, 1, 1, act=False))
        self.conv3 = nn.Sequential(
            conv(half, embed_dims * 4, 3, 2, 1),
            conv(embed_dims * 4, embed_dims, 1, act=False))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(pad_to_multiple(x, 4))
        x = self.conv2(x) + x
        return self.conv3(x)


class ConvDownsample(nn.Module):
    """MILA's stride-2 downsampling ``[B, C, H, W] -> [B, 2C, ceil(H/2),
    ceil(W/2)]``: 1x1 expansion to ``2 C ratio``, depthwise 3x3 stride 2,
    1x1 projection to 2C with a norm.

    Args:
        dim (int): Input width C.
        ratio (float): Expansion over the output width. Defaults to 4.
        norm_cfg (dict, optional): Norm of the projection. Defaults to
            BatchNorm2d.
    """

    def __init__(self, dim: int, ratio: float = 4.0,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        hidden = int(2 * dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, 2, 1, groups=hidden, norm=False),
            ConvLayer(hidden, 2 * dim, 1, act=False, norm_cfg=norm_cfg))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(pad_to_multiple(x, 2))


class PatchEmbed(nn.Module):
    """Swin's patch embedding: a 4x4 stride-4 conv (``proj``) and a
    LayerNorm over channels (``norm``),
    ``[B, 3, H, W] -> [B, C, ceil(H/4), ceil(W/4)]``.

    Args:
        in_channels (int): Image channels.
        embed_dims (int): Output width C.
    """

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, 4, 4)
        self.norm = LayerNorm2d(embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(pad_to_multiple(x, 4)))


class PatchMerging2x2(nn.Module):
    """Swin's patch merging: each 2x2 neighbourhood's four C-vectors
    concatenated (odd maps padded), LayerNorm(4C) (``norm``), Linear(4C ->
    2C, no bias) (``reduction``).
    ``[B, C, H, W] -> [B, 2C, ceil(H/2), ceil(W/2)]``.

    Args:
        dim (int): Input width C.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        t = pad_to_multiple(x, 2).permute(0, 2, 3, 1)
        t = torch.cat([t[:, 0::2, 0::2], t[:, 1::2, 0::2],
                       t[:, 0::2, 1::2], t[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(t)).permute(0, 3, 1, 2)
