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

Like the other backbones, any input size works: the patch embedding pads
to a multiple of 4 and patch merging pads odd grids.
"""
import copy
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmdet.registry import MODELS
from torch import Tensor

from mila_det.ops import rope_table
from ..layers.design_block import BLOCK_DESIGNS, POS_ENCODINGS, DesignBlock
from .base import StageBackbone, init_linear_and_norms

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


class PatchEmbed(nn.Module):
    """Swin's patch embedding: a 4x4 stride-4 conv and a LayerNorm,
    ``[B, 3, H, W] -> [B, N, C]`` on the grid ``(ceil(H/4), ceil(W/4))``
    (the image is zero-padded at the right and bottom)."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, 4, 4)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            x = F.pad(x, (0, -w % 4, 0, -h % 4))
        x = self.proj(x)
        hw = tuple(x.shape[-2:])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PatchMerging(nn.Module):
    """Swin's patch merging: each 2x2 neighbourhood concatenated (odd grids
    padded), LayerNorm(4C), Linear(4C -> 2C, no bias).
    ``[B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, hw: Tuple[int, int]
                ) -> Tuple[Tensor, Tuple[int, int]]:
        b, _, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                       x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        hw = tuple(x.shape[1:3])
        return self.reduction(self.norm(x.flatten(1, 2))), hw


class DesignStage(nn.Module):
    """One stage: ``depth`` :class:`DesignBlock` s, then an optional
    :class:`PatchMerging`.

    Args:
        dim (int): Token width.
        depth (int): Number of blocks.
        drop_paths (Sequence[float]): Stochastic depth of each block.
        downsample (bool): Whether patch merging follows.
        with_cp (bool): Gradient checkpointing of each block.
        rope_width (int): q/k width the stage's RoPE table is built for;
            0 without RoPE.
        **block_kwargs: Passed to every :class:`DesignBlock`.
    """

    def __init__(self, dim: int, depth: int, drop_paths: Sequence[float],
                 downsample: bool, with_cp: bool, rope_width: int,
                 **block_kwargs) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.rope_width = rope_width
        self.blocks = nn.ModuleList([
            DesignBlock(dim, drop_path=drop_paths[i], **block_kwargs)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, hw: Tuple[int, int]):
        """``x: [B, H*W, C]`` -> (stage output ``[B, H*W, C]``, next
        stage's tokens, their grid)."""
        rope = (rope_table(hw[0], hw[1], self.rope_width, x.device)
                if self.rope_width else None)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, hw, rope, use_reentrant=False)
            else:
                x = block(x, hw, rope)
        if self.downsample is None:
            return x, x, hw
        nxt, next_hw = self.downsample(x, hw)
        return x, nxt, next_hw


@MODELS.register_module()
class LinearAttentionTransformer(StageBackbone):
    """The design space's backbone: a Swin-T-shaped linear-attention
    Transformer with Mamba's designs and positional encodings as switches.
    Returns NCHW maps at strides 4/8/16/32.

    Every switch left at None takes the value of the row ``design`` of
    :data:`DESIGN_ROWS`, else the baseline's (shown in brackets).

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
        frozen_stages (int): -1 freezes nothing; 0 the patch embedding; i >= 1
            also stages 0..i-1 (with their patch merging) and their output
            norms. Defaults to -1.
        with_cp (bool): Gradient checkpointing in every block.
            Defaults to False.
        init_cfg (dict, optional): ``dict(type='Pretrained',
            checkpoint=...)`` loads your own weights of the same design.
            Defaults to None (random init: trunc-normal linears, Mamba's
            ``Delta``, ``A`` and ``D`` initialisation, zero APE).
    """
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
                 in_channels: int = 3,
                 mlp_ratio: float = 4.0,
                 qkv_bias: bool = True,
                 drop_path_rate: float = 0.2,
                 pretrain_img_size: int = 224,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=copy.deepcopy(init_cfg))
        name = type(self).__name__
        self.switches = resolve_switches(
            design, input_gate=input_gate, forget_gate=forget_gate,
            scale_input=scale_input, shortcut=shortcut, normalize=normalize,
            single_head=single_head, single_head_dim=single_head_dim,
            block=block, pos_encodings=pos_encodings)
        self.design = design
        self.arch_settings = self._parse_arch(arch)
        self.in_channels = in_channels
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
        self.patch_embed = PatchEmbed(in_channels, embed_dims)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        grid = math.ceil(pretrain_img_size / 4)
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            dim = self.num_features[i]
            rope_width = 0
            if 'rope' in pes:
                rope_width = (sw['single_head_dim'] if sw['single_head']
                              else inner * dim)
            self.layers.append(DesignStage(
                dim, depths[i], dpr[start:start + depths[i]],
                downsample=i < num_stages - 1, with_cp=with_cp,
                rope_width=rope_width, num_heads=num_heads[i],
                block=block_design, mlp_ratio=mlp_ratio,
                pos_encodings=pes, ape_grid=(grid, grid),
                qkv_bias=qkv_bias, **sw))
            grid = math.ceil(grid / 2)
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        self._reset_parameters()
        self._freeze_stages()

    def _reset_parameters(self) -> None:
        init_linear_and_norms(self)
        for m in self.modules():
            if hasattr(m, 'reset_design_parameters'):
                m.reset_design_parameters()

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """``x: [B, 3, H, W]`` (any H, W) -> one ``[B, C_i, H_i, W_i]`` map per
        index in ``out_indices``; ``H_0 = ceil(H / 4)``, halving (rounded up)
        at each later stage."""
        self._check_input(x)
        b = x.shape[0]
        x, hw = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x, next_hw = layer(x, hw)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                outs.append(out.view(b, hw[0], hw[1], out.shape[-1])
                            .permute(0, 3, 1, 2)
                            .contiguous())
            hw = next_hw
        return tuple(outs)
