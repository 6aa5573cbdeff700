"""MILA backbone for MMDetection.

MILA (Mamba-Inspired Linear Attention; MLLA in the authors' code) from
"Demystify Mamba in Vision: A Linear Attention Perspective" (Han et al.,
NeurIPS 2024). Parameter names are those of the official checkpoints, so
ImageNet (``MLLA_T.pth`` ...) and COCO releases load without renaming.
Unlike the authors' detection code, any input size works: the stem pads to a
multiple of 4, downsampling pads odd maps, and the 2-D RoPE table is built
for the actual grid of every stage (once per size, then cached).
"""
import copy
from functools import partial
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmdet.registry import MODELS
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mila_det.ops import rope_table
from ..layers import MILABlock
from ..layers.fused import can_fold, conv2d_act
from .base import StageBackbone, init_linear_and_norms

# Tensors of official checkpoints that a detection backbone does not use:
# the ImageNet classifier and its final norm, and the RoPE tables (derived
# from the grid size, rebuilt here for the real input size).
MILA_IGNORED_KEYS = (r'head\..*', r'norm\.(weight|bias)',
                     r'layers\.\d+\.blocks\.\d+\.attn\.rope\.rotations')


class ConvLayer(nn.Module):
    """Conv2d, then a norm (``norm``, BatchNorm2d unless ``norm_cfg`` says
    otherwise) and ReLU (``act``) if asked.

    In eval mode the norm is an affine map; where
    :func:`~..layers.fused.can_fold` it is folded into the conv's weight and
    bias on the fly (the FLOP counter, tracing the model, still sees the
    BatchNorm), and the ReLU runs inside the conv where
    :func:`~..layers.fused.conv2d_act` can.
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


class Stem(nn.Module):
    """Convolutional stem, stride 4: ``[B, 3, H, W] -> [B, C, H/4, W/4]``.

    The image is zero-padded at the right and bottom to a multiple of 4.
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
        h, w = x.shape[-2:]
        # Unconditional (a no-op pad costs one copy of the image), so a
        # graph traced at one size holds for every size.
        x = F.pad(x, (0, -w % 4, 0, -h % 4))
        x = self.conv1(x)
        x = self.conv2(x) + x
        return self.conv3(x)


class PatchMerging(nn.Module):
    """Stride-2 downsample ``[B, C, H, W] -> [B, 2C, ceil(H/2), ceil(W/2)]``:
    1x1 expand to 8C, depthwise 3x3 stride 2, 1x1 project to 2C with BN."""

    def __init__(self, dim: int, ratio: float = 4.0,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        hidden = int(2 * dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, 2, 1, groups=hidden, norm=False),
            ConvLayer(hidden, 2 * dim, 1, act=False, norm_cfg=norm_cfg))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return self.conv(F.pad(x, (0, w % 2, 0, h % 2)))  # see Stem


class MILALayer(nn.Module):
    """One stage: ``depth`` MILA blocks, then an optional downsample.

    Args:
        dim (int): Token width of the stage.
        depth (int): Number of blocks.
        num_heads (int): Attention heads.
        mlp_ratio (float): MLP hidden width over ``dim``.
        qkv_bias (bool): Bias on the ``qk`` projections.
        drop_paths (Sequence[float]): Stochastic depth rate of each block.
        downsample (bool): Whether a :class:`PatchMerging` follows.
        with_cp (bool): Gradient checkpointing of each block.
        norm_cfg (dict, optional): Norm of the downsample. Defaults to
            BatchNorm2d.
    """

    def __init__(self, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool,
                 drop_paths: Sequence[float], downsample: bool,
                 with_cp: bool, norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.dim = dim
        self.with_cp = with_cp
        self.blocks = nn.ModuleList([
            MILABlock(dim, num_heads, mlp_ratio, qkv_bias, drop_paths[i])
            for i in range(depth)
        ])
        self.downsample = (PatchMerging(dim, norm_cfg=norm_cfg)
                           if downsample else None)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``x: [B, C, H, W]`` -> (stage output ``[B, C, H, W]``, input of
        the next stage)."""
        b, c, h, w = x.shape
        hw = (h, w)
        rope = rope_table(h, w, c, x.device)
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view if NHWC
        for block in self.blocks:
            if self.with_cp and tokens.requires_grad:
                tokens = cp.checkpoint(block, tokens, hw, rope,
                                       use_reentrant=False)
            else:
                tokens = block(tokens, hw, rope)
        out = tokens.view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last
        nxt = self.downsample(out) if self.downsample is not None else out
        return out, nxt


@MODELS.register_module()
class MILA(StageBackbone):
    """MILA backbone returning multi-scale NCHW maps (strides 4/8/16/32).

    Args:
        arch (str | dict): ``'t'``/``'tiny'``, ``'s'``/``'small'``,
            ``'b'``/``'base'``, or a dict with ``embed_dims``, ``depths`` and
            ``num_heads``. Defaults to ``'tiny'``.
        in_channels (int): Image channels. Defaults to 3.
        mlp_ratio (float): MLP hidden width over the token width.
            Defaults to 4.
        qkv_bias (bool): Bias on the attention ``qk`` projection.
            Defaults to True.
        drop_path_rate (float): Stochastic depth, growing linearly from 0 over
            all blocks. Defaults to 0.1.
        out_indices (Sequence[int]): Stages whose (normalised) outputs are
            returned. Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing; 0 the stem; i >= 1 the stem,
            stages 0..i-1 (with their downsamples) and their output norms.
            Defaults to -1.
        with_cp (bool): Gradient checkpointing in every block. Defaults to
            False.
        norm_cfg (dict): Norm of the stem's and downsamplings' convolutions
            (``dict(type='SyncBN')`` for synchronised statistics).
            Defaults to ``dict(type='BN')``.
        norm_eval (bool): Keep those norms in eval mode while training
            (running statistics frozen, as MMDetection's ResNet does for
            detection batches of two images). Defaults to True.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=...)``
            loads an official ImageNet or COCO checkpoint (see
            :func:`mila_det.utils.checkpoint.load_pretrained`). Defaults to
            None (random init as the authors').
    """
    ignored_keys = MILA_IGNORED_KEYS
    arch_keys = ('embed_dims', 'depths', 'num_heads')
    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'tiny'], dict(
            embed_dims=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16))),
        **dict.fromkeys(['s', 'small'], dict(
            embed_dims=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16))),
        **dict.fromkeys(['b', 'base'], dict(
            embed_dims=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24))),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 mlp_ratio: float = 4.0,
                 qkv_bias: bool = True,
                 drop_path_rate: float = 0.1,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 norm_cfg: dict = dict(type='BN'),
                 norm_eval: bool = True,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        self.arch_settings = self._parse_arch(arch)
        self.in_channels = in_channels
        self.norm_eval = norm_eval
        embed_dims = self.arch_settings['embed_dims']
        depths = list(self.arch_settings['depths'])
        num_heads = list(self.arch_settings['num_heads'])
        num_stages = len(depths)
        self.num_features = [embed_dims * 2**i for i in range(num_stages)]
        self.out_indices = self._check_stages('MILA', num_stages, out_indices,
                                              frozen_stages)
        self.frozen_stages = frozen_stages

        self.patch_embed = Stem(in_channels, embed_dims, norm_cfg)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(
                MILALayer(self.num_features[i], depths[i], num_heads[i],
                          mlp_ratio, qkv_bias, dpr[start:start + depths[i]],
                          downsample=i < num_stages - 1, with_cp=with_cp,
                          norm_cfg=norm_cfg))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        self._reset_parameters()
        self._freeze_stages()

    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        settings = super()._parse_arch(arch)
        if len(settings['depths']) != len(settings['num_heads']):
            raise ValueError('MILA: depths and num_heads differ in length')
        return settings

    def _reset_parameters(self) -> None:
        init_linear_and_norms(self)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """``x: [B, 3, H, W]`` (any H, W) -> one ``[B, C_i, H_i, W_i]`` map per
        index in ``out_indices``; ``H_0 = ceil(H / 4)``, halving (rounded up)
        at each later stage."""
        self._check_input(x)
        # Channels-last maps are token-major: stages read and write them as
        # [B, N, C] tokens without copies, and the convs run faster on them.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        outs = []
        for i, layer in enumerate(self.layers):
            out, x = layer(x)
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                out = norm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                outs.append(out.contiguous())
        return tuple(outs)


@MODELS.register_module()
class MLLA(MILA):
    """MILA under its authors' name, accepting their config keywords.

    ``embed_dim``/``depths``/``num_heads`` build the arch, ``use_checkpoint``
    maps to ``with_cp``; ``img_size``, ``patch_size`` (must be 4),
    ``in_chans``, ``num_classes``, ``qk_scale`` and ``drop_rate`` (must be 0)
    are accepted as the authors' configs pass them.
    """

    def __init__(self, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24),
                 use_checkpoint: bool = False, img_size: int = 224,
                 patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, **kwargs) -> None:
        if patch_size != 4 or drop_rate or qk_scale is not None:
            raise ValueError('MLLA: only patch_size=4, drop_rate=0 and '
                             'qk_scale=None exist in the official models')
        arch = kwargs.pop('arch', dict(embed_dims=embed_dim, depths=depths,
                                       num_heads=num_heads))
        kwargs.setdefault('with_cp', use_checkpoint)
        super().__init__(arch=arch, in_channels=in_chans, **kwargs)
