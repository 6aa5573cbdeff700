"""The skeleton of every backbone here (MILA, VMamba and the design
space's LinearAttentionTransformer), as mmpretrain's and MMDetection's
backbones are built: a stem ``patch_embed``, stages ``layers[i]`` (blocks,
then the stage's own downsampling), an output norm per returned stage,
stage indices, freezing, random init and initialisation from an official
checkpoint."""
import re
from typing import (Dict, Iterable, List, Optional, Sequence, Tuple,
                    Union)

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mila_det.utils.checkpoint import load_pretrained
from ..layers import LayerNorm2d


def init_linear_and_norms(module: nn.Module) -> None:
    """The authors' init (MILA and VMamba alike): trunc-normal(0.02) weights
    and zero bias for every Linear (Linear2d included), weight 1 and bias 0
    for every LayerNorm; convolutions keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def run_blocks(blocks: Iterable[nn.Module], x: Tensor, *args,
               with_cp: bool = False) -> Tensor:
    """``x`` through each block in turn, ``x = block(x, *args)``; with
    ``with_cp``, each block under gradient checkpointing where ``x`` needs a
    gradient (its activations recomputed in the backward)."""
    for block in blocks:
        if with_cp and x.requires_grad:
            x = cp.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


class Stage(nn.Module):
    """One stage on channels-last NCHW maps: ``blocks`` on the map's tokens
    ``[B, H, W, C]`` (a view of its memory), then ``downsample`` if any.

    Subclasses whose blocks take other token layouts override
    :meth:`run_blocks`.

    Args:
        blocks (Iterable[nn.Module]): The blocks, stored as ``blocks``.
        downsample (nn.Module, optional): Map to map, e.g. stride 2.
            Defaults to None.
        with_cp (bool): Gradient checkpointing of each block.
            Defaults to False.
    """

    def __init__(self, blocks: Iterable[nn.Module],
                 downsample: Optional[nn.Module] = None,
                 with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def run_blocks(self, tokens: Tensor) -> Tensor:
        """``tokens: [B, H, W, C]`` -> ``[B, H, W, C]``."""
        return run_blocks(self.blocks, tokens, with_cp=self.with_cp)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``x: [B, C, H, W]`` -> (stage output ``[B, C, H, W]``, input of
        the next stage)."""
        out = self.run_blocks(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        nxt = self.downsample(out) if self.downsample is not None else out
        return out, nxt


class StageBackbone(BaseModule):
    """Base of the four-stage backbones: a stem ``patch_embed`` (image to
    map), stages ``layers[i]`` (:class:`Stage`: map to (output, next
    input)) and output norms ``{norm_prefix}{i}`` (LayerNorm over
    channels) for the stages in ``out_indices``.

    Subclasses set ``arch_zoo`` (named settings) and ``arch_keys`` (what a
    custom arch dict must hold), ``ignored_keys`` (checkpoint keys unused by
    design) and ``norm_prefix``; their constructors call
    :meth:`_check_stages`, build ``patch_embed`` and ``layers``, then
    :meth:`_finish`. Modules whose parameters the generic init does not
    cover define ``reset_extra_parameters`` and set those parameters when
    built, or, where they are linears (which the generic init overwrites),
    say ``extra_in_linears = True`` so that :meth:`_finish` sets them
    after it.
    """
    arch_zoo: Dict[str, dict] = {}
    arch_keys: Tuple[str, ...] = ()
    ignored_keys: Tuple[str, ...] = ()
    norm_prefix = 'norm'

    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        name = cls.__name__
        if isinstance(arch, str):
            if arch.lower() not in cls.arch_zoo:
                raise KeyError(f'{name}: unknown arch {arch!r}; choose from '
                               f'{sorted(cls.arch_zoo)} or pass a dict')
            return dict(cls.arch_zoo[arch.lower()])
        if not isinstance(arch, dict) or not set(cls.arch_keys) <= set(arch):
            raise ValueError(f'{name}: a custom arch must be a dict with keys '
                             f'{sorted(cls.arch_keys)}, got {arch!r}')
        return dict(arch)

    @staticmethod
    def _check_stages(name: str, num_stages: int, out_indices: Sequence[int],
                      frozen_stages: int) -> Tuple[int, ...]:
        indices = [i + num_stages if i < 0 else i for i in out_indices]
        if not indices or any(not 0 <= i < num_stages for i in indices):
            raise ValueError(f'{name}: out_indices {tuple(out_indices)} must '
                             f'name stages in 0..{num_stages - 1}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'{name}: frozen_stages={frozen_stages} must be '
                             f'in -1..{num_stages}')
        return tuple(indices)

    @staticmethod
    def drop_path_rates(depths: Sequence[int],
                        rate: float) -> List[List[float]]:
        """Stochastic depth growing linearly from 0 to ``rate`` over all
        blocks, split per stage."""
        # Numbers, not tensors: on the CPU whatever device builds the model.
        dpr = torch.linspace(0, rate, sum(depths), device='cpu').tolist()
        return [dpr[sum(depths[:i]):sum(depths[:i + 1])]
                for i in range(len(depths))]

    def _finish(self) -> None:
        """Add the output norms, initialise, freeze (the end of every
        constructor)."""
        for i in self.out_indices:
            self.add_module(f'{self.norm_prefix}{i}',
                            LayerNorm2d(self.num_features[i]))
        # Built modules hold PyTorch's default init and their own extra
        # parameters already: set the linears and norms, and again the
        # extras that live in linears. Drawing nothing else keeps a seed's
        # weights as the authors' constructors draw them.
        init_linear_and_norms(self)
        for m in self.modules():
            if getattr(m, 'extra_in_linears', False):
                m.reset_extra_parameters()
        self._freeze_stages()

    def _reset_parameters(self) -> None:
        """Random init: PyTorch's default for convolutions and batch norms,
        then trunc-normal(0.02) linears and unit LayerNorms
        (:func:`init_linear_and_norms`), then every module's
        ``reset_extra_parameters`` (Mamba's step and decays, ``D``, APE)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, _BatchNorm, nn.GroupNorm)):
                m.reset_parameters()
        init_linear_and_norms(self)
        for m in self.modules():
            if hasattr(m, 'reset_extra_parameters'):
                m.reset_extra_parameters()

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """``x: [B, in_channels, H, W]`` (any H, W) -> one ``[B, C_i, H_i,
        W_i]`` map per index in ``out_indices``; ``H_0 = ceil(H / 4)``,
        halving (rounded up) at each later stage."""
        self._check_input(x)
        # Channels-last maps are token-major: stages read and write them as
        # tokens without copies, and the convs run faster on them.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        outs = []
        for i, layer in enumerate(self.layers):
            out, x = layer(x)
            if i in self.out_indices:
                norm = getattr(self, f'{self.norm_prefix}{i}')
                outs.append(norm(out).contiguous())
        return tuple(outs)

    @property
    def optional_keys(self) -> Tuple[str, ...]:
        """Checkpoint keys that may be absent (ImageNet files have no output
        norms; they keep their init) or extra (norms of stages not in
        ``out_indices``; dropped)."""
        return (rf'{re.escape(self.norm_prefix)}\d+\.(weight|bias)', )

    def init_weights(self) -> None:
        """Random init, or the checkpoint named by a ``Pretrained`` init_cfg.

        ``init_cfg=dict(type='Pretrained', checkpoint=...)`` takes, besides
        ``checkpoint`` (a path or an ``https://``, ``open-mmlab://``...
        address):

        - ``prefix``: key prefix of the backbone inside a detector
          checkpoint. Defaults to ``'backbone.'``.
        - ``strict``: False loads only the tensors that fit and logs the
          rest at WARNING. Defaults to True: any missing or unexpected key
          is an error naming the arch the file fits.
        - ``safe_globals``: dotted names of classes a trusted file may
          unpickle besides tensors. Defaults to none.
        - ``map_location``: accepted as MMEngine's ``Pretrained`` takes it;
          the file is read onto the CPU either way.

        See :func:`mila_det.utils.checkpoint.load_pretrained`.
        """
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            known = {'type', 'checkpoint', 'prefix', 'strict',
                     'safe_globals', 'map_location'}
            if set(cfg) - known:
                raise ValueError(
                    f'{type(self).__name__}: unknown Pretrained init_cfg '
                    f'keys {sorted(set(cfg) - known)}; known: '
                    f'{sorted(known)}')
            load_pretrained(self, cfg.get('checkpoint'),
                            ignore=self.ignored_keys,
                            prefix=cfg.get('prefix', 'backbone.'),
                            optional=self.optional_keys,
                            strict=cfg.get('strict', True),
                            safe_globals=cfg.get('safe_globals', ()))
            self._is_init = True
        elif cfg is None:
            self._reset_parameters()
            self._is_init = True
        else:
            super().init_weights()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: List[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            mods.append(self.layers[i])
            if i in self.out_indices:
                mods.append(getattr(self, f'{self.norm_prefix}{i}'))
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def _check_input(self, x) -> None:
        """Images must be ``[B, in_channels, H, W]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'{type(self).__name__} expects images [B, '
                f'{self.in_channels}, H, W] (in_channels={self.in_channels}),'
                f' got shape {tuple(x.shape)}')

    def train(self, mode: bool = True) -> 'StageBackbone':
        """Training mode, keeping frozen stages (and, with ``norm_eval``,
        every BatchNorm) in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and getattr(self, 'norm_eval', False):
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
