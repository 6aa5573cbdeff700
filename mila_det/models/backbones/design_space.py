"""The MILA paper's linear-attention design space as a detection backbone.

"Demystify Mamba in Vision: A Linear Attention Perspective" (Han et al.,
NeurIPS 2024) measures Mamba's designs by adding each one alone to a
baseline linear-attention Transformer with Swin-T's macro design (its
Table 1), and positional encodings likewise (its Table 2). None of those
models is public. :class:`LinearAttentionTransformer` builds any of them,
and any combination, from switches; :data:`DESIGN_ROWS` names the tables'
rows (plus one combination), and :data:`PUBLISHED` holds the paper's
figures for them. Where the paper leaves a detail open, the reading taken
here is stated in docs/design_space.md, which also compares the counts.

MILA is a point of this space: :data:`MILA_DESIGN` (the ``'sub'`` block
with CPE, LePE and RoPE, MILA's normaliser, MILA's convolutional stem and
downsampling) at MILA's widths loads MILA's official checkpoints, and the
``MILA`` backbone is that preset.

Like the other backbones, any input size works: the stems pad to a
multiple of 4 and the downsampling layers pad odd grids.
"""
import copy
import math
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmdet.registry import MODELS
from torch import Tensor

from mila_det.ops import rope_table
from ..layers.design_block import BLOCK_DESIGNS, POS_ENCODINGS, DesignBlock
from ..layers.embed import (ConvDownsample, ConvStem, PatchEmbed,
                            PatchMerging2x2)
from .base import Stage, StageBackbone, run_blocks

# Row name -> the switches that differ from the baseline. Table 1 and
# Table 2 rows, then combinations that are in neither table.
DESIGN_ROWS: Dict[str, dict] = {
    'baseline': dict(),
    'input_gate': dict(input_gate=True),
    'forget_gate': dict(forget_gate=True),
    'shortcut': dict(shortcut=True),
    'no_norm': dict(normalize=False),
    'single_head': dict(single_head=True),
    'block_all': dict(block='all'),
    'block_sub': dict(block='sub'),
    'ape': dict(pos_encodings=('ape', )),
    'lepe': dict(pos_encodings=('lepe', )),
    'cpe': dict(pos_encodings=('cpe', )),
    'rope': dict(pos_encodings=('rope', )),
    # MILA's block and positional encodings on the Swin-T macro design (not
    # MILA's conv stem, downsampling or widths), with the forget gate added.
    'mila_like_forget_gate': dict(block='sub', forget_gate=True,
                                  pos_encodings=('cpe', 'lepe', 'rope')),
}

# MILA in the design space's terms: its block and encodings, the normaliser
# of the authors' code (q . mean(k) + eps), its stem and downsampling. With
# MILA's widths (e.g. embed_dims=64, depths=(2, 4, 8, 4), num_heads=(2, 4,
# 8, 16) for MILA-T) it loads MILA's official checkpoints.
MILA_DESIGN: Dict[str, object] = dict(
    block='sub', pos_encodings=('lepe', 'cpe', 'rope'), mean_normaliser=True,
    stem='conv', downsample='conv')

# Tensors of classification checkpoints (MILA's official ImageNet files
# among them) that a detection backbone does not use: the classifier and its
# final norm, and RoPE tables (derived from the grid size, rebuilt here for
# the real input size).
CLASSIFIER_KEYS = (r'head\..*', r'norm\.(weight|bias)',
                   r'layers\.\d+\.blocks\.\d+\.attn\.rope\.rotations')

STEMS = ('patch', 'conv')
DOWNSAMPLES = ('merge', 'conv')

# Row name -> (params M, GFLOPs, throughput img/s, ImageNet top-1) as the
# paper prints them (Table 1 and Table 2, 224x224).
PUBLISHED: Dict[str, Tuple[float, float, int, float]] = {
    'baseline': (28, 4.5, 1152, 77.6),
    'input_gate': (29, 4.5, 1069, 77.8),
    'forget_gate': (29, 4.8, 743, 78.4),
    'shortcut': (28, 4.5, 1066, 77.8),
    'no_norm': (28, 4.5, 1215, 72.4),
    'single_head': (24, 3.9, 1540, 73.5),
    'block_all': (28, 4.7, 915, 79.4),
    'block_sub': (31, 4.8, 1010, 80.9),
    'ape': (30, 4.5, 1132, 80.0),
    'lepe': (28, 4.5, 1074, 81.6),
    'cpe': (28, 4.5, 1099, 81.7),
    'rope': (28, 4.5, 1113, 80.0),
}

# The switches and their baseline values.
BASELINE_SWITCHES: Dict[str, object] = dict(
    input_gate=False, forget_gate=False, scale_input=False, shortcut=False,
    normalize=True, single_head=False, single_head_dim=32,
    block='transformer', pos_encodings=())

_BOOL_SWITCHES = ('input_gate', 'forget_gate', 'scale_input', 'shortcut',
                  'normalize', 'single_head')


def resolve_switches(design: Optional[str] = None, **given) -> dict:
    """The switches of a design: the baseline's, updated by the row
    ``design`` of :data:`DESIGN_ROWS`, updated by every ``given`` value that
    is not None. Raises ``ValueError`` naming the switch (or both switches)
    at fault."""
    name = 'LinearAttentionTransformer'
    unknown = set(given) - set(BASELINE_SWITCHES)
    if unknown:
        raise TypeError(f'{name}: unknown switches {sorted(unknown)}; known: '
                        f'{sorted(BASELINE_SWITCHES)}')
    sw = dict(BASELINE_SWITCHES)
    if design is not None:
        if design not in DESIGN_ROWS:
            raise ValueError(f'{name}: design={design!r} is not a row of '
                             f'DESIGN_ROWS; choose from {sorted(DESIGN_ROWS)}')
        sw.update(DESIGN_ROWS[design])
    sw.update({k: v for k, v in given.items() if v is not None})

    for key in _BOOL_SWITCHES:
        if not isinstance(sw[key], bool):
            raise ValueError(f'{name}: {key} must be True or False, got '
                             f'{sw[key]!r}')
    if sw['block'] not in BLOCK_DESIGNS:
        raise ValueError(f'{name}: block must be one of {BLOCK_DESIGNS}, '
                         f'got {sw["block"]!r}')
    dim = sw['single_head_dim']
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f'{name}: single_head_dim must be a positive int, '
                         f'got {dim!r}')
    pes = sw['pos_encodings']
    if isinstance(pes, str) or not isinstance(pes, (list, tuple)):
        raise ValueError(f'{name}: pos_encodings must be a list or tuple of '
                         f'names from {POS_ENCODINGS}, got {pes!r}')
    bad = [p for p in pes if p not in POS_ENCODINGS]
    if bad:
        raise ValueError(f'{name}: pos_encodings has unknown names {bad}; '
                         f'choose from {POS_ENCODINGS}')
    if len(set(pes)) != len(pes):
        raise ValueError(f'{name}: pos_encodings names one encoding twice: '
                         f'{tuple(pes)}')
    sw['pos_encodings'] = tuple(p for p in POS_ENCODINGS if p in pes)
    if sw['scale_input'] and not sw['forget_gate']:
        raise ValueError(f'{name}: scale_input=True (Mamba\'s input scaling '
                         'of the forget gate\'s scan) needs forget_gate=True')
    if sw['single_head'] and 'rope' in pes and dim % 4:
        raise ValueError(f'{name}: single_head with pos_encodings "rope" '
                         f'needs single_head_dim divisible by 4 (the 2-D '
                         f'RoPE rotates channel pairs per axis), got {dim}')
    return sw


class AttentionStage(Stage):
    """A stage of :class:`~..layers.DesignBlock` s (MILA's blocks
    included): the blocks see the map as tokens ``[B, H*W, C]`` with the
    grid and the stage's RoPE table (one per grid size, shared by the
    blocks).

    Args:
        blocks (Iterable[nn.Module]): The blocks.
        downsample (nn.Module, optional): The downsampling after them.
        with_cp (bool): Gradient checkpointing of each block.
        rope_width (int): q/k width the stage's RoPE table is built for;
            0 without RoPE.
    """

    def __init__(self, blocks: Iterable[nn.Module],
                 downsample: Optional[nn.Module], with_cp: bool,
                 rope_width: int) -> None:
        super().__init__(blocks, downsample, with_cp)
        self.rope_width = rope_width

    def run_blocks(self, tokens: Tensor) -> Tensor:
        """``tokens: [B, H, W, C]`` -> ``[B, H, W, C]``."""
        b, h, w, c = tokens.shape
        rope = (rope_table(h, w, self.rope_width, tokens.device)
                if self.rope_width else None)
        # Views of the map's channels-last memory, in and out.
        out = run_blocks(self.blocks, tokens.reshape(b, h * w, c), (h, w),
                         rope, with_cp=self.with_cp)
        return out.view(b, h, w, c)


@MODELS.register_module()
class LinearAttentionTransformer(StageBackbone):
    """The design space's backbone: a linear-attention Transformer with
    Mamba's designs and positional encodings as switches, on Swin-T's macro
    design (patch embedding, patch merging) or MILA's (convolutional stem and
    downsampling). Returns NCHW maps at strides 4/8/16/32.

    Every switch left at None takes the value of the row ``design`` of
    :data:`DESIGN_ROWS`, else the baseline's (shown in brackets).
    ``LinearAttentionTransformer(arch=<MILA's widths>, **MILA_DESIGN)`` is
    MILA and loads its official checkpoints.

    Args:
        arch (str | dict): ``'t'``/``'tiny'`` (Swin-T: 96 wide, depths
            2/2/6/2, heads 3/6/12/24) or a dict with ``embed_dims``,
            ``depths``, ``num_heads``. Defaults to ``'tiny'``.
        design (str, optional): A row of :data:`DESIGN_ROWS` (e.g.
            ``'forget_gate'``). Defaults to None (the baseline).
        input_gate (bool, optional): Gate the values of the attention's
            numerator by Mamba's ``Delta`` [False].
        forget_gate (bool, optional): Causal attention with Mamba's decay
            ``exp(Delta A)`` in raster order [False].
        scale_input (bool, optional): Mamba's input scaling in that scan
            (``Delta * v`` as input; needs ``forget_gate``) [False].
        shortcut (bool, optional): ``+ D * v`` after the attention [False].
        normalize (bool, optional): Divide by ``q . sum(k)`` (off: by N)
            [True].
        single_head (bool, optional): One head with narrow q, k
            (``single_head_dim``) shared by all channels [False].
        single_head_dim (int, optional): That q/k width [32].
        block (str, optional): ``'transformer'``, ``'sub'`` (Mamba's block
            replaces the attention sub-block) or ``'all'`` (it replaces the
            whole block) ['transformer'].
        pos_encodings (Sequence[str], optional): Any of ``'ape'``,
            ``'lepe'``, ``'cpe'``, ``'rope'`` [()].
        mean_normaliser (bool): Add the normaliser's ``eps`` to
            ``q . mean(k)`` as MILA's authors do, rather than to
            ``q . sum(k)``. Defaults to False.
        stem (str): ``'patch'`` (Swin's 4x4 patch embedding and LayerNorm)
            or ``'conv'`` (MILA's convolutional stem). Defaults to
            ``'patch'``.
        downsample (str): ``'merge'`` (Swin's 2x2 patch merging) or
            ``'conv'`` (MILA's 1x1 / depthwise 3x3 stride 2 / 1x1).
            Defaults to ``'merge'``.
        in_channels (int): Image channels. Defaults to 3.
        mlp_ratio (float): MLP hidden width over the token width.
            Defaults to 4.
        qkv_bias (bool): Bias on the q/k(/v) projection. Defaults to True.
        drop_path_rate (float): Stochastic depth, growing linearly from 0
            over all blocks. Defaults to 0.2.
        pretrain_img_size (int): Image size the APE tables are made for
            (resized bicubically to other grids). Defaults to 224.
        out_indices (Sequence[int]): Stages whose (normalised) outputs are
            returned. Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing; 0 the stem; i >= 1 also
            stages 0..i-1 (with their downsampling) and their output norms.
            Defaults to -1.
        with_cp (bool): Gradient checkpointing in every block.
            Defaults to False.
        norm_cfg (dict): Norm of the convolutional stem's and downsampling's
            convolutions (``dict(type='SyncBN')`` for synchronised
            statistics). Defaults to ``dict(type='BN')``.
        norm_eval (bool): Keep those norms in eval mode while training.
            Defaults to True.
        init_cfg (dict, optional): ``dict(type='Pretrained',
            checkpoint=...)`` loads weights of the same design (MILA's
            official files for :data:`MILA_DESIGN`). Defaults to None
            (random init: trunc-normal linears, Mamba's ``Delta``, ``A`` and
            ``D`` initialisation, zero APE).
    """
    ignored_keys = CLASSIFIER_KEYS
    arch_keys = ('embed_dims', 'depths', 'num_heads')
    arch_zoo: Dict[str, dict] = dict.fromkeys(
        ['t', 'tiny'], dict(embed_dims=96, depths=(2, 2, 6, 2),
                            num_heads=(3, 6, 12, 24)))

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 design: Optional[str] = None,
                 input_gate: Optional[bool] = None,
                 forget_gate: Optional[bool] = None,
                 scale_input: Optional[bool] = None,
                 shortcut: Optional[bool] = None,
                 normalize: Optional[bool] = None,
                 single_head: Optional[bool] = None,
                 single_head_dim: Optional[int] = None,
                 block: Optional[str] = None,
                 pos_encodings: Optional[Sequence[str]] = None,
                 mean_normaliser: bool = False,
                 stem: str = 'patch',
                 downsample: str = 'merge',
                 in_channels: int = 3,
                 mlp_ratio: float = 4.0,
                 qkv_bias: bool = True,
                 drop_path_rate: float = 0.2,
                 pretrain_img_size: int = 224,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 norm_cfg: dict = dict(type='BN'),
                 norm_eval: bool = True,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        name = type(self).__name__
        self.switches = resolve_switches(
            design, input_gate=input_gate, forget_gate=forget_gate,
            scale_input=scale_input, shortcut=shortcut, normalize=normalize,
            single_head=single_head, single_head_dim=single_head_dim,
            block=block, pos_encodings=pos_encodings)
        if stem not in STEMS:
            raise ValueError(f'{name}: stem must be one of {STEMS}, got '
                             f'{stem!r}')
        if downsample not in DOWNSAMPLES:
            raise ValueError(f'{name}: downsample must be one of '
                             f'{DOWNSAMPLES}, got {downsample!r}')
        if not isinstance(mean_normaliser, bool):
            raise ValueError(f'{name}: mean_normaliser must be True or '
                             f'False, got {mean_normaliser!r}')
        self.design = design
        self.arch_settings = self._parse_arch(arch)
        self.in_channels = in_channels
        self.norm_eval = norm_eval
        embed_dims = self.arch_settings['embed_dims']
        depths = list(self.arch_settings['depths'])
        num_heads = list(self.arch_settings['num_heads'])
        if len(depths) != len(num_heads):
            raise ValueError(f'{name}: depths and num_heads differ in length')
        num_stages = len(depths)
        self.num_features = [embed_dims * 2**i for i in range(num_stages)]
        self.out_indices = self._check_stages(name, num_stages, out_indices,
                                              frozen_stages)
        self.frozen_stages = frozen_stages

        sw = dict(self.switches)
        block_design = sw.pop('block')
        pes = sw.pop('pos_encodings')
        inner = 2 if block_design == 'all' else 1
        for i, dim in enumerate(self.num_features):
            if (inner * dim) % num_heads[i]:
                raise ValueError(f'{name}: num_heads={num_heads[i]} does not '
                                 f'divide the attention width {inner * dim} '
                                 f'of stage {i}')
            if ('rope' in pes and not sw['single_head']
                    and (inner * dim) % 4):
                raise ValueError(f'{name}: pos_encodings "rope" needs an '
                                 f'attention width divisible by 4, got '
                                 f'{inner * dim} at stage {i}')
        if stem == 'patch':
            self.patch_embed = PatchEmbed(in_channels, embed_dims)
        else:
            self.patch_embed = ConvStem(in_channels, embed_dims, norm_cfg)
        dprs = self.drop_path_rates(depths, drop_path_rate)
        grid = math.ceil(pretrain_img_size / 4)
        self.layers = nn.ModuleList()
        for i, dim in enumerate(self.num_features):
            rope_width = 0
            if 'rope' in pes:
                rope_width = (sw['single_head_dim'] if sw['single_head']
                              else inner * dim)
            blocks = [
                DesignBlock(dim, num_heads[i], block=block_design,
                            mlp_ratio=mlp_ratio, drop_path=dprs[i][j],
                            pos_encodings=pes, ape_grid=(grid, grid),
                            qkv_bias=qkv_bias,
                            mean_normaliser=mean_normaliser, **sw)
                for j in range(depths[i])
            ]
            down = None
            if i < num_stages - 1:
                down = (PatchMerging2x2(dim) if downsample == 'merge' else
                        ConvDownsample(dim, norm_cfg=norm_cfg))
            self.layers.append(AttentionStage(blocks, down, with_cp,
                                              rope_width))
            grid = math.ceil(grid / 2)
        self._finish()
