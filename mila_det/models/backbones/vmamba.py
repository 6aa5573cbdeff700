"""VMamba backbone for MMDetection.

VMamba: "VMamba: Visual State Space Model" (Liu et al., NeurIPS 2024), in
the configuration of its authors' detection models: ``forward_type
"v05_noz"``, channel-first layers, patch embed v2, downsample v3. Parameter
names are the official ones, so ``vssm1_tiny_0230s_ckpt_epoch_264.pth`` and
its siblings load as released. No CUDA extension is needed: the scan runs as
Triton kernels on CUDA and as a chunked PyTorch scan elsewhere.
"""
import copy
from typing import Dict, Optional, Sequence, Union

import torch.nn as nn
from mmdet.registry import MODELS

from ..layers import LayerNorm2d, VSSBlock
from .base import Stage, StageBackbone

# Official ImageNet tensors a detection backbone does not use.
VMAMBA_IGNORED_KEYS = (r'classifier\..*', )


@MODELS.register_module()
class VMamba(StageBackbone):
    """VMamba backbone returning NCHW maps at strides 4/8/16/32.

    Args:
        arch (str | dict): ``'t'``/``'tiny'``, ``'s'``/``'small'``,
            ``'b'``/``'base'``, or a dict with ``dims`` (int: width of stage 0,
            doubled per stage; or four ints), ``depths``, ``ssm_ratio`` and
            ``d_state``. Defaults to ``'tiny'``.
        dims, depths, ssm_ratio, d_state: Override the arch's value.
            Defaults to None (keep it).
        dt_rank (int | str): Rank of the step projection; ``'auto'`` is
            ``ceil(C / 16)``. Defaults to ``'auto'``.
        mlp_ratio (float): MLP hidden width over C. Defaults to 4.
        in_channels (int): Image channels. Defaults to 3.
        drop_path_rate (float): Stochastic depth, linear over all blocks.
            Defaults to 0.2.
        out_indices (Sequence[int]): Stages returned (each through
            ``outnorm{i}``). Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 nothing; 0 the stem; i >= 1 the stem and
            stages 0..i-1 with their downsamples and output norms.
            Defaults to -1.
        with_cp (bool): Gradient checkpointing per block. Defaults to False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=...)``
            for official ImageNet or COCO files. Defaults to None.
    """
    ignored_keys = VMAMBA_IGNORED_KEYS
    norm_prefix = 'outnorm'
    arch_keys = ('dims', 'depths', 'ssm_ratio', 'd_state')
    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'tiny'], dict(
            dims=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, d_state=1)),
        **dict.fromkeys(['s', 'small'], dict(
            dims=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, d_state=1)),
        **dict.fromkeys(['b', 'base'], dict(
            dims=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, d_state=1)),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 dims: Union[int, Sequence[int], None] = None,
                 depths: Optional[Sequence[int]] = None,
                 ssm_ratio: Optional[float] = None,
                 d_state: Optional[int] = None,
                 dt_rank: Union[int, str] = 'auto',
                 mlp_ratio: float = 4.0,
                 in_channels: int = 3,
                 drop_path_rate: float = 0.2,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        self.in_channels = in_channels
        settings = self._parse_arch(arch)
        for key, value in (('dims', dims), ('depths', depths),
                           ('ssm_ratio', ssm_ratio), ('d_state', d_state)):
            if value is not None:
                settings[key] = value
        self.arch_settings = settings
        depths = list(settings['depths'])
        num_stages = len(depths)
        dims = settings['dims']
        if isinstance(dims, int):
            dims = [dims * 2**i for i in range(num_stages)]
        if len(dims) != num_stages:
            raise ValueError(f'VMamba: {len(dims)} dims for {num_stages} '
                             'stages')
        if int(settings['d_state']) < 1:
            raise ValueError(f"VMamba: d_state must be >= 1, got "
                             f"{settings['d_state']}")
        self.num_features = list(dims)
        self.out_indices = self._check_stages('VMamba', num_stages,
                                              out_indices, frozen_stages)
        self.frozen_stages = frozen_stages

        stem = dims[0] // 2
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 2, 1), nn.Identity(),
            LayerNorm2d(stem), nn.Identity(), nn.GELU(),
            nn.Conv2d(stem, dims[0], 3, 2, 1), nn.Identity(),
            LayerNorm2d(dims[0]))
        dprs = self.drop_path_rates(depths, drop_path_rate)
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            blocks = [
                VSSBlock(dims[i], d_state=int(settings['d_state']),
                         ssm_ratio=float(settings['ssm_ratio']),
                         dt_rank=dt_rank, mlp_ratio=mlp_ratio,
                         drop_path=dprs[i][j]) for j in range(depths[i])
            ]
            # The official layout: a stride-2 3x3 conv and LayerNorm2d at
            # indices 1 and 3 of a Sequential.
            downsample = nn.Sequential(
                nn.Identity(), nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1),
                nn.Identity(), LayerNorm2d(dims[i + 1])) \
                if i < num_stages - 1 else None
            self.layers.append(Stage(blocks, downsample, with_cp))
        self._finish()


@MODELS.register_module()
class MM_VSSM(VMamba):
    """VMamba under its authors' MMDetection name, taking their keywords.

    Maps ``ssm_d_state``, ``ssm_dt_rank``, ``use_checkpoint`` and
    ``pretrained``; checks that ``forward_type``, ``downsample_version``,
    ``patchembed_version``, ``norm_layer`` and ``ssm_conv`` are the ones
    implemented; ignores the Swin keys their base config merges in.

    Initialisation follows the authors' ``MM_VSSM``, which never passes an
    ``init_cfg`` to MMEngine: the ``init_cfg`` their Swin base config merges
    in (a Swin checkpoint URL) is dropped, never downloaded. ``pretrained``
    alone names the checkpoint: a path or address loads it (strictly, see
    :func:`mila_det.utils.checkpoint.load_pretrained`); ``''`` (their
    configs' value) or None keeps the weights the constructor drew, and
    ``init_weights`` leaves them as they are, as MMEngine does with the
    authors' class. Use type ``VMamba`` for an MMDetection-style
    ``init_cfg``.

    Args:
        ssm_d_state (int): State size N. Defaults to 1.
        ssm_dt_rank (int | str): Rank of the step projection. Defaults to
            ``'auto'``.
        use_checkpoint (bool): Gradient checkpointing (or ``with_cp``).
            Defaults to False.
        pretrained (str, optional): Checkpoint to load in ``init_weights``;
            ``''`` or None for none. Defaults to None.
        dims (int | Sequence[int]): Widths. Defaults to 96.
        depths (Sequence[int]): Blocks per stage. Defaults to (2, 2, 9, 2).
        ssm_ratio (float): SSM inner width over C. Defaults to 2.0.
        **kwargs: Other :class:`VMamba` arguments, and the authors' fixed
            or Swin keys listed in ``_fixed`` / ``_swin_keys``.
    """
    _fixed = dict(forward_type='v05_noz', downsample_version='v3',
                  patchembed_version='v2', norm_layer='ln2d', ssm_conv=3,
                  ssm_conv_bias=False, patch_size=4, ssm_act_layer='silu',
                  mlp_act_layer='gelu', posembed=False, gmlp=False)
    _swin_keys = ('embed_dims', 'num_heads', 'window_size', 'qkv_bias',
                  'qk_scale', 'drop_rate', 'attn_drop_rate', 'patch_norm',
                  'convert_weights', 'in_chans', 'num_classes',
                  'ssm_drop_rate', 'mlp_drop_rate', 'ssm_init',
                  'channel_first', 'imgsize')

    def __init__(self, ssm_d_state: int = 1,
                 ssm_dt_rank: Union[int, str] = 'auto',
                 use_checkpoint: bool = False,
                 pretrained: Optional[str] = None,
                 dims: Union[int, Sequence[int]] = 96,
                 depths: Sequence[int] = (2, 2, 9, 2), ssm_ratio: float = 2.0,
                 **kwargs) -> None:
        for key, want in self._fixed.items():
            if key in kwargs and kwargs.pop(key) != want:
                raise ValueError(f'MM_VSSM: only {key}={want!r} is '
                                 'implemented')
        for key in self._swin_keys:
            kwargs.pop(key, None)
        dropped = kwargs.pop('init_cfg', None)
        init_cfg = (dict(type='Pretrained', checkpoint=pretrained)
                    if pretrained else None)
        # The Swin base sets with_cp=False; use_checkpoint must still count.
        with_cp = bool(kwargs.pop('with_cp', False) or use_checkpoint)
        kwargs.setdefault('arch', dict(dims=dims, depths=depths,
                                       ssm_ratio=ssm_ratio,
                                       d_state=ssm_d_state))
        super().__init__(dt_rank=ssm_dt_rank, with_cp=with_cp,
                         init_cfg=init_cfg, **kwargs)
        self.pretrained = pretrained
        self.dropped_init_cfg = dropped

    def init_weights(self) -> None:
        """Load ``pretrained`` if it names a checkpoint; otherwise keep the
        constructor's weights (the authors' class is never re-initialised)
        and say so when a config expected otherwise."""
        if self.init_cfg is not None:
            super().init_weights()
            return
        import logging

        from mmengine.logging import print_log
        if self.pretrained is not None or self.dropped_init_cfg:
            note = ''
            if self.dropped_init_cfg:
                note = (f' The init_cfg it was given '
                        f'({dict(self.dropped_init_cfg)}; in the authors\' '
                        'configs, from their Swin base) is not used, as in '
                        "the authors' MM_VSSM.")
            print_log(
                f'MM_VSSM: pretrained={self.pretrained!r} names no checkpoint'
                ', so the backbone keeps its random init.' + note + ' Set '
                'model.backbone.pretrained=PATH to load ImageNet weights.',
                logger='current', level=logging.WARNING)
        self._is_init = True
