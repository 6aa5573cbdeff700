"""MILA backbone for MMDetection.

MILA (Mamba-Inspired Linear Attention; MLLA in the authors' code) from
"Demystify Mamba in Vision: A Linear Attention Perspective" (Han et al.,
NeurIPS 2024). MILA is a point of the paper's design space, and this
backbone is that point of :class:`~.design_space.LinearAttentionTransformer`
(:data:`~.design_space.MILA_DESIGN`) with MILA's widths as named archs.
Parameter names are those of the official checkpoints, so ImageNet
(``MLLA_T.pth`` ...) and COCO releases load without renaming. Unlike the
authors' detection code, any input size works: the stem pads to a multiple
of 4, downsampling pads odd maps, and the 2-D RoPE table is built for the
actual grid of every stage (once per size, then cached).
"""
import copy
from typing import Dict, Optional, Sequence, Union

from mmdet.registry import MODELS

from .design_space import (CLASSIFIER_KEYS, MILA_DESIGN,
                           LinearAttentionTransformer)

# Tensors of official checkpoints that a detection backbone does not use:
# the ImageNet classifier and its final norm, and the RoPE tables.
MILA_IGNORED_KEYS = CLASSIFIER_KEYS


@MODELS.register_module()
class MILA(LinearAttentionTransformer):
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
        super().__init__(arch=arch, **MILA_DESIGN, in_channels=in_channels,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_path_rate=drop_path_rate,
                         out_indices=out_indices,
                         frozen_stages=frozen_stages, with_cp=with_cp,
                         norm_cfg=norm_cfg, norm_eval=norm_eval,
                         init_cfg=copy.deepcopy(init_cfg))


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
